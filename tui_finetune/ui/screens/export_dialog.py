"""Export a finished run from the TUI: pick a target, run ``tui-finetune export`` in a subprocess, show the checks.

The export loads torch and the model, so it runs as ``python -m tui_finetune.cli export ...`` in its
own process (the same command the README shows); a thread worker streams its progress lines here.
When it exits, the result is read back from the run's export.json, the one record of what was
checked, and shown with each check and how to use the output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, RadioButton, RadioSet, RichLog, Select, Static

from tui_finetune.core.export_spec import QUANTS, TARGETS, ExportError, ExportResult, ExportSpec, read_exports
from tui_finetune.core.export_usage import usage_lines
from tui_finetune.ui.messages import ExportEnded, ExportLine

TARGET_HELP = {"adapter": "adapter (peft)", "merged": "merged (transformers)", "gguf": "gguf (llama.cpp)",
               "ollama": "ollama (GGUF + Modelfile)"}
QUANT_HELP = {"f16": "f16 (exact)", "q8_0": "q8_0 (half the size)", "q4_k_m": "q4_k_m (needs llama-quantize)"}
QUIET_ENV = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
             "TOKENIZERS_PARALLELISM": "false"}
"""Keep library progress bars and warnings out of the dialog's log; the CLI's own lines stay."""


def export_command(run_dir: Path, spec: ExportSpec) -> list[str]:
    """The CLI call that makes this export, run with this interpreter."""
    command = [sys.executable, "-m", "tui_finetune.cli", "export", str(run_dir), "--to", spec.target,
               "--quant", spec.quant]
    return command + (["--out", spec.out_dir] if spec.out_dir else [])


def check_lines(result: ExportResult) -> list[Text]:
    """The export's verdict, each check as ok / FAIL / skip, and how to use it, for the log."""
    verdict = ("passed its checks", "green") if result.passed else ("FAILED a check", "red")
    lines = [Text.assemble((result.target, "bold"), f" {result.path} (", verdict, ")")]
    for check in result.checks:
        mark = ("skip", "yellow") if check.skipped else (("ok", "green") if check.passed else ("FAIL", "red"))
        lines.append(Text.assemble("[", mark, f"] {check.name}: {check.detail}"))
    lines += [Text.assemble(("use it: ", "dim"), line) for line in usage_lines(result)]
    return lines


class ExportDialog(ModalScreen[None]):
    DEFAULT_CSS = """
    ExportDialog { align: center middle; }
    ExportDialog > Vertical { width: 100; max-width: 98%; height: 90%; border: thick $primary;
                              background: $surface; padding: 0 1; }
    ExportDialog #export-choices { height: auto; }
    ExportDialog RadioSet { width: 1fr; height: auto; }
    ExportDialog #export-side { width: 1fr; height: auto; }
    ExportDialog #export-log { height: 1fr; min-height: 4; border: round $secondary; }
    """
    BINDINGS = [Binding("ctrl+s", "start", "Export", priority=True), Binding("escape", "close", "Close")]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.process: subprocess.Popen | None = None
        self.result: ExportResult | None = None
        self.running = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]Export {self.run_dir.name}[/b], checked after writing", id="export-title")
            with Horizontal(id="export-choices"):
                with RadioSet(id="export-target"):
                    for index, target in enumerate(TARGETS):
                        yield RadioButton(TARGET_HELP[target], value=index == 0, name=target)
                with Vertical(id="export-side"):
                    yield Select([(QUANT_HELP[q], q) for q in QUANTS], value="f16", allow_blank=False,
                                 id="export-quant", disabled=True)
                    yield Input(placeholder="folder (empty: inside the run)", id="export-out")
            yield RichLog(id="export-log", markup=False, wrap=True)
            yield Footer()

    def on_mount(self) -> None:
        log = self.query_one("#export-log", RichLog)
        log.border_title = "progress and checks"
        log.write(Text("Choose a target and press Ctrl+S.", style="dim"))
        self.query_one(RadioSet).focus()

    def chosen_target(self) -> str:
        pressed = self.query_one(RadioSet).pressed_button
        return pressed.name if pressed is not None and pressed.name else TARGETS[0]

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        self.query_one("#export-quant", Select).disabled = self.chosen_target() not in ("gguf", "ollama")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_start()

    def action_start(self) -> None:
        if self.running:
            self.notify("The export is still running.", severity="warning")
            return
        try:
            spec = ExportSpec(self.chosen_target(), quant=str(self.query_one("#export-quant", Select).value),
                              out_dir=self.query_one("#export-out", Input).value.strip())
        except ExportError as err:
            self.notify(str(err), severity="error")
            return
        self.running = True
        log = self.query_one("#export-log", RichLog)
        log.clear()
        log.write(Text(f"exporting to {spec.folder(self.run_dir)} …", style="bold"))
        self.run_export(spec)

    @work(thread=True, exclusive=True, group="export")
    def run_export(self, spec: ExportSpec) -> None:
        started = time.time()
        self.process = subprocess.Popen(export_command(self.run_dir, spec), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1,
                                        env={**os.environ, **QUIET_ENV})
        assert self.process.stderr is not None and self.process.stdout is not None
        for line in self.process.stderr:
            line = line.rstrip().rsplit("\r", 1)[-1]
            if line.strip():
                self.post_message(ExportLine(line))
        output = self.process.stdout.read()
        self.post_message(ExportEnded(self.process.wait(), output, started))

    def on_export_line(self, message: ExportLine) -> None:
        self.query_one("#export-log", RichLog).write(Text(message.text, style="dim"))

    def on_export_ended(self, message: ExportEnded) -> None:
        self.running = False
        log = self.query_one("#export-log", RichLog)
        target = self.chosen_target()
        done = [r for r in read_exports(self.run_dir) if r.target == target and r.created_at >= message.started_at - 1]
        if done:
            self.result = done[-1]
            for line in check_lines(self.result):
                log.write(line)
        else:  # it failed before recording anything: the CLI's error says why
            for line in message.output.strip().splitlines() or [f"the export exited with code {message.returncode}"]:
                log.write(Text(line, style="red"))
        severity = "information" if self.result is not None and self.result.passed else "error"
        self.notify("Export done and checked." if severity == "information" else "The export failed: see the log.",
                    severity=severity)

    def action_close(self) -> None:
        if self.running and self.process is not None and self.process.poll() is None:
            self.process.terminate()  # it writes under a temporary name: nothing half-written stays
            self.notify("Export cancelled.", severity="warning")
        self.dismiss(None)
