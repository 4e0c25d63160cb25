"""The worker's two memory checks before training, on CUDA only: auto-fit, then the fit-check.

* ``auto_fit_run``, before the model loads on a fresh run: the planner's estimate against the free
  VRAM (core/autofit.py). Changed values go into the run's recipe.toml, so a resume trains with the
  same ones; each change is a warning event with the ``--set`` that pins it, and the list is kept in
  run.json (``autofit``). When nothing fits the run fails at once, as an OOM, with the advice.
* ``fit_check_run``, once the model and the data are ready: one forward and backward pass on the
  longest batch with the backend's loss (engine/fitcheck.py), holding as much VRAM as the optimizer
  states will take, and a ``fit`` phase event with the measured peak. An OOM there shrinks the
  micro-batch through run.json, as the OOM recovery does (the effective batch stays); at
  micro-batch 1 a fresh run's sequence length is halved in recipe.toml and the worker tokenizes
  again. Auto-fit never shortens sequences itself: it warns, and this check measures.

The orchestration lives here so that worker.py stays a readable setup / train / save.
No torch at import time: the worker imports this module before it knows the device.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tui_finetune.core.autofit import auto_fit
from tui_finetune.core.catalog import UnknownModelError
from tui_finetune.core.events import EventLog, PhaseEvent, WarningEvent
from tui_finetune.core.model_source import resolve_model_spec
from tui_finetune.core.planner import GIB, OPTIMIZER_STATE_BYTES, profile_from_memory
from tui_finetune.core.recipe import MachineFacts, RecipeSpec, resolve_precision
from tui_finetune.core.runs import read_run_info, update_run_info, write_run_recipe


class FitRefused(Exception):
    """The run can't fit the card: the message says by how much, ``advice`` what to change."""

    def __init__(self, message: str, advice: str) -> None:
        super().__init__(message)
        self.advice = advice


def split_change(change: str) -> tuple[str, str]:
    """(what changed, the ``--set`` options) of one auto-fit sentence."""
    what, _, options = change.rpartition(": --set ")
    return (what, f"to keep this value: --set {options}") if what else (change, "")


def _record(run_dir: Path, log: EventLog, changes: list[str]) -> None:
    for change in changes:
        message, advice = split_change(change)
        log.emit(WarningEvent(message=f"auto-fit: {message}", advice=advice))
    update_run_info(run_dir, autofit=list(read_run_info(run_dir).autofit) + changes)


def free_vram_bytes() -> int:
    """Free memory on the current CUDA device, as the driver reports it (other programs excluded)."""
    import torch

    return int(torch.cuda.mem_get_info()[0])


def auto_fit_run(run_dir: Path, recipe: RecipeSpec, model: str, free_bytes: float, log: EventLog,
                 backend: str = "", machine: MachineFacts | None = None) -> RecipeSpec:
    """Fit a fresh run's recipe to ``free_bytes`` of VRAM; returns the recipe to train with.

    ``model`` is what ``resolve_model_spec`` reads: the downloaded folder, or a catalog key. The whole
    CUDA context is counted against the free figure although ours has started: the cuBLAS workspace
    and kernels still come, and erring toward fitting is the promise. ``backend``: the one
    ``backends.expected_backend`` says will load, so the planner models it. ``machine``: where
    ``auto`` precisions resolve (on a card without bf16 the engine keeps adapters fp32, so that saver
    can't help there). An unchanged recipe is returned as it was. Raises FitRefused.
    """
    try:
        spec = resolve_model_spec(model)
    except UnknownModelError as err:
        log.emit(WarningEvent(message=f"auto-fit skipped: the model's shape is unknown ({err})",
                              advice="the fit-check on the longest batch still runs before training"))
        return recipe
    def profile_for(memory: Any) -> Any:  # the planner models the backend that will load (engine/backends.py)
        return profile_from_memory(replace(memory, backend=backend or memory.backend))

    original, recipe = recipe, resolve_precision(recipe, machine) if machine else recipe
    decision = auto_fit(recipe, spec, free_bytes, profile_for=profile_for, shorten_sequences=False)
    if not decision.fits:
        # Only a shorter sequence would fit the estimate. The planner leans high and a shorter sequence
        # truncates data, so the fit-check measures first and shortens only on a real OOM. A run that
        # doesn't fit even at the shortest sequence is refused now, before minutes of loading.
        shortest = auto_fit(recipe, spec, free_bytes, profile_for=profile_for)
        if not shortest.fits:
            update_run_info(run_dir, autofit=shortest.changes)
            raise FitRefused(f"this recipe can't fit the {free_bytes / GIB:.1f} GiB of free VRAM: the planner "
                             f"estimates {shortest.before.total_gib:.1f} GiB as it is, "
                             f"{shortest.after.total_gib:.1f} GiB at the smallest settings auto-fit may choose",
                             shortest.advice)
        log.emit(WarningEvent(
            message=f"auto-fit: the planner expects {decision.after.total_gib:.1f} GiB against {free_bytes / GIB:.1f} "
                    "GiB free even after the changes below; the fit-check will measure the longest batch and "
                    "shorten the sequences only if it runs out of memory",
            advice=f"or start with shorter sequences: --set {' '.join(shortest.settings)}"))
    if not decision.changed:
        return original
    write_run_recipe(run_dir, decision.recipe)
    _record(run_dir, log, decision.changes)
    return decision.recipe


def fit_check_run(run_dir: Path, model: Any, backend: Any, recipe: RecipeSpec, train_data: Any, tokenizer: Any,
                  log: EventLog, *, fresh: bool) -> RecipeSpec:
    """Fit-check the longest batch; returns the recipe to train with (its ``data.seq_len`` may be shorter:
    then the data must be tokenized again). Raises FitRefused when even micro-batch 1 at the shortest
    sequence runs out of memory, or when a resumed run would need a shorter sequence."""
    from tui_finetune.data.collate import make_collator
    from tui_finetune.engine.fitcheck import fit_check_until_it_fits, longest_rows

    info = read_run_info(run_dir)
    micro, accum = info.micro_batch or recipe.train.micro_batch, info.grad_accum or recipe.train.grad_accum
    outcome = fit_check_until_it_fits(
        model, lambda m, batch: backend.loss(m, batch, recipe.memory), longest_rows(train_data, micro),
        make_collator(tokenizer, recipe.data.packing), micro_batch=micro, grad_accum=accum,
        seq_len=recipe.data.seq_len, hold_bytes=optimizer_state_bytes(model, recipe.train.optimizer))
    if not outcome.fits:
        raise FitRefused(f"CUDA out of memory in the fit-check even at micro-batch 1 x {outcome.seq_len} tokens: "
                         f"{outcome.error}", "a smaller model, QLoRA (--set method=qlora) or closing other programs "
                         "that use the GPU; 'tui-finetune plan' shows what fits your card")
    if outcome.seq_len != recipe.data.seq_len and not fresh:
        raise FitRefused(f"CUDA out of memory in the fit-check at micro-batch 1 x {recipe.data.seq_len} tokens, and "
                         "a resumed run can't change its sequence length", f"start a new run with --set "
                         f"data.seq_len={outcome.seq_len}, or free GPU memory and resume again")
    if outcome.changes:
        _record(run_dir, log, outcome.changes)
    if (outcome.micro_batch, outcome.grad_accum) != (micro, accum):
        update_run_info(run_dir, micro_batch=outcome.micro_batch, grad_accum=outcome.grad_accum)
    if outcome.seq_len != recipe.data.seq_len:
        recipe = replace(recipe, data=replace(recipe.data, seq_len=outcome.seq_len))
        write_run_recipe(run_dir, recipe)
    log.emit(PhaseEvent(phase="fit", message=fit_message(outcome)))
    return recipe


def optimizer_state_bytes(model: Any, optimizer: str) -> int:
    """What the optimizer's states will take once it first steps (the planner's bytes per trainable
    parameter); the fit-check holds this much while it runs, since it never steps."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(trainable * OPTIMIZER_STATE_BYTES.get(optimizer, 8.0))


def fit_message(outcome: Any) -> str:
    """The fit phase's line: the batch checked, its measured peak and its time."""
    result = outcome.result
    peak = ""
    if result.peak_reserved_bytes is not None:
        peak = (f": peak {result.peak_reserved_bytes / GIB:.2f} GiB reserved "
                f"({result.peak_allocated_bytes / GIB:.2f} GiB allocated)")
    return (f"the longest batch fits ({outcome.micro_batch} example(s) in {result.rows} x "
            f"{result.tokens // max(result.rows, 1)} tokens){peak}; forward and backward in {result.seconds:.1f}s")
