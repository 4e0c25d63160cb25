"""After training, where nothing may cost the adapter: the save, then the phases the adapter doesn't need.

A run on a 4 GB card that trained for three hours and then ran out of memory in its final
evaluation, losing the adapter and failing the same way on every resume, is the worst thing this
product could do. So the worker saves the adapter first (``save_adapter``, falling back to the final
checkpoint's copy of it after a CUDA OOM), and runs evaluation and the before/after samples through
``run_optional_phase``: any failure there is a warning, kept in run.json, and a resumed run skips the
phase instead of failing the same way again. Every phase's measured VRAM peak goes into run.json
(``phase_peaks_gib``, ``record_peak``): the evidence that each phase, not only the training step,
fits the card.
"""

from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

from tui_finetune.core.events import EventLog, PhaseEvent, WarningEvent, first_line
from tui_finetune.core.run_folder.info import mark_phase_failed, read_run_info, update_run_info
from tui_finetune.core.run_folder.layout import ADAPTER_DIR, CHECKPOINTS_DIR
from tui_finetune.core.run_folder.resume import find_resume_checkpoint
from tui_finetune.engine.faults import raise_injected_oom
from tui_finetune.engine.vram_figures import phase_peak_gib, reset_phase_peak
from tui_finetune.engine.training import free_cuda_memory, is_oom

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
"""What peft writes for an adapter: in ``adapter/``, and in every checkpoint (Trainer saves the peft model)."""
PHASES = {"sample-before": "sample", "eval": "eval", "sample-after": "sample"}
"""The optional phases (their run.json key: the phase event's name)."""


def save_adapter(run_dir: Path, model: Any, tokenizer: Any, log: EventLog) -> None:
    """Write ``adapter/``, complete or not at all (written beside it, then renamed into place). After a
    CUDA OOM the final checkpoint's copy of the same adapter goes there instead."""
    target = run_dir / ADAPTER_DIR
    partial = run_dir / (ADAPTER_DIR + ".partial")
    log.emit(PhaseEvent(phase="save", message=f"writing the adapter to {target}"))
    shutil.rmtree(partial, ignore_errors=True)
    reset_phase_peak()
    try:
        raise_injected_oom("save")  # fault injection for tests (engine/faults.py); nothing unless one asks
        model.save_pretrained(partial, safe_serialization=True)
    except Exception as err:
        final = find_resume_checkpoint(run_dir / CHECKPOINTS_DIR).path
        if not is_oom(err) or final is None:
            raise
        free_cuda_memory()
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name in ADAPTER_FILES:
            shutil.copy2(final / name, partial / name)
        log.emit(WarningEvent(message=f"CUDA out of memory while saving the adapter ({first_line(err)}): "
                                      f"copied the same adapter from {final.name} instead"))
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    record_peak(run_dir, "save")


def run_optional_phase(run_dir: Path, log: EventLog, key: str, what: str, run: Callable[[], Any]) -> None:
    """Run a phase the adapter doesn't need. Any failure, an OOM above all, becomes a warning and the
    run goes on; it is kept in run.json (``failed_phases``), and a resumed run skips the phase. So does
    one whose worker died during it: ``phase_running`` stays set, and the next worker counts it failed."""
    failed = read_run_info(run_dir).failed_phases
    if key in failed:
        log.emit(WarningEvent(message=f"skipped {what}: it failed in an earlier attempt ({failed[key]})"))
        return
    log.emit(PhaseEvent(phase=PHASES[key], message=what))
    update_run_info(run_dir, phase_running=key)
    reset_phase_peak()
    try:
        run()
    except Exception as err:  # noqa: BLE001 - the adapter is safe; nothing here may fail the run
        traceback.print_exc()
        free_cuda_memory()
        why = ("CUDA out of memory: " if is_oom(err) else f"{type(err).__name__}: ") + first_line(err)
        mark_phase_failed(run_dir, key, why)
        log.emit(WarningEvent(message=f"skipped {what}: {why}",
                              advice="the adapter is saved; the traceback is in worker.log"))
    finally:
        update_run_info(run_dir, phase_running="")
    record_peak(run_dir, key)


def record_peak(run_dir: Path, phase: str, peak_bytes: int | None = None) -> None:
    """Keep a phase's measured VRAM peak in run.json (``phase_peaks_gib``); nothing on the CPU.
    ``peak_bytes`` when the phase measured it itself, else torch's peak since ``reset_phase_peak``."""
    peak = round(peak_bytes / 1024**3, 3) if peak_bytes is not None else phase_peak_gib()
    if peak is not None:
        update_run_info(run_dir, phase_peaks_gib={**read_run_info(run_dir).phase_peaks_gib, phase: peak})
