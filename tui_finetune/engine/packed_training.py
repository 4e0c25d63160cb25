"""A run's training rows in bins (flat ``data.packing`` or length groups ``data.group_by_length``,
data/packing.py), and the step size that goes with them.

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

Length groups are the exception to that fixed size: their budget is the recipe's micro-batch times the
longest row, so an OOM that halves the micro-batch halves the budget, and the groups are rebuilt and the
step size chosen again (engine/training_loop.py) before training goes on from the last checkpoint; from
then on a resume rebuilds those groups and reuses that step size.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tui_finetune.core.events import EventLog, PhaseEvent
from tui_finetune.core.recipe import DataSpec, RecipeSpec
from tui_finetune.core.run_folder.info import read_run_info, update_run_info
from tui_finetune.data.packing import (
    PackedBins, bins_per_step, describe_grouping, describe_packing, group_budget, group_dataset, pack_dataset)


def trains_on_bins(data: DataSpec) -> bool:
    """The training rows go into bins: flat (``packing``) or length groups (``group_by_length``)."""
    return data.packing or data.group_by_length


def pack_training_data(run_dir: Path, data: Any, recipe: RecipeSpec, log: EventLog) -> Any:
    """``data`` (prepare.PreparedData) with its training rows in bins (``data.packing``: flat bins of
    ``data.seq_len`` tokens; else groups of ``group_budget`` padded tokens), ``packing`` set and the rows kept
    in ``train_rows``; the evaluation rows stay rows (their loss averages per batch, as without bins). Called
    again on data already in bins (after an OOM halved a grouped run's budget), it bins its rows anew. A
    recipe that trains on plain rows gets ``data`` as it is."""
    if not trains_on_bins(recipe.data):
        return data
    rows = data.train_rows if data.packing is not None else data.train
    grouped = not recipe.data.packing
    if grouped:
        longest = max((int(n) for n in rows["length"]), default=recipe.data.seq_len)
        bins, packed = group_dataset(rows, group_budget(recipe.train.micro_batch, recipe.data.seq_len, longest),
                                     recipe.train.seed)
    else:
        bins, packed = pack_dataset(rows, recipe.data.seq_len, recipe.train.seed)
    micro = 1 if grouped else recipe.train.micro_batch  # grouped: one group a micro-batch
    recorded = PackedBins.from_dict(read_run_info(run_dir).packing or {})
    if (recorded is not None and recorded.same_bins(packed) and recorded.effective_batch == recipe.effective_batch
            and recorded.bins_per_step > 0 and recorded.bins_per_step % micro == 0):
        step = recorded.bins_per_step
    else:
        step = bins_per_step(recipe.effective_batch, recipe.device_count, micro, packed.rows_per_bin)
    packed = replace(packed, effective_batch=recipe.effective_batch, bins_per_step=step)
    update_run_info(run_dir, packing=packed.to_dict())
    line = (describe_grouping(packed, recipe.train.grad_accum, recipe.device_count) if grouped else
            describe_packing(packed, micro, recipe.train.grad_accum, recipe.device_count))
    log.emit(PhaseEvent(phase="tokenize", message=line))
    return replace(data, train=bins, packing=packed, train_rows=rows)


def trainer_recipe(recipe: RecipeSpec, packed: PackedBins | None) -> RecipeSpec:
    """The recipe the Trainer runs: as it is; with flat bins the accumulation of bins (the micro-batch, in
    effect after any OOM shrink, then counts bins); with groups one group a micro-batch and
    ``bins_per_step`` of them a step (the recipe's micro-batch is in the groups' budget)."""
    if packed is None:
        return recipe
    micro = 1 if packed.kind == "grouped" else recipe.train.micro_batch
    return replace(recipe, train=replace(recipe.train, micro_batch=micro, grad_accum=packed.accumulation(micro)))


def describe_bins_a_step(recipe: RecipeSpec, packed: PackedBins | None) -> str:
    """``, packed: micro-batch 1 bin x accumulation 5 (about 16 rows)`` for the train phase's line; '' without bins."""
    if packed is None:
        return ""
    rows = packed.bins_per_step * recipe.device_count * packed.rows_per_bin
    if packed.kind == "grouped":
        return (f", grouped: 1 group of <= {packed.seq_len} padded tokens a micro-batch x accumulation "
                f"{packed.accumulation(1)} (about {rows:.0f} rows)")
    return (f", packed: micro-batch {recipe.train.micro_batch} bin(s) x accumulation "
            f"{packed.accumulation(recipe.train.micro_batch)} (about {rows:.0f} rows)")
