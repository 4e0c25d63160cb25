"""Time in words for the UI: a rough epoch time for the launch screen, and durations (ETA, checkpoint age).

Textual-free and torch-free.
"""

from __future__ import annotations

from tui_finetune.core.model_shape import resolve_model_spec
from tui_finetune.core.recipe import RecipeSpec

GPU_EFFECTIVE_FLOPS = 15e12
"""A mid-range RTX card at about a third of its bf16 peak: good enough for a 'rough' epoch time."""
CPU_EFFECTIVE_FLOPS = 0.1e12


def rough_epoch_seconds(recipe: RecipeSpec, tokens_per_epoch: float, on_gpu: bool) -> float:
    """Forward + backward is ~6 FLOPs a parameter a token, ~8 with recomputation; 4-bit adds dequantizing."""
    spec = resolve_model_spec(recipe.model)
    per_token = (8 if recipe.train.gradient_checkpointing else 6) * spec.published_params
    if recipe.method == "qlora":
        per_token *= 1.3
    return per_token * tokens_per_epoch / (GPU_EFFECTIVE_FLOPS if on_gpu else CPU_EFFECTIVE_FLOPS)


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
