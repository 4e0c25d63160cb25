"""Which checkpoint a resume continues from, and whether the run may continue from it.

The worker takes the newest complete and valid checkpoint (``find_resume_checkpoint``), saying why it
passed over a broken one; the UI and ``runs`` say where a resume would start without hashing anything
(``resume_step``).

A resume is only exact if it trains the same model on the same data with the same recipe. Each
checkpoint therefore carries ``run_state.json``: the recipe in effect when it was saved (an OOM's
smaller micro-batch included, as the run's recipe.toml has it) and the data hash. Before resuming, the
worker and the ``resume`` command compare the run's recipe.toml with that record and refuse on a
difference, showing it (core.recipe.recipe_diff), unless ``--force``. The batch is compared as the
effective batch: an OOM after the checkpoint may have split it differently (4 x 2 -> 2 x 4), which
trains the same rows with the same maths, as OOM recovery does within one worker. On length groups and
packed bins the split counts too (``batch_difference``). Another number of GPUs (``train.devices``) is
always a change: each step's rows are dealt out differently.
Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui_finetune.core.fit_levers import shrinks_to
from tui_finetune.core.recipe import LENGTH_GROUPS, PADDED_ROWS, RecipeSpec, recipe_diff
from tui_finetune.core.run_folder.checkpoints import (
    CheckpointCheck, CheckpointError, check_checkpoint, list_checkpoints, read_run_state)
from tui_finetune.core.run_folder.info import run_recipe_from_dict
from tui_finetune.core.run_folder.layout import CHECKPOINT_MARKER, CHECKPOINTS_DIR, step_dir_name, step_of


@dataclass
class ResumeChoice:
    """The checkpoint to resume from (None: start fresh) and the broken ones passed over."""

    path: Path | None
    skipped: list[CheckpointCheck] = field(default_factory=list)

    def messages(self) -> list[str]:
        """One line per skipped checkpoint: ``step-000400 is incomplete (...); resuming from step-000300``."""
        target = f"resuming from {self.path.name}" if self.path else "no valid checkpoint before it"
        return [f"{bad.path.name} is incomplete ({bad.reason}); {target}" for bad in self.skipped]


def find_resume_checkpoint(checkpoints_dir: Path, from_step: int | None = None) -> ResumeChoice:
    """The newest complete and valid checkpoint (or exactly ``from_step``'s), and the broken ones skipped.

    ``from_step`` 0 means start afresh. A named step that is missing or broken raises CheckpointError.
    """
    paths = list_checkpoints(checkpoints_dir)
    if from_step is not None:
        if from_step == 0:
            return ResumeChoice(None)
        named = checkpoints_dir / step_dir_name(from_step)
        if named not in paths:
            have = ", ".join(str(step_of(p)) for p in paths) or "none"
            raise CheckpointError(f"there is no checkpoint at step {from_step} (checkpoints at steps: {have})")
        check = check_checkpoint(named)
        if not check.ok:
            raise CheckpointError(f"{named.name} is incomplete ({check.reason}): pick another with --from STEP")
        return ResumeChoice(named)
    skipped = []
    for path in reversed(paths):
        check = check_checkpoint(path)
        if check.ok:
            return ResumeChoice(path, skipped)
        skipped.append(check)
    return ResumeChoice(None, skipped)


def resume_step(run_dir: Path) -> int | None:
    """The step a resume continues from: the newest sealed checkpoint, or None when it would start over.

    Read from the folder names and their completion markers only (the worker also checks every file's
    hash, and passes over a damaged checkpoint with a warning), so the UI and the CLI can say what a
    resume will do without torch, the engine or hashing gigabytes."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    steps = [step_of(p) for p in folder.iterdir() if step_of(p) >= 0 and (p / CHECKPOINT_MARKER).is_file()]
    return max(steps, default=None)


IGNORED_PREFIXES = ("checkpoint.", "eval.", "description", "memory.backend", "memory.offload_activations",
                    "memory.embeddings_on_cpu", "memory.mlp_chunk_tokens", "memory.loss_chunk_tokens",
                    "memory.chunked_loss", "memory.attention", "train.gradient_checkpointing",
                    "memory.layers_keeping_activations")
"""Keys a resume may change freely: how often to save or evaluate does not change what is learnt, and neither do
the kernels or the memory techniques that compute the same maths (``memory.adapter_dtype`` and the
fp32 upcast change precision, so they still count). Gradient checkpointing recomputes the same forward
with the RNG state it had (dropout included), so it is such a technique too, and so is which layers it
covers (``memory.layers_keeping_activations``). The worker's advice after
a backend failure, ``--set memory.backend=universal``, and the out-of-memory advice's
``--set train.gradient_checkpointing=true`` must not get the resume refused."""


DEVICES_NOTE = (" (another number of GPUs: each step's rows are dealt out differently, so the data order changes, "
                "and the effective batch is micro_batch x grad_accum x devices)")
"""A resume on another number of GPUs can't be exact, so it counts as a change: refused without --force."""


def checkpoint_state(recipe: RecipeSpec, data_hash: str, step: int, eval_loss: float | None) -> dict[str, Any]:
    """The body of ``run_state.json`` for a checkpoint saved at ``step``: ``recipe`` is the one in effect
    (an OOM's smaller micro-batch is in it, the one Trainer used, and ``train.devices``, the ranks that
    saved it), so the batch has one home here too."""
    return {"step": step, "model": recipe.model, "data_hash": data_hash, "eval_loss": eval_loss,
            "recipe": recipe.to_dict()}


BATCH_KEYS = ("train.micro_batch", "train.grad_accum")
"""Compared as their product, the effective batch (``batch_difference``), not one by one."""


def batch_difference(then: RecipeSpec, now: RecipeSpec) -> list[str]:
    """The effective batch's change in words, or nothing when the product is the same. Another number of
    GPUs is left to its own ``train.devices`` line (``DEVICES_NOTE``), which says the batch changes too.

    On length groups or packed bins the split matters as well: a group holds micro_batch x the longest
    row's tokens, and a step holds a fixed number of bins that the micro-batch must divide, so another
    split makes other groups or another step size. Only a smaller micro-batch that the OOM shrink rule
    reaches (``shrinks_to``: what recovery does, and what its advice after giving up asks for) passes;
    the rest of that epoch is then not exact, as docs/design.md's Loop section says."""
    if then.device_count != now.device_count:
        return []
    if then.effective_batch != now.effective_batch:
        keys = "train.micro_batch x train.grad_accum" + (" x train.devices" if now.device_count > 1 else "")
        return [f"effective batch ({keys}): {_split(then)} = {then.effective_batch} -> {_split(now)} = "
                f"{now.effective_batch}"]
    micro_then, micro_now = then.train.micro_batch, now.train.micro_batch
    if then.data.batching == PADDED_ROWS or micro_now == micro_then or shrinks_to(micro_then, micro_now):
        return []
    why = ("a group holds micro_batch x the longest row's tokens: other groups, so other rows every step"
           if then.data.batching == LENGTH_GROUPS else "a step's bins must divide into micro-batches of it")
    return [f"train.micro_batch: {micro_then} -> {micro_now} (on {then.data.batching} {why}; only halving it "
            "to a divisor, as OOM recovery does, keeps the same run)"]


def _split(recipe: RecipeSpec) -> str:
    devices = f" x {recipe.device_count}" if recipe.device_count > 1 else ""
    return f"{recipe.train.micro_batch} x {recipe.train.grad_accum}{devices}"


def resume_differences(checkpoint: Path, recipe: RecipeSpec, data_hash: str | None = None) -> list[str]:
    """``key: then -> now`` for each change since ``checkpoint`` was saved (recipe, effective batch, model,
    data); ``recipe`` is the run's recipe.toml as it is now, with the batch in effect."""
    state = read_run_state(checkpoint)
    if not state.get("recipe"):
        return []
    then = run_recipe_from_dict(state["recipe"], f"{checkpoint.name}/run_state.json")
    diffs = [line + (DEVICES_NOTE if line.startswith("train.devices:") else "")
             for line in recipe_diff(then, recipe) if not line.startswith(IGNORED_PREFIXES + BATCH_KEYS)]
    diffs += batch_difference(then, recipe)
    if data_hash and state.get("data_hash") and data_hash != state["data_hash"]:
        diffs.append(f"data hash: {state['data_hash'][:12]} -> {data_hash[:12]} (the data file changed)")
    return diffs


def refusal_message(checkpoint: Path, diffs: list[str], run_id: str) -> str:
    lines = "\n".join(f"  {line}" for line in diffs)
    return (f"the run changed since {checkpoint.name} was saved:\n{lines}\n"
            f"resuming would not continue the same training. Undo the change, or pass --force "
            f"('tui-finetune resume {run_id} --force') to resume with it anyway")
