"""What to try when a recipe doesn't fit: one list of memory-saving changes, in words and as ``--set``.

``memory_tips`` reads a recipe's own numbers and returns each single change that lowers its memory:
a shorter sequence (never below ``MIN_SEQ_LEN``), micro-batch 1 with the accumulation that keeps the
effective batch, gradient checkpointing, QLoRA, a smaller LoRA rank. Three places show advice and all
build it here:

- the planner's verdict (``tui-finetune plan``, the wizard; core/suggest.py ``plan_recipe``):
  ``fitting_tips`` keeps only the changes the planner says fit, through a ``fits`` callback, and for
  the sequence the longest halving that fits; ``fit_advice`` words them;
- auto-fit when nothing fits (core/fit_levers.py): ``nothing_fits_advice``;
- a CUDA out-of-memory in the worker: ``memory_advice`` (unchecked: there is no card to check against).

``settings=False`` leaves out the ``--set`` options, for places that don't take them (the wizard).
Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from tui_finetune.core.planner import GIB, MIN_SEQ_LEN
from tui_finetune.core.recipe import RecipeSpec

PLAN_HINT = "'tui-finetune plan --recipe ...' shows what fits your card"
SMALLER_MODEL = "a smaller model ('tui-finetune plan' lists what fits this card)"
OTHER_PROGRAMS = "closing other programs that use the GPU"


@dataclass(frozen=True)
class MemoryTip:
    """One change that lowers memory: in words, as ``key=value`` settings, and the changed recipe."""

    words: str
    settings: tuple[str, ...]
    recipe: RecipeSpec

    def text(self, settings: bool = True) -> str:
        if not settings:
            return self.words
        return f"{self.words} (--set " + " --set ".join(self.settings) + ")"


def shorter_seq_len(seq_len: int) -> int | None:
    """Half the sequence length, never below ``MIN_SEQ_LEN``; None when it is at the floor already."""
    if seq_len <= MIN_SEQ_LEN:
        return None
    return max(seq_len // 2, MIN_SEQ_LEN)


def _with_seq(recipe: RecipeSpec, seq_len: int) -> MemoryTip:
    return MemoryTip(f"sequence length {seq_len}", (f"data.seq_len={seq_len}",),
                     replace(recipe, data=replace(recipe.data, seq_len=seq_len)))


def memory_tips(recipe: RecipeSpec) -> list[MemoryTip]:
    """Every single change that lowers this recipe's memory, the ones that cost least quality first."""
    t = recipe.train
    tips: list[MemoryTip] = []
    seq = shorter_seq_len(recipe.data.seq_len)
    if seq is not None:
        tips.append(_with_seq(recipe, seq))
    if t.micro_batch > 1:
        accum = t.grad_accum * t.micro_batch  # the same effective batch
        tips.append(MemoryTip(f"micro-batch 1 with accumulation {accum}",
                              ("train.micro_batch=1", f"train.grad_accum={accum}"),
                              replace(recipe, train=replace(t, micro_batch=1, grad_accum=accum))))
    if not t.gradient_checkpointing:
        tips.append(MemoryTip("gradient checkpointing on", ("train.gradient_checkpointing=true",),
                              replace(recipe, train=replace(t, gradient_checkpointing=True))))
    if recipe.method not in ("qlora", "full"):
        tips.append(MemoryTip("QLoRA, the base weights in 4 bits", ("method=qlora",),
                              replace(recipe, method="qlora")))
    if recipe.lora.r > 8 and recipe.method != "full":
        rank = recipe.lora.r // 2
        tips.append(MemoryTip(f"LoRA rank {rank}", (f"lora.r={rank}",),
                              replace(recipe, lora=replace(recipe.lora, r=rank))))
    return tips


def _longest_fitting_seq(recipe: RecipeSpec, fits: Callable[[RecipeSpec], bool]) -> MemoryTip | None:
    """The longest halving of the sequence that fits (not just the first); the shortest when none does."""
    tip = None
    seq = shorter_seq_len(recipe.data.seq_len)
    while seq is not None:
        tip = _with_seq(recipe, seq)
        if fits(tip.recipe):
            return tip
        seq = shorter_seq_len(seq)
    return tip


def fitting_tips(recipe: RecipeSpec, fits: Callable[[RecipeSpec], bool]) -> list[MemoryTip]:
    """The single changes after which ``fits`` (the planner against a card) says the recipe fits."""
    tips = memory_tips(recipe)
    if tips and tips[0].settings[0].startswith("data.seq_len="):
        tips[0] = _longest_fitting_seq(recipe, fits) or tips[0]
    return [tip for tip in tips if fits(tip.recipe)]


def fit_advice(tips: Sequence[MemoryTip], settings: bool = True) -> str:
    """The planner's advice for a recipe that won't fit, from ``fitting_tips``."""
    if tips:
        return "To fit, try one of: " + "; ".join(tip.text(settings) for tip in tips) + "."
    return ("No single change makes it fit: combine a shorter sequence with QLoRA and micro-batch 1, "
            "or pick a smaller model.")


def memory_advice(recipe: RecipeSpec, settings: bool = True) -> str:
    """What to change after running out of memory, from the recipe's own numbers."""
    tips = [tip.text(settings) for tip in memory_tips(recipe)] or [SMALLER_MODEL]
    return "try " + "; or ".join(tips) + ". " + PLAN_HINT + "."


def nothing_fits_advice(recipe: RecipeSpec, need_bytes: float, budget_bytes: float) -> str:
    """Auto-fit's words when even its smallest recipe is over the free memory."""
    what = f"{recipe.method} at {recipe.data.seq_len} tokens x micro-batch {recipe.train.micro_batch}"
    tips = [tip.text() for tip in memory_tips(recipe)] + [SMALLER_MODEL, OTHER_PROGRAMS]
    return (f"even {what} needs about {need_bytes / GIB:.1f} GiB and only {max(budget_bytes, 0.0) / GIB:.1f} GiB "
            "is free: try " + "; or ".join(tips))
