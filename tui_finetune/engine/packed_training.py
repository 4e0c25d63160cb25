"""A run's training rows packed into bins (``data.packing``, data/packing.py), and the step size that goes with them.

The worker calls ``pack_training_data`` once its data is prepared (and again when a halved sequence
length tokenized it anew): the training dataset becomes the bins, the choice is announced as one event
line and recorded in run.json's ``packing``. The recipe keeps counting rows (recipe.toml, its effective
batch, the OOM shrink rule all stay as they are); the Trainer runs ``trainer_recipe``, whose micro-batch
counts bins and whose accumulation gives ``PackedBins.bins_per_step`` bins a step on each device.

Why ``bins_per_step`` is recorded rather than recomputed: after an OOM halves the micro-batch, the
recipe's row accumulation doubles, and the formula recomputed from the new values could round to another
number of bins a step; a resume would then skip other bins than those trained. Kept fixed (the
accumulation becomes ``bins_per_step // micro_batch``, exact, as each smaller micro-batch divides the one
before), a resume rebuilds the same bins (a pure function of the rows, ``seq_len`` and the seed), reads the
same step size and continues exactly. It is recomputed only when the bins or the effective batch differ
from the record (new data, a halved ``seq_len``, a forced change).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tui_finetune.core.events import EventLog, PhaseEvent
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.run_folder.info import read_run_info, update_run_info
from tui_finetune.data.packing import PackedBins, bins_per_step, describe_packing, pack_dataset


def pack_training_data(run_dir: Path, data: Any, recipe: RecipeSpec, log: EventLog) -> Any:
    """``data`` (prepare.PreparedData) with its training rows packed into bins of ``data.seq_len`` tokens and
    ``packing`` set; the evaluation rows stay rows (their loss averages per batch, as without packing)."""
    bins, packed = pack_dataset(data.train, recipe.data.seq_len, recipe.train.seed)
    micro = recipe.train.micro_batch
    recorded = PackedBins.from_dict(read_run_info(run_dir).packing or {})
    if (recorded is not None and recorded.same_bins(packed) and recorded.effective_batch == recipe.effective_batch
            and recorded.bins_per_step > 0 and recorded.bins_per_step % micro == 0):
        step = recorded.bins_per_step
    else:
        step = bins_per_step(recipe.effective_batch, recipe.device_count, micro, packed.rows_per_bin)
    packed = replace(packed, effective_batch=recipe.effective_batch, bins_per_step=step)
    update_run_info(run_dir, packing=packed.to_dict())
    log.emit(PhaseEvent(phase="tokenize", message=describe_packing(packed, micro, recipe.train.grad_accum,
                                                                   recipe.device_count)))
    return replace(data, train=bins, packing=packed)


def trainer_recipe(recipe: RecipeSpec, packed: PackedBins | None) -> RecipeSpec:
    """The recipe the Trainer runs: as it is, or with packing the accumulation of bins (the micro-batch,
    in effect after any OOM shrink, then counts bins)."""
    if packed is None:
        return recipe
    return replace(recipe, train=replace(recipe.train, grad_accum=packed.accumulation(recipe.train.micro_batch)))


def describe_bins_a_step(recipe: RecipeSpec, packed: PackedBins | None) -> str:
    """``, packed: micro-batch 1 bin x accumulation 5 (about 16 rows)`` for the train phase's line; '' unpacked."""
    if packed is None:
        return ""
    rows = packed.bins_per_step * recipe.device_count * packed.rows_per_bin
    return (f", packed: micro-batch {recipe.train.micro_batch} bin(s) x accumulation "
            f"{packed.accumulation(recipe.train.micro_batch)} (about {rows:.0f} rows)")
