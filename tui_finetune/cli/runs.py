"""``tui-finetune train | runs | logs | stop | resume``: the run commands, on top of the same worker as the UI.

The CLI never trains in its own process: it writes the run folder, starts the detached worker and
follows ``events.jsonl``. So ``train`` without ``--detach`` is ``train --detach`` plus ``logs -f``, and
closing the terminal mid-run loses nothing. Ctrl+C while following asks the worker to stop (it saves
a checkpoint); a second Ctrl+C only detaches. No torch import here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tui_finetune.cli.data_options import data_overrides
from tui_finetune.core.event_text import EventFollower, describe_event, resume_wording, state_colour, worker_gone_line
from tui_finetune.core.events import EndEvent, Event, SampleEvent, StepEvent, read_events
from tui_finetune.core.hardware import detect_hardware
from tui_finetune.core.presets import find_recipe
from tui_finetune.core.recipe import RecipeError
from tui_finetune.core.recipe_io import load_recipe, save_recipe
from tui_finetune.core.run_folder.control import launch_run, request_stop, resume_run, settle_recipe_devices
from tui_finetune.core.run_folder.info import RunError, read_run_info, read_run_recipe, update_run_info
from tui_finetune.core.run_folder.layout import CHECKPOINTS_DIR, EVENTS_FILE, RECIPE_FILE
from tui_finetune.core.run_folder.listing import RunSummary, find_run, list_runs, pid_alive, shown_state

console = Console(highlight=False)


def run_command(args: argparse.Namespace) -> int:
    from tui_finetune.data.errors import DataError

    try:
        return {"train": _train, "runs": _runs, "logs": _logs, "stop": _stop, "resume": _resume}[args.command](args)
    except (RecipeError, RunError) as err:  # soft_wrap here and below: a long path stays whole, to copy or grep
        console.print(Text.assemble(("error:", "red"), f" {err}"), soft_wrap=True)
        return 2
    except DataError as err:
        console.print(Text(str(err), style="red"), soft_wrap=True)
        console.print(Text("✗ refused: nothing was started (no run folder was created)", style="bold red"))
        return 2


# ------------------------------------------------------------------ commands

def default_data_for(recipe_path: Path) -> Path | None:
    """A preset may ship sample data beside it as ``<name>.jsonl`` (the CPU demo does)."""
    candidate = recipe_path.with_suffix(".jsonl")
    return candidate if candidate.is_file() else None


def _train(args: argparse.Namespace) -> int:
    """Check the recipe, then the data (seconds, no tokenizer), and only then create the run and its worker:
    bad data must not cost a model load or leave a failed run behind."""
    from tui_finetune.data.validate import refuse_unusable_data

    recipe_path = find_recipe(args.recipe)
    recipe = load_recipe(recipe_path, data_overrides(args) + devices_override(args))
    data = Path(args.data) if args.data else default_data_for(recipe_path)
    if data is None:
        raise RecipeError(f"{recipe_path}: no --data given and the recipe ships no sample data: pass --data FILE")
    if not data.exists():
        raise RecipeError(f"--data {data}: no such file or folder")
    refuse_unusable_data(data, recipe.data)
    run_dir = launch_run(recipe, data)
    if args.detach:
        console.print(run_dir.name)
        return 0
    console.print(f"run [bold]{run_dir.name}[/] started in the background ({run_dir}); "
                  "Ctrl+C stops it with a checkpoint, a second Ctrl+C leaves it running", soft_wrap=True)
    return follow_run(run_dir)


def _resume(args: argparse.Namespace) -> int:
    from tui_finetune.core.run_folder.checkpoints import CheckpointError
    from tui_finetune.core.run_folder.layout import step_of
    from tui_finetune.core.run_folder.resume import find_resume_checkpoint, refusal_message, resume_differences

    run_dir = find_run(args.run)
    state = shown_state(read_run_info(run_dir))
    if state in ("running", "stopping"):
        raise RunError(f"{run_dir.name} is still {state}: follow it with 'tui-finetune logs -f {run_dir.name}'")
    if state == "completed":
        raise RunError(f"{run_dir.name} already completed: its adapter is in {run_dir / 'adapter'}")
    overrides = list(args.overrides) + devices_override(args)
    recipe = settle_recipe_devices(read_run_recipe(run_dir, overrides), detect_hardware())
    try:
        choice = find_resume_checkpoint(run_dir / CHECKPOINTS_DIR, args.from_step)
    except CheckpointError as err:
        raise RunError(f"{run_dir.name}: {err}") from None
    for message in choice.messages():
        console.print(Text.assemble(("warning:", "yellow"), f" {message}"), soft_wrap=True)
    diffs = resume_differences(choice.path, recipe) if choice.path else []
    if diffs and not args.force:
        raise RunError(f"{run_dir.name}: {refusal_message(choice.path, diffs, run_dir.name)}")
    changes: dict = {"resume_from_step": args.from_step, "resume_force": bool(args.force)}
    if overrides:
        save_recipe(recipe, run_dir / RECIPE_FILE, f"Resolved recipe of run {run_dir.name}, changed on resume: "
                    + " ".join(overrides))
    update_run_info(run_dir, **changes)
    resume_run(run_dir)
    plan = f"resuming {run_dir.name}: it {resume_wording(step_of(choice.path) if choice.path else None)}"
    if args.detach:  # stdout stays the bare id for scripts; the plan goes to stderr
        Console(stderr=True, highlight=False).print(plan)
        console.print(run_dir.name)
        return 0
    console.print(plan)
    return follow_run(run_dir, from_end=True)


def devices_override(args: argparse.Namespace) -> list[str]:
    """``--devices N|all`` as the ``--set train.devices=...`` it stands for."""
    value = getattr(args, "devices", None)
    if not value:
        return []
    return [f"train.devices={int(value) if value.strip().isdigit() else json.dumps(value.strip())}"]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def batch_words(row: RunSummary) -> str:
    """The batch in effect, from the run's recipe.toml (after any OOM shrink): micro-batch x accumulation
    (x processes, when more than one trains) = the effective batch, ``2x4=8`` or ``2x4x2=16``; '-' if unknown."""
    if not row.micro_batch:
        return "-"
    split = f"{row.micro_batch}x{row.grad_accum}" + (f"x{row.devices}" if row.devices > 1 else "")
    return f"{split}={row.effective_batch}"


RUNS_COLUMNS = ("id", "state", "step", "batch", "last loss", "age", "model")
"""The model last: it folds where the terminal is narrow, and at 80 columns it is left out (the run id names it)."""
MODEL_MIN_CELLS = 14


def runs_fixed_cells(cells: list[tuple]) -> int:
    """Cells the columns before the model take, with the 2-cell gap before each next column."""
    names = RUNS_COLUMNS if len(cells[0]) == len(RUNS_COLUMNS) else RUNS_COLUMNS[:3] + RUNS_COLUMNS[4:]
    widths = [max(len(str(c)) for c in column) for column in zip(names[:-1], *(line[:-1] for line in cells))]
    return sum(widths) + 2 * len(widths)


def _runs(args: argparse.Namespace) -> int:
    rows = list_runs()
    if not rows:
        console.print("no runs yet: start one with 'tui-finetune train demo-cpu' (CPU demo) or 'tui-finetune train RECIPE --data FILE'")
        return 0
    now = time.time()
    cells = [(row.run_id, Text(row.state, style=state_colour(row.state)), f"{row.step}/{row.total_steps}",
              batch_words(row), "-" if row.last_loss is None else f"{row.last_loss:.4f}", _age(now - row.created_at), row.model)
             for row in rows]
    if console.width - runs_fixed_cells(cells) < 0:  # too narrow for the batch too: the monitor shows it
        cells = [line[:3] + line[4:] for line in cells]
    columns = RUNS_COLUMNS if len(cells[0]) == len(RUNS_COLUMNS) else RUNS_COLUMNS[:3] + RUNS_COLUMNS[4:]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns[:-1]:  # an id is copied whole, and the state and numbers are read whole: never cut
        table.add_column(column, justify="right" if column in ("step", "batch", "last loss") else "left", no_wrap=True)
    if console.width - runs_fixed_cells(cells) >= MODEL_MIN_CELLS:
        table.add_column(columns[-1], overflow="fold")
    for line in cells:
        table.add_row(*line[:len(table.columns)])
    console.print(table)
    return 0


def _logs(args: argparse.Namespace) -> int:
    run_dir = find_run(args.run)
    if args.follow:
        return follow_run(run_dir, progress_bar=False)
    events, _ = read_events(run_dir / EVENTS_FILE)
    for event in events:
        print_event(event)
    console.print(f"state: {shown_state(read_run_info(run_dir))}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    run_dir = find_run(args.run)
    info = read_run_info(run_dir)
    if shown_state(info) not in ("running", "stopping"):
        console.print(f"{run_dir.name} is not running (state: {shown_state(info)})")
        return 0
    request_stop(run_dir)
    console.print(f"asked {run_dir.name} to stop: it saves a checkpoint, then exits")
    if args.no_wait:
        return 0
    deadline = time.time() + args.timeout
    while pid_alive(read_run_info(run_dir).pid):
        if time.time() > deadline:
            console.print(f"{run_dir.name} is still saving after {args.timeout:.0f}s; it goes on in the background. "
                          f"Check with 'tui-finetune runs'")
            return 1
        time.sleep(0.3)
    info = read_run_info(run_dir)
    console.print(f"{run_dir.name}: {shown_state(info)} ({info.message})")
    return 0 if shown_state(info) == "interrupted" else 1


# ------------------------------------------------------------------ following and printing

def print_event(event: Event) -> None:
    """One event in the wording the TUI's event log uses (core/event_text.py); a sample as a panel."""
    if isinstance(event, SampleEvent):
        console.print(Panel(Text.assemble((event.prompt, "dim"), "\n", (event.text, "bold")),
                            title=f"{event.label} training", title_align="left"))
        return
    line = describe_event(event)
    if line is not None:
        console.print(line.to_text(), soft_wrap=True)


def follow_run(run_dir: Path, progress_bar: bool = True, from_end: bool = False, poll_s: float = 0.3) -> int:
    """Print events as they arrive until the run ends; the exit code follows the final state."""
    follower = EventFollower.from_end(run_dir) if from_end else EventFollower(run_dir)
    interrupts = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not progress_bar)
    task = progress.add_task("training", total=None, visible=False)
    final: EndEvent | None = None
    with progress:
        while final is None:
            try:
                gone = follower.worker_gone()  # asked before reading, so the worker's last words are read
                events = follower.read_new()
                for event in events:
                    if isinstance(event, StepEvent):
                        loss = f"loss {event.loss:.3f}" if event.loss is not None else ""
                        progress.update(task, total=event.total_steps, completed=event.step, visible=True,
                                        description=f"training {loss}")
                    print_event(event)
                    final = event if isinstance(event, EndEvent) else final
                if final is None and not events:
                    if gone:
                        console.print(worker_gone_line(run_dir).to_text(), soft_wrap=True)
                        return 1
                    time.sleep(poll_s)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts > 1:
                    console.print(f"detached; the run goes on. Follow it with 'tui-finetune logs -f {run_dir.name}'")
                    return 0
                request_stop(run_dir)
                console.print("stopping: saving a checkpoint (Ctrl+C again to detach and leave it running)")
    if final is not None and final.state == "completed":
        print_before_after(run_dir)
    return {"completed": 0, "interrupted": 130}.get(final.state if final else "", 1)


def print_before_after(run_dir: Path) -> None:
    """End a completed run's output with the held-out prompt and the model's answer before and after."""
    events, _ = read_events(run_dir / EVENTS_FILE)
    samples = {e.label: e for e in events if isinstance(e, SampleEvent)}
    if "before" not in samples or "after" not in samples:
        return
    table = Table(title="held-out prompt: " + " ".join(samples["after"].prompt.split()), title_justify="left",
                  show_header=True, header_style="bold", expand=True)
    table.add_column("before training")
    table.add_column("after training")
    table.add_row(samples["before"].text.strip(), samples["after"].text.strip())
    console.print(table)
