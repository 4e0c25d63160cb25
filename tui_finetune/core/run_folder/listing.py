"""Finding and listing runs, and the state to show for each.

A ``running`` run whose worker's pid is gone is shown as ``interrupted``: the worker died (killed, a
crash inside CUDA, a power cut) before it could write its end.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tui_finetune.core.events import EndEvent, StepEvent, read_events
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.recipe import RecipeError
from tui_finetune.core.run_folder.info import RunError, RunInfo, read_run_info, read_run_recipe
from tui_finetune.core.run_folder.layout import EVENTS_FILE, RUN_FILE


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return _win_pid_alive(pid)
    try:  # our own finished child (the CLI started it) must be reaped, or it looks alive as a zombie
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a finished child not yet reaped still answers kill(0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _win_pid_alive(pid: int) -> bool:  # pragma: no cover
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    code = ctypes.c_ulong()
    kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    kernel32.CloseHandle(handle)
    return code.value == 259  # STILL_ACTIVE


def shown_state(info: RunInfo) -> str:
    """The state to show: a running or stopping run whose worker is gone was interrupted."""
    if info.state in ("running", "stopping") and not pid_alive(info.pid):
        return "interrupted"
    return info.state


@dataclass
class RunSummary:
    """One row of ``tui-finetune runs``."""

    run_id: str
    run_dir: Path
    model: str
    state: str
    step: int
    total_steps: int
    last_loss: float | None
    created_at: float
    message: str = ""
    micro_batch: int = 0
    grad_accum: int = 0
    devices: int = 1
    """The batch in effect, from the run's recipe.toml (an OOM's smaller micro-batch is written there, and
    ``train.devices`` is the number of processes the launch settled); 0 when the recipe can't be read."""
    effective_batch: int = 0
    """Sequences a step: the recipe's ``effective_batch`` (micro-batch x accumulation x devices)."""


def summarize_run(run_dir: Path) -> RunSummary:
    info = read_run_info(run_dir)
    events, _ = read_events(run_dir / EVENTS_FILE)
    last_step = next((e for e in reversed(events) if isinstance(e, StepEvent)), None)
    try:
        recipe = read_run_recipe(run_dir)
        micro, accum, effective = recipe.train.micro_batch, recipe.train.grad_accum, recipe.effective_batch
        devices = recipe.device_count
    except (OSError, RecipeError):  # a hand-edited or missing recipe must not hide the run
        micro = accum = effective = 0
        devices = 1
    return RunSummary(
        run_id=info.run_id, run_dir=run_dir, model=info.model, state=shown_state(info),
        step=last_step.step if last_step else 0,
        total_steps=(last_step.total_steps if last_step else 0) or info.total_steps,
        last_loss=last_step.loss if last_step else None, created_at=info.created_at, message=info.message,
        micro_batch=micro, grad_accum=accum, devices=devices, effective_batch=effective)


def list_runs(base: Path | None = None) -> list[RunSummary]:
    """Every readable run, oldest first (run ids sort by time)."""
    base = base or runs_dir()
    if not base.is_dir():
        return []
    out = []
    for run_dir in sorted(p for p in base.iterdir() if (p / RUN_FILE).is_file()):
        try:
            out.append(summarize_run(run_dir))
        except RunError:
            continue
    return out


def find_run(ref: str, base: Path | None = None) -> Path:
    """A run folder from its id, a unique prefix or suffix of it, ``last``, or a path."""
    path = Path(ref)
    if (path / RUN_FILE).is_file():
        return path
    base = base or runs_dir()
    ids = sorted(p.name for p in base.iterdir() if (p / RUN_FILE).is_file()) if base.is_dir() else []
    if not ids:
        raise RunError(f"no runs under {base}: start one with 'tui-finetune train RECIPE --data FILE'")
    if ref in ("last", "latest"):
        return base / ids[-1]
    if ref in ids:
        return base / ref
    matches = [i for i in ids if i.startswith(ref) or i.endswith(ref)]
    if len(matches) == 1:
        return base / matches[0]
    if matches:
        raise RunError(f"'{ref}' matches {len(matches)} runs ({', '.join(matches[:4])}...): give more of the id")
    raise RunError(f"no run '{ref}' under {base}: list them with 'tui-finetune runs'")


def final_state(run_dir: Path) -> str | None:
    """The state from the ``end`` event, if the worker got to write one."""
    events, _ = read_events(run_dir / EVENTS_FILE)
    end = next((e for e in reversed(events) if isinstance(e, EndEvent)), None)
    return end.state if end else None
