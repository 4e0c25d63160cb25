"""Run folders: a run is a folder, and the folder is the truth (DESIGN.md).

Layout of ``runs_dir()/<run-id>/``::

    recipe.toml      the fully resolved recipe: everything needed to start again
    run.json         RunInfo: state, pid, versions, the data file's hash, times
    events.jsonl     append-only events (core/events.py)
    checkpoints/     step-NNNNNN/ folders, each complete only once its marker exists
    adapter/         the final LoRA adapter (safetensors + adapter config + tokenizer), on completion
    STOP             present while a stop has been requested

Run ids read and sort by time: ``20261126-091630-gemma-3-270m``. Any process may read a run; only
its worker (and ``request_stop``) writes ``run.json``, always by atomic replace, so a reader never
sees half a file. A ``running`` run whose pid is gone is shown as ``interrupted``.
Plain Python: no torch here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tui_finetune.core.events import EndEvent, StepEvent, read_events
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.recipe import RecipeSpec, load_recipe, recipe_to_toml

STATES = ("running", "stopping", "completed", "failed", "interrupted")
FINAL_STATES = ("completed", "failed", "interrupted")
RECIPE_FILE = "recipe.toml"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
STOP_FILE = "STOP"
WORKER_LOG = "worker.log"
"""The worker's own stdout/stderr: library warnings and, if all else fails, a traceback."""
CHECKPOINT_MARKER = "COMPLETE.json"
"""The file that seals a checkpoint (engine/checkpoints.py MARKER; a test holds the two equal)."""
_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")


class RunError(LookupError):
    """A run that can't be found or read; the message says what to try."""


@dataclass
class RunInfo:
    """The contents of ``run.json``."""

    run_id: str
    model: str
    state: str = "running"
    pid: int | None = None
    data_path: str = ""
    data_hash: str = ""
    """Hash of the data as prepared (data/prepare.py); a resume with other data is refused."""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    total_steps: int = 0
    message: str = ""
    """Why the run ended, in one line (the error, or where the adapter is)."""
    versions: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    """The kernels that train this run (engine/backends.py): universal, liger or unsloth."""
    backend_reason: str = ""
    backend_skipped: list[str] = field(default_factory=list)
    """Each backend tried before it and why it was passed over ("liger: not installed ...")."""
    backend_failures: dict[str, str] = field(default_factory=dict)
    """Backends that raised while loading or on their probe step (name: error); the worker restarted
    without them, and later starts of this run skip them too."""
    device: str = ""
    resumed_from: str = ""
    """The checkpoint the worker last resumed from ('' for a fresh start)."""
    micro_batch: int = 0
    grad_accum: int = 0
    """The micro-batch and accumulation in effect when an OOM changed them (0: the recipe's)."""
    eval_batch: int = 0
    """The eval batch after an OOM in evaluation halved it (0: the micro-batch)."""
    oom_shrinks: list[dict[str, Any]] = field(default_factory=list)
    """Each OOM recovery: time, micro_batch [old, new], grad_accum [old, new], the error's first line."""
    autofit: list[str] = field(default_factory=list)
    """What auto-fit and the fit-check changed before training, one sentence each with its ``--set``
    (engine/recipe_refit.py); the changed values are in recipe.toml."""
    phase_peaks_gib: dict[str, float] = field(default_factory=dict)
    """Peak VRAM torch reserved in each phase that touches the GPU (fit, train, save, eval, sample-before,
    sample-after), in GiB, as the worker last measured it: the evidence that every phase fits the card."""
    phase_running: str = ""
    """The optional phase under way (eval, sample-before, sample-after): one still set when a worker
    starts was under way when its predecessor died, and counts as failed."""
    failed_phases: dict[str, str] = field(default_factory=dict)
    """Optional phases that failed (name: why); a resume skips them rather than fail the same way again."""
    resume_from_step: int | None = None
    resume_force: bool = False
    """Set by ``resume --from STEP`` / ``--force`` for the next worker, which clears them once read."""


def make_run_id(model: str, now: datetime | None = None) -> str:
    """``YYYYMMDD-HHMMSS-<model short name>``: sorts by start time and says what it trains."""
    now = now or datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{model_short_name(model)}"


def model_short_name(model: str) -> str:
    """The last part of a Hub id, folder or package name, as a lowercase slug."""
    name = model.rstrip("/\\").replace("\\", "/").split("/")[-1].split(":")[-1]
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")
    return slug[:40] or "model"


def create_run(recipe: RecipeSpec, data_path: str | Path, base: Path | None = None,
               now: datetime | None = None) -> Path:
    """Make a new run folder with the resolved recipe and a ``running`` run.json (pid set by the launcher)."""
    base = base or runs_dir()
    base.mkdir(parents=True, exist_ok=True)
    run_id = make_run_id(recipe.model, now)
    run_dir = base / run_id
    suffix = 1
    while True:
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            suffix += 1
            run_dir = base / f"{run_id}-{suffix}"
    (run_dir / CHECKPOINTS_DIR).mkdir()
    write_run_recipe(run_dir, recipe, data_path)
    (run_dir / EVENTS_FILE).touch()
    write_run_info(run_dir, RunInfo(run_id=run_dir.name, model=recipe.model, data_path=str(Path(data_path).resolve())))
    return run_dir


def read_run_info(run_dir: Path) -> RunInfo:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run_dir}: not a run folder (no {RUN_FILE})") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{run_dir / RUN_FILE}: unreadable ({err})") from None
    known = {f.name for f in fields(RunInfo)}
    return RunInfo(**{k: v for k, v in data.items() if k in known})


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    """Write run.json by atomic replace: readers see the old or the new file, never a torn one."""
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / RUN_FILE)


def update_run_info(run_dir: Path, **changes: Any) -> RunInfo:
    info = replace(read_run_info(run_dir), **changes)
    write_run_info(run_dir, info)
    return info


def read_run_recipe(run_dir: Path) -> RecipeSpec:
    return load_recipe(run_dir / RECIPE_FILE)


def write_run_recipe(run_dir: Path, recipe: RecipeSpec, data_path: str | Path | None = None) -> None:
    """Write the run's resolved recipe by atomic replace: the worker rewrites it when auto-fit changes
    a value, so that a resume trains with the same values."""
    data = data_path if data_path is not None else read_run_info(run_dir).data_path
    header = (f"Resolved recipe of run {run_dir.name}. "
              f"Start again with: tui-finetune train {run_dir / RECIPE_FILE} --data {data}")
    tmp = run_dir / f".{RECIPE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(recipe_to_toml(recipe, header), encoding="utf-8")
    os.replace(tmp, run_dir / RECIPE_FILE)


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


def summarize_run(run_dir: Path) -> RunSummary:
    info = read_run_info(run_dir)
    events, _ = read_events(run_dir / EVENTS_FILE)
    last_step = next((e for e in reversed(events) if isinstance(e, StepEvent)), None)
    return RunSummary(
        run_id=info.run_id, run_dir=run_dir, model=info.model, state=shown_state(info),
        step=last_step.step if last_step else 0,
        total_steps=(last_step.total_steps if last_step else 0) or info.total_steps,
        last_loss=last_step.loss if last_step else None, created_at=info.created_at, message=info.message)


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


def request_stop(run_dir: Path) -> RunInfo:
    """Ask a worker to save a checkpoint and exit: a STOP file (works everywhere) plus SIGINT on POSIX."""
    info = read_run_info(run_dir)
    (run_dir / STOP_FILE).write_text(f"stop requested at {time.time():.0f}\n", encoding="utf-8")
    if info.state == "running" and pid_alive(info.pid):
        info = update_run_info(run_dir, state="stopping")
        if sys.platform != "win32" and info.pid:
            try:
                os.kill(info.pid, signal.SIGINT)
            except OSError:
                pass
    return info


def resume_step(run_dir: Path) -> int | None:
    """The step a resume continues from: the newest sealed checkpoint, or None when it would start over.

    Read from the folder names and their completion markers only (the worker also checks every file's
    hash, and passes over a damaged checkpoint with a warning), so the UI and the CLI can say what a
    resume will do without torch, the engine or hashing gigabytes."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    steps = [int(m.group(1)) for p in folder.iterdir()
             if (m := _CHECKPOINT_NAME.match(p.name)) and (p / CHECKPOINT_MARKER).is_file()]
    return max(steps, default=None)


def final_state(run_dir: Path) -> str | None:
    """The state from the ``end`` event, if the worker got to write one."""
    events, _ = read_events(run_dir / EVENTS_FILE)
    end = next((e for e in reversed(events) if isinstance(e, EndEvent)), None)
    return end.state if end else None


def mark_interrupted_phase_failed(run_dir: Path) -> None:
    """A starting worker's first step: an optional phase still marked as under way was under way when the
    previous worker died (killed, or a crash inside CUDA), so it counts as failed and will be skipped."""
    running = read_run_info(run_dir).phase_running
    if running:
        update_run_info(run_dir, phase_running="")
        mark_phase_failed(run_dir, running, "the worker stopped during it (killed or crashed)")


def mark_phase_failed(run_dir: Path, key: str, why: str) -> None:
    update_run_info(run_dir, failed_phases={**read_run_info(run_dir).failed_phases, key: why})
