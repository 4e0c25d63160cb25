"""One card-simulator cell: the product's own CLI trains a preset, and the run folder says what happened.

A plain cell is ``python -m tui_finetune.cli train PRESET --data ... --set ...`` followed to its end. A
``:kill`` cell starts the same with ``--detach``, waits for the first ``checkpoint`` event, kills the
worker with SIGKILL (its whole process group), checks that the run shows as ``interrupted``, then runs
``resume RUN_ID`` to the end and records the checkpoint it resumed from. While a worker runs, NVML is
sampled every ``SAMPLE_S``: the worker's own GPU memory (CUDA context and non-torch memory included)
and the whole card's, so the peak is what a real card of that size would have had to hold.

No torch here: the simulator must hold no CUDA context of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.card_holder import GIB, NvmlCard, end_process
from benchmarks.memory_speed import REPO_ROOT, kill_tree
from tui_finetune.core.events import (
    CheckpointEvent, ErrorEvent, PhaseEvent, StepEvent, WarningEvent, read_events)
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.run_folder.info import RunError, read_run_info
from tui_finetune.core.run_folder.layout import EVENTS_FILE, RECIPE_FILE, RUN_FILE
from tui_finetune.core.run_folder.listing import pid_alive, shown_state

SAMPLE_S = 0.2
KILL_POLL_S = 0.05
"""How often a ``:kill`` cell looks for the first checkpoint: on the CPU smoke model steps take milliseconds."""
DEATH_WAIT_S = 30.0
FIT_PEAK = re.compile(r"peak ([0-9.]+) GiB reserved")
RESUMING_FROM = re.compile(r"resuming from (\S+)")


class CellTimeout(Exception):
    """The cell ran past ``--timeout``."""


@dataclass
class CellJob:
    """What one cell's run needs; ``home`` is a fresh TUI_FINETUNE_HOME, so the cell's run is its only one."""

    key: str
    recipe: str
    """A preset name or a recipe file."""
    data: Path
    overrides: list[str]
    kill: bool
    env: dict[str, str]
    home: Path
    timeout_s: float
    nvml: NvmlCard | None = None
    log_lines: list[str] = field(default_factory=list)


@dataclass
class WorkerWatch:
    """The NVML peaks of a run's worker: its own processes, and the whole card."""

    nvml: NvmlCard | None
    worker_peak: int | None = None
    device_peak: int | None = None
    samples: int = 0

    def sample(self, pid: int | None) -> None:
        if self.nvml is None:
            return
        self.samples += 1
        self.device_peak = max(self.device_peak or 0, self.nvml.used_bytes())
        if pid:
            used = self.nvml.process_bytes({pid, *descendants(pid)})
            if used is not None:
                self.worker_peak = max(self.worker_peak or 0, used)


def descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return []


# ---------------------------------------------------------------- driving the CLI

def start_cli(job: CellJob, args: list[str], name: str) -> subprocess.Popen:
    """``python -m tui_finetune.cli ARGS`` with the cell's home; its output goes to ``home/<name>.log``."""
    env = {**job.env, "TUI_FINETUNE_HOME": str(job.home)}
    log = (job.home / f"{name}.log").open("wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "tui_finetune.cli", *args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    finally:
        log.close()


def cli_output(job: CellJob, name: str) -> str:
    path = job.home / f"{name}.log"
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def find_run_dir(home: Path) -> Path | None:
    runs = sorted(p for p in (home / "runs").glob("*") if (p / RUN_FILE).is_file())
    return runs[-1] if runs else None


def worker_pid(run_dir: Path | None) -> int | None:
    try:
        return read_run_info(run_dir).pid if run_dir else None
    except RunError:
        return None


def follow(job: CellJob, proc: subprocess.Popen, watch: WorkerWatch, deadline: float) -> int:
    """Wait for a CLI command to exit, sampling the worker's memory; its exit code."""
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise CellTimeout()
        watch.sample(worker_pid(find_run_dir(job.home)))
        time.sleep(SAMPLE_S)
    return proc.returncode


def wait_for_checkpoint(run_dir: Path, watch: WorkerWatch, deadline: float) -> tuple[CheckpointEvent | None, int]:
    """The first checkpoint event, or None when the worker ended first; and the events file's offset."""
    offset, last_sample = 0, 0.0
    while True:
        events, offset = read_events(run_dir / EVENTS_FILE, offset)
        for event in events:
            if isinstance(event, CheckpointEvent):
                return event, offset
        pid = worker_pid(run_dir)
        if not pid_alive(pid):
            return None, offset
        if time.monotonic() > deadline:
            raise CellTimeout()
        if time.monotonic() - last_sample >= SAMPLE_S:
            watch.sample(pid)
            last_sample = time.monotonic()
        time.sleep(KILL_POLL_S)


def kill_worker(pid: int | None) -> None:
    """SIGKILL the worker, what it started, and its process group (it leads its own session)."""
    if not pid or not pid_alive(pid):
        return
    try:
        kill_tree(pid)
    except OSError:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def wait_dead(pid: int | None) -> bool:
    end = time.monotonic() + DEATH_WAIT_S
    while pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def run_plain(job: CellJob, watch: WorkerWatch, deadline: float) -> dict[str, Any]:
    proc = start_cli(job, ["train", job.recipe, "--data", str(job.data), *set_args(job.overrides)], "train")
    try:
        return {"train_exit": follow(job, proc, watch, deadline)}
    finally:
        end_process(proc)


def run_with_kill(job: CellJob, watch: WorkerWatch, deadline: float) -> dict[str, Any]:
    """train --detach, SIGKILL after the first checkpoint, resume to the end."""
    proc = start_cli(job, ["train", job.recipe, "--data", str(job.data), "--detach", *set_args(job.overrides)], "train")
    try:
        out: dict[str, Any] = {"train_exit": follow(job, proc, watch, deadline)}
    finally:
        end_process(proc)
    run_dir = find_run_dir(job.home)
    if run_dir is None:
        return out
    checkpoint, offset = wait_for_checkpoint(run_dir, watch, deadline)
    if checkpoint is None:
        out["kill"] = {"done": False, "why": "the run ended before its first checkpoint"}
        return out
    pid = worker_pid(run_dir)
    kill_worker(pid)
    dead = wait_dead(pid)
    state = shown_state(read_run_info(run_dir))
    kill = {"done": True, "after_checkpoint": Path(checkpoint.path).name, "at_step": checkpoint.step,
            "worker_dead": dead, "state_after_kill": state}
    out["kill"] = kill
    if state != "interrupted":
        kill["why"] = f"the run shows '{state}' after the kill, not 'interrupted'"
        return out
    proc = start_cli(job, ["resume", run_dir.name], "resume")
    try:
        kill["resume_exit"] = follow(job, proc, watch, deadline)
    finally:
        end_process(proc)
    after, _ = read_events(run_dir / EVENTS_FILE, offset)
    said = [m.group(1).rstrip(",;") for e in after if isinstance(e, PhaseEvent) and e.phase == "train"
            for m in [RESUMING_FROM.search(e.message)] if m]
    kill["resume_said"] = said[0] if said else ""
    kill["resumed_from"] = read_run_info(run_dir).resumed_from
    return out


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def run_cell(job: CellJob) -> dict[str, Any]:
    """Run one cell to its end (or its timeout); the row for the report, read from the run folder."""
    job.home.mkdir(parents=True, exist_ok=True)
    watch = WorkerWatch(job.nvml)
    started = time.monotonic()
    row: dict[str, Any] = {}
    try:
        row.update((run_with_kill if job.kill else run_plain)(job, watch, started + job.timeout_s))
    except CellTimeout:
        row["timed_out"] = True
    finally:
        kill_worker(worker_pid(find_run_dir(job.home)))  # never leave a worker holding the card
    row["wall_s"] = round(time.monotonic() - started, 1)
    row["nvml_worker_peak_gib"] = None if watch.worker_peak is None else watch.worker_peak / GIB
    row["nvml_device_peak_gib"] = None if watch.device_peak is None else watch.device_peak / GIB
    run_dir = find_run_dir(job.home)
    if run_dir is not None:
        row.update(read_results(run_dir))
    else:  # the CLI refused before it made a run folder
        row["state"] = "not started"
        row["cli_error"] = last_error_line(cli_output(job, "train"))
    row["outcome"] = classify(row)
    return row


def last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error") or "Error" in line]
    return (errors or lines or ["no output"])[-1][:300]


# ---------------------------------------------------------------- what the run folder says

def read_results(run_dir: Path) -> dict[str, Any]:
    """The report's facts about a run, from run.json, events.jsonl and recipe.toml."""
    raw = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    events, _ = read_events(run_dir / EVENTS_FILE)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    warnings = [e for e in events if isinstance(e, WarningEvent)]
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    steps = [e for e in events if isinstance(e, StepEvent)]
    fits = [e.message for e in events if isinstance(e, PhaseEvent) and e.phase == "fit"]
    fit_peaks = [float(m.group(1)) for text in fits for m in [FIT_PEAK.search(text)] if m]
    step_peaks = [e.vram_peak_mb for e in steps if e.vram_peak_mb is not None]
    return {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "state": shown_state(read_run_info(run_dir)),
        "end_message": raw.get("message", ""),
        "backend": raw.get("backend", ""),
        "backend_reason": raw.get("backend_reason", ""),
        "backend_failures": raw.get("backend_failures") or {},
        "autofit": list(raw.get("autofit") or []),
        "autofit_warnings": dedupe(w.message for w in warnings if w.message.startswith("auto-fit")),
        "warnings": dedupe(w.message for w in warnings if not w.message.startswith("auto-fit")),
        "fit_messages": fits,
        "fit_peak_gib": max(fit_peaks) if fit_peaks else None,
        "phase_peaks_gib": raw.get("phase_peaks_gib") or None,
        "step_peak_gib": max(step_peaks) / 1024 if step_peaks else None,
        "steps_done": steps[-1].step if steps else 0,
        "total_steps": raw.get("total_steps", 0),
        "error": ({"kind": errors[-1].kind, "message": errors[-1].message, "advice": errors[-1].advice}
                  if errors else None),
        "micro_batch": recipe.train.micro_batch,  # the batch in effect: an OOM's shrink is written to recipe.toml
        "grad_accum": recipe.train.grad_accum,
        "seq_len": recipe.data.seq_len,
        "eval_batch": raw.get("eval_batch") or None,
        "oom_shrinks": len(raw.get("oom_shrinks") or []),
        "adapter_saved": (run_dir / "adapter").is_dir(),
        "batching": batching_of(raw.get("packing") or {}),
    }


def batching_of(packing: dict[str, Any]) -> str:
    """How the run's rows became batches, from run.json ``packing`` (the engine writes it for length groups
    and packed bins): a cell's fit is only evidence for the batching it ran."""
    from tui_finetune.core.recipe import LENGTH_GROUPS, PACKED_BINS, PADDED_ROWS
    from tui_finetune.data.packing import PackedBins

    if not packing:
        return PADDED_ROWS
    bins = PackedBins.from_dict(packing)
    if bins is None:
        return f"unknown (run.json packing unreadable: {packing})"
    kind = LENGTH_GROUPS if bins.kind == "grouped" else PACKED_BINS
    return f"{kind}: {bins.rows} rows in {bins.bins} of <= {bins.seq_len} tokens, {bins.bins_per_step} a step"


def dedupe(messages: Any) -> list[str]:
    return list(dict.fromkeys(messages))


def classify(row: dict[str, Any]) -> str:
    """One word for the table. A refusal is an OOM error before training: ``measured`` when the fit-check
    ran out of memory, ``estimate`` when the planner refused before loading (issue 11 wants only the first)."""
    if row.get("timed_out"):
        return "timeout"
    state, error = row.get("state", ""), row.get("error") or {}
    if state == "completed":
        return "completed"
    if error.get("kind") == "oom":
        message = error.get("message", "")
        if "fit-check" in message:
            return "refused (measured)"
        if "planner" in message and not row.get("steps_done"):
            return "refused (estimate)"
        return "OOM"
    if state == "not started":
        return "refused by the CLI"
    return state or "failed"
