"""``tui-finetune train | runs | logs | stop | resume``: the run commands, on top of the same worker as the UI.

The CLI never trains in its own process: it writes the run folder, starts the detached worker and
follows ``events.jsonl``. So ``train`` without ``--detach`` is ``train --detach`` plus ``logs -f``, and
closing the terminal mid-run loses nothing. Ctrl+C while following asks the worker to stop (it saves
a checkpoint); a second Ctrl+C only detaches. No torch import here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tui_finetune.core.events import (
    CheckpointEvent, EndEvent, ErrorEvent, EvalEvent, Event, PhaseEvent, ProgressEvent, SampleEvent, StepEvent,
    WarningEvent, read_events)
from tui_finetune.core.launch import launch_run, resume_run
from tui_finetune.core.recipe import (
    RecipeError, check_recipe_fits_machine, load_recipe, resolve_precision, save_recipe)
from tui_finetune.core.presets import find_recipe
from tui_finetune.core.runs import (
    CHECKPOINTS_DIR, EVENTS_FILE, RECIPE_FILE, WORKER_LOG, RunError, find_run, list_runs, pid_alive,
    read_run_info, request_stop, shown_state, update_run_info)

console = Console(highlight=False)


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a recipe on a dataset in a background worker, and follow it")
    train.add_argument("recipe", help="a recipe file or a preset name (e.g. demo-cpu)")
    train.add_argument("--data", help="the training data file (a preset may ship its own sample data)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.max_steps=20 (repeatable)")
    train.add_argument("--detach", action="store_true", help="start the run, print its id and return at once")
    sub.add_parser("runs", help="list runs: id, model, state, step, last loss, age")
    logs = sub.add_parser("logs", help="print a run's events")
    logs.add_argument("run", help="run id (or a unique part of it, or 'last')")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until the run ends")
    stop = sub.add_parser("stop", help="stop a run: it saves a checkpoint and exits (resume it later)")
    stop.add_argument("run")
    stop.add_argument("--no-wait", action="store_true", help="return without waiting for the checkpoint")
    stop.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the checkpoint (default 600)")
    resume = sub.add_parser("resume", help="resume an interrupted run from its newest valid checkpoint")
    resume.add_argument("run")
    resume.add_argument("--detach", action="store_true")
    resume.add_argument("--from", dest="from_step", type=int, metavar="STEP",
                        help="resume from the checkpoint of this step (0: start again from the beginning)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a recipe value for the rest of the run (needs --force unless it is a checkpoint.* key)")
    resume.add_argument("--force", action="store_true",
                        help="resume even though the recipe, model or data changed since the checkpoint")


def run_command(args: argparse.Namespace) -> int:
    try:
        return {"train": _train, "runs": _runs, "logs": _logs, "stop": _stop, "resume": _resume}[args.command](args)
    except (RecipeError, RunError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2


# ------------------------------------------------------------------ commands

def default_data_for(recipe_path: Path) -> Path | None:
    """A preset may ship sample data beside it as ``<name>.jsonl`` (the CPU demo does)."""
    candidate = recipe_path.with_suffix(".jsonl")
    return candidate if candidate.is_file() else None


def _train(args: argparse.Namespace) -> int:
    from tui_finetune.core.hardware import detect_hardware, machine_facts

    recipe_path = find_recipe(args.recipe)
    recipe = load_recipe(recipe_path, args.overrides)
    data = Path(args.data) if args.data else default_data_for(recipe_path)
    if data is None:
        raise RecipeError(f"{recipe_path}: no --data given and the recipe ships no sample data: pass --data FILE")
    if not data.exists():
        raise RecipeError(f"--data {data}: no such file")
    local_model = Path(recipe.model).expanduser()
    if local_model.is_dir():  # the worker runs in the run folder: make a relative model path absolute
        recipe.model = str(local_model.resolve())
    facts = machine_facts(detect_hardware())
    check_recipe_fits_machine(recipe, facts, None)
    recipe = resolve_precision(recipe, facts)
    run_dir = launch_run(recipe, data)
    if args.detach:
        console.print(run_dir.name)
        return 0
    console.print(f"run [bold]{run_dir.name}[/] started in the background ({run_dir}); "
                  "Ctrl+C stops it with a checkpoint, a second Ctrl+C leaves it running")
    return follow_run(run_dir)


def _resume(args: argparse.Namespace) -> int:
    from tui_finetune.engine.checkpoints import CheckpointError, find_resume_checkpoint
    from tui_finetune.engine.resume import refusal_message, resume_differences

    run_dir = find_run(args.run)
    state = shown_state(read_run_info(run_dir))
    if state in ("running", "stopping"):
        raise RunError(f"{run_dir.name} is still {state}: follow it with 'tui-finetune logs -f {run_dir.name}'")
    if state == "completed":
        raise RunError(f"{run_dir.name} already completed: its adapter is in {run_dir / 'adapter'}")
    recipe = load_recipe(run_dir / RECIPE_FILE, args.overrides)
    try:
        choice = find_resume_checkpoint(run_dir / CHECKPOINTS_DIR, args.from_step)
    except CheckpointError as err:
        raise RunError(f"{run_dir.name}: {err}") from None
    for message in choice.messages():
        console.print(f"[yellow]warning:[/] {message}")
    diffs = resume_differences(choice.path, recipe) if choice.path else []
    if diffs and not args.force:
        raise RunError(f"{run_dir.name}: {refusal_message(choice.path, diffs, run_dir.name)}")
    changes: dict = {"resume_from_step": args.from_step, "resume_force": bool(args.force)}
    if args.overrides:
        save_recipe(recipe, run_dir / RECIPE_FILE, f"Resolved recipe of run {run_dir.name}, changed on resume: "
                    + " ".join(args.overrides))
        if any(o.split("=", 1)[0].strip() in ("train.micro_batch", "train.grad_accum") for o in args.overrides):
            changes.update(micro_batch=0, grad_accum=0)  # the new recipe's batch replaces an OOM-shrunk one
    update_run_info(run_dir, **changes)
    resume_run(run_dir)
    if args.detach:
        console.print(run_dir.name)
        return 0
    return follow_run(run_dir, from_end=True)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


STATE_STYLE = {"running": "cyan", "stopping": "yellow", "completed": "green", "failed": "red", "interrupted": "yellow"}


def _runs(args: argparse.Namespace) -> int:
    rows = list_runs()
    if not rows:
        console.print("no runs yet: start one with 'tui-finetune train demo-cpu' (CPU demo) or 'tui-finetune train RECIPE --data FILE'")
        return 0
    table = Table(show_header=True, header_style="bold")
    for column in ("id", "model", "state", "step", "last loss", "age"):
        table.add_column(column, justify="right" if column in ("step", "last loss") else "left")
    now = time.time()
    for row in rows:
        table.add_row(row.run_id, row.model, f"[{STATE_STYLE.get(row.state, '')}]{row.state}[/]",
                      f"{row.step}/{row.total_steps}", "-" if row.last_loss is None else f"{row.last_loss:.4f}",
                      _age(now - row.created_at))
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

def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f}"


def step_line(e: StepEvent) -> str:
    parts = [f"step {e.step}/{e.total_steps}", f"epoch {e.epoch:.2f}",
             f"loss {e.loss:.4f}" if e.loss is not None else "loss -"]
    if e.lr is not None:
        parts.append(f"lr {e.lr:.2e}")
    if e.grad_norm is not None:
        parts.append(f"grad-norm {e.grad_norm:.3f}")
    if e.tokens_per_s:
        parts.append(f"{e.tokens_per_s:.0f} tok/s")
    if e.eta_s is not None:
        parts.append(f"ETA {int(e.eta_s // 60)}m{int(e.eta_s % 60):02d}s")
    if e.vram_reserved_mb is not None:
        parts.append(f"VRAM {_mb(e.vram_reserved_mb)}/{_mb(e.vram_peak_mb)} GB reserved/peak")
    if e.nvml_used_mb is not None:
        parts.append(f"card {_mb(e.nvml_used_mb)}/{_mb(e.nvml_total_mb)} GB")
    return "  ".join(parts)


def print_event(event: Event) -> None:
    if isinstance(event, StepEvent):
        console.print(step_line(event))
    elif isinstance(event, PhaseEvent):
        console.print(f"[bold]== {event.phase}[/] {event.message}")
    elif isinstance(event, ProgressEvent):
        total = f"/{event.total:.0f}" if event.total else ""
        console.print(f"   {event.phase}: {event.done:.0f}{total} {event.unit} {event.message}")
    elif isinstance(event, EvalEvent):
        console.print(f"[cyan]eval[/] step {event.step}: eval loss {event.eval_loss:.4f}" if event.eval_loss is not None
                      else f"eval step {event.step}")
    elif isinstance(event, CheckpointEvent):
        console.print(f"[dim]checkpoint {event.path}[/]")
    elif isinstance(event, SampleEvent):
        console.print(Panel(f"[dim]{event.prompt}[/]\n[bold]{event.text}[/]", title=f"{event.label} training",
                            title_align="left"))
    elif isinstance(event, WarningEvent):
        console.print(f"[yellow]warning:[/] {event.message}" + (f"\n  -> {event.advice}" if event.advice else ""))
    elif isinstance(event, ErrorEvent):
        console.print(f"[red]error:[/] {event.message}" + (f"\n  -> {event.advice}" if event.advice else ""))
    elif isinstance(event, EndEvent):
        style = STATE_STYLE.get(event.state, "")
        console.print(f"[{style}]run {event.state}[/]: {event.message}")


def follow_run(run_dir: Path, progress_bar: bool = True, from_end: bool = False, poll_s: float = 0.3) -> int:
    """Print events as they arrive until the run ends; the exit code follows the final state."""
    path = run_dir / EVENTS_FILE
    offset = path.stat().st_size if from_end and path.exists() else 0
    interrupts = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not progress_bar)
    task = progress.add_task("training", total=None, visible=False)
    final: EndEvent | None = None
    with progress:
        while final is None:
            try:
                events, offset = read_events(path, offset)
                for event in events:
                    if isinstance(event, StepEvent):
                        loss = f"loss {event.loss:.3f}" if event.loss is not None else ""
                        progress.update(task, total=event.total_steps, completed=event.step, visible=True,
                                        description=f"training {loss}")
                    print_event(event)
                    if isinstance(event, EndEvent):
                        final = event
                if final is None and not events:
                    if not pid_alive(read_run_info(run_dir).pid):
                        events, offset = read_events(path, offset)  # the last words, if any
                        for event in events:
                            print_event(event)
                            final = event if isinstance(event, EndEvent) else final
                        if final is None:
                            console.print(f"[red]the worker exited without a final state[/]: see {run_dir / WORKER_LOG}")
                            return 1
                        break
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
