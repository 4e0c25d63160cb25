"""What a checkpoint remembers of its run, and whether a resume may continue from it.

A resume is only exact if it trains the same model on the same data with the same recipe. Each
checkpoint therefore carries ``run_state.json``: the recipe as the run had it, the data hash, and the
effective micro-batch and accumulation (an OOM may have shrunk the micro-batch). Before resuming, the
worker and the ``resume`` command compare the run as it is now with that record and refuse on a
difference, showing it (core.recipe.recipe_diff), unless ``--force``. Plain Python: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tui_finetune.core.recipe import RecipeSpec, recipe_diff, recipe_from_dict
from tui_finetune.engine.checkpoints import read_run_state

IGNORED_PREFIXES = ("checkpoint.", "eval.", "description", "memory.backend", "memory.offload_activations",
                    "memory.mlp_chunk_tokens", "memory.loss_chunk_tokens", "memory.chunked_loss", "memory.attention")
"""Keys a resume may change freely: how often to save or evaluate does not change what is learnt, and neither do
the kernels or the memory techniques that compute the same maths (``memory.adapter_dtype`` and the
fp32 upcast change precision, so they still count). The worker's advice after a backend failure,
``--set memory.backend=universal``, must not get the resume refused."""


DEVICES_NOTE = (" (another number of GPUs: each step's rows are dealt out differently, so the data order changes, "
                "and the effective batch is micro_batch x grad_accum x devices)")
"""A resume on another number of GPUs can't be exact, so it counts as a change: refused without --force."""


def checkpoint_state(recipe: RecipeSpec, data_hash: str, micro_batch: int, grad_accum: int, step: int,
                     eval_loss: float | None, world_size: int = 1) -> dict[str, Any]:
    """The body of ``run_state.json`` for a checkpoint saved at ``step`` by ``world_size`` ranks."""
    effective = micro_batch * grad_accum * world_size
    return {"step": step, "model": recipe.model, "data_hash": data_hash, "micro_batch": micro_batch,
            "grad_accum": grad_accum, "world_size": world_size, "effective_batch": effective, "eval_loss": eval_loss,
            "recipe": recipe.to_dict()}


def resume_differences(checkpoint: Path, recipe: RecipeSpec, data_hash: str | None = None) -> list[str]:
    """``key: then -> now`` for each change since ``checkpoint`` was saved (recipe, model, data)."""
    state = read_run_state(checkpoint)
    if not state.get("recipe"):
        return []
    then = recipe_from_dict(state["recipe"], f"{checkpoint.name}/run_state.json")
    diffs = [line + (DEVICES_NOTE if line.startswith("train.devices:") else "")
             for line in recipe_diff(then, recipe) if not line.startswith(IGNORED_PREFIXES)]
    if data_hash and state.get("data_hash") and data_hash != state["data_hash"]:
        diffs.append(f"data hash: {state['data_hash'][:12]} -> {data_hash[:12]} (the data file changed)")
    return diffs


def refusal_message(checkpoint: Path, diffs: list[str], run_id: str) -> str:
    lines = "\n".join(f"  {line}" for line in diffs)
    return (f"the run changed since {checkpoint.name} was saved:\n{lines}\n"
            f"resuming would not continue the same training. Undo the change, or pass --force "
            f"('tui-finetune resume {run_id} --force') to resume with it anyway")
