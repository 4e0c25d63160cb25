"""Our TrainerCallbacks: live events, stop requests, wall-clock checkpoints, sealing checkpoints, the trace.

Trainer keeps the loop (DESIGN.md); these hooks only observe it and set ``control`` flags, so the
loop's behaviour (gradient accumulation, resume, evaluation) stays Trainer's own. Trainer calls them on
every rank of a multi-GPU run: what must be decided together (stop, save) is agreed over the ranks
(engine/distributed.py), and only rank 0 seals checkpoints or writes events.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tui_finetune.core.events import CheckpointEvent, EvalEvent, EventLog, StepEvent, WarningEvent
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.run_folder.checkpoints import clear_staging, finalize_checkpoint, rotate_checkpoints, write_json_atomic
from tui_finetune.core.run_folder.layout import RUN_STATE, STAGING
from tui_finetune.core.run_folder.resume import checkpoint_state
from tui_finetune.engine import distributed
from tui_finetune.engine.faults import fault_point
from tui_finetune.engine.vram_figures import read_vram


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_rss_mb() -> tuple[float | None, float | None]:
    """This process's resident memory now and at its peak, in MB: what a CPU run costs the machine's RAM.

    Linux reads ``/proc/self/statm``; elsewhere psutil when installed, else only the peak from
    ``resource`` (POSIX). None where neither is available (Windows without psutil)."""
    now = peak = None
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    except (ImportError, OSError):
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import psutil

            now = psutil.Process().memory_info().rss / 2**20
        except ImportError:
            pass
    if now is not None and (peak is None or peak < now):
        peak = now
    return now, peak


class EventsCallback(TrainerCallback):
    """Turns Trainer's logs into ``step`` and ``eval`` events with speed, ETA and VRAM."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self._start_time = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_tokens = 0
        self.eval_steps: list[int] = []
        """The steps evaluated so far, in this process."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object) -> None:
        self._start_time = self._last_time = time.time()
        self._start_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kw: object) -> None:
        logs = logs or {}
        if "eval_loss" in logs:
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "eval_loss"}
            self.log.emit(EvalEvent(step=state.global_step, eval_loss=_float(logs["eval_loss"]), metrics=metrics))
            self.eval_steps.append(state.global_step)
        if "loss" not in logs:
            return
        now = time.time()
        tokens = state.num_input_tokens_seen
        tokens_per_s = (tokens - self._last_tokens) / (now - self._last_time) if now > self._last_time and tokens else None
        self._last_time, self._last_tokens = now, tokens
        done = state.global_step - self._start_step
        elapsed = now - self._start_time
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        vram = read_vram()
        rank_peaks = distributed.gather_from_ranks(vram.peak_mb or 0.0) if args.world_size > 1 else None
        rss, rss_peak = read_rss_mb()
        self.log.emit(StepEvent(
            step=state.global_step, total_steps=state.max_steps, epoch=float(state.epoch or 0.0),
            loss=_float(logs.get("loss")), lr=_float(logs.get("learning_rate")), grad_norm=_float(logs.get("grad_norm")),
            tokens_per_s=tokens_per_s, eta_s=eta, elapsed_s=elapsed,
            vram_reserved_mb=vram.reserved_mb, vram_peak_mb=vram.peak_mb,
            nvml_used_mb=vram.nvml_used_mb, nvml_total_mb=vram.nvml_total_mb, rss_mb=rss, rss_peak_mb=rss_peak,
            rank_vram_peak_mb=rank_peaks if vram.peak_mb is not None else None))


class RunFolderGone(SystemExit):
    """The run folder was deleted under a running worker: nobody can see or resume this run, so it ends
    at once. A SystemExit, so the worker's failure handling (which writes into the folder) is skipped."""


class StopCallback(TrainerCallback):
    """Ends training cleanly on a stop request, saving a checkpoint first; also saves every N minutes.
    Exits the worker when its run folder has been deleted (checked every micro-batch, so within a
    step's time, rather than training on for the rest of the run)."""

    def __init__(self, stop_requested: Callable[[], bool], every_minutes: float) -> None:
        self.stop_requested = stop_requested
        self.every_s = every_minutes * 60.0
        self._last_save = time.time()
        self.stopped_at: int | None = None

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kw: object) -> None:
        exit_if_run_folder_gone(args)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object) -> None:
        exit_if_run_folder_gone(args)
        due = self.every_s > 0 and time.time() - self._last_save >= self.every_s
        stop, due = distributed.any_rank(self.stop_requested(), due)  # every rank stops and saves at the same step
        if due:
            control.should_save = True
        if stop:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object) -> None:
        self._last_save = time.time()


def exit_if_run_folder_gone(args: TrainingArguments) -> None:
    """Trainer's output folder is ``RUN/checkpoints/.staging``: no RUN, no run."""
    run_dir = Path(args.output_dir).parents[1]
    if not run_dir.is_dir():
        print(f"the run folder {run_dir} was deleted: stopping this worker", file=sys.stderr, flush=True)
        raise RunFolderGone(3)


class SealCheckpointCallback(TrainerCallback):
    """After Trainer writes ``.staging/checkpoint-N``, add ``run_state.json``, seal it as ``step-NNNNNN``,
    clear leftovers of earlier crashed saves, and rotate old checkpoints."""

    def __init__(self, checkpoints_dir: Path, keep_last: int, log: EventLog, recipe: RecipeSpec,
                 data_hash: str) -> None:
        self.checkpoints_dir = checkpoints_dir
        self.keep_last = keep_last
        self.log = log
        self.recipe = recipe
        self.data_hash = data_hash
        self.last_sealed: Path | None = None

    def _warn(self, message: str) -> None:
        self.log.emit(WarningEvent(message=message, advice="close programs that may hold the folder open"))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object) -> None:
        distributed.barrier()  # every rank's files (its RNG state) are in the staging folder
        if args.process_index == 0:
            self._seal(args, state)
        distributed.barrier()  # and every rank sees the sealed checkpoint (the OOM rule resumes from it)

    def _seal(self, args: TrainingArguments, state: TrainerState) -> None:
        step = state.global_step
        staged = self.checkpoints_dir / STAGING / f"checkpoint-{step}"
        if not staged.is_dir():
            return
        eval_loss = next((_float(e["eval_loss"]) for e in reversed(state.log_history)
                          if "eval_loss" in e and e.get("step") == step), None)
        write_json_atomic(staged / RUN_STATE, checkpoint_state(self.recipe, self.data_hash, step, eval_loss))
        final = finalize_checkpoint(staged, self.checkpoints_dir, step, fault_point)  # fault_point: test hook
        self.last_sealed = final
        clear_staging(self.checkpoints_dir, warn=self._warn)
        rotate_checkpoints(self.checkpoints_dir, self.keep_last, known_good=final, warn=self._warn)
        self.log.emit(CheckpointEvent(step=step, path=str(final)))
        fault_point("after-save", step)  # fault injection for tests (engine/faults.py)


class StepHooksCallback(TrainerCallback):
    """The per-step test hooks: the trace of what each step saw, and an injected death before the save."""

    def __init__(self) -> None:
        self.trainer: object | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object) -> None:
        write_trace = getattr(self.trainer, "write_trace", None)
        if write_trace:
            write_trace()
        fault_point("step", state.global_step)
