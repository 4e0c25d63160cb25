"""Which (model, method, sequence length) to suggest for a card, ranked, with the reason for each.

The wizard's model list, the colour of each option and ``tui-finetune plan`` all come from here,
and all of it from the planner's estimate. ``plan_recipe`` is the one verdict on a whole recipe
(estimate, fit, headroom, advice) that ``plan --recipe`` and the wizard's recipe and launch screens show. A suggestion that says "fits" keeps a safety margin of
the card free, so that it must never OOM.
Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from tui_finetune.core.advice import MemoryTip, fit_advice, fitting_tips
from tui_finetune.core.catalog import CATALOG, ModelSpec
from tui_finetune.core.devices import DATA_PARALLEL_NOTE
from tui_finetune.core.hardware import GpuInfo
from tui_finetune.core.model_shape import resolve_model_spec
from tui_finetune.core.planner import (
    GIB,
    EMBEDDINGS_STAY_NOTE,
    LEAN,
    SAFETY_MARGIN,
    TIGHT_MARGIN,
    EngineProfile,
    PlanCase,
    VramEstimate,
    embedding_params_on_cpu,
    estimate_peak_vram,
    profile_from_memory,
)
from tui_finetune.core.recipe import RecipeSpec

FITS, TIGHT, WONT_FIT = "fits", "tight", "won't fit"
NO_CARD = "cpu"
"""The verdict where there is no card to plan against (training runs on the CPU)."""
FIT_COLOURS = {FITS: "green", TIGHT: "yellow", WONT_FIT: "red", NO_CARD: "cyan"}
"""A verdict's colour, in ``tui-finetune plan`` and in the wizard alike."""
SEQ_CHOICES = (4096, 2048, 1024, 512)
MIN_USEFUL_SEQ = 512
"""Shorter sequences cut most instruction examples short: below this we don't suggest a model."""


@dataclass(frozen=True)
class CardSpec:
    """The card to plan for: its memory, what others already hold on it, and bf16 support."""

    total_gib: float
    used_by_others_gib: float = 0.0
    supports_bf16: bool = True
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.total_gib:g} GB card"

    @property
    def usable_gib(self) -> float:
        return self.total_gib - self.used_by_others_gib


def card_from_gpu(gpu: GpuInfo) -> CardSpec:
    """The card to plan for from a detected GPU: what other programs hold on it counts against it."""
    return CardSpec(total_gib=gpu.total_bytes / GIB, used_by_others_gib=gpu.other_process_bytes / GIB,
                    supports_bf16=gpu.supports_bf16, name=gpu.name)


def classify_fit(estimate: VramEstimate, card: CardSpec) -> str:
    """fits: the safety margin stays free; tight: under the card but inside the margin; else won't fit."""
    need = estimate.total_gib
    if need <= card.usable_gib - SAFETY_MARGIN * card.total_gib:
        return FITS
    if need <= card.usable_gib - TIGHT_MARGIN * card.total_gib:
        return TIGHT
    return WONT_FIT


@dataclass(frozen=True)
class Suggestion:
    model: ModelSpec
    case: PlanCase
    estimate: VramEstimate
    fit: str
    reason: str

    @property
    def method(self) -> str:
        return self.case.method

    @property
    def seq_len(self) -> int:
        return self.case.seq_len


def _reason(case: PlanCase, estimate: VramEstimate, card: CardSpec, fit: str) -> str:
    biggest, size = estimate.describe()[0]
    headroom = card.usable_gib - estimate.total_gib
    what = {"qlora": "4-bit QLoRA", "lora": "16-bit LoRA", "full": "full fine-tune"}[case.method]
    if fit == WONT_FIT:
        return (f"{what} at {case.seq_len} tokens needs {estimate.total_gib:.1f} GiB, "
                f"{-headroom:.1f} GiB more than {card.label} has free; largest part: {biggest} {size:.1f} GiB")
    return (f"{what} at {case.seq_len} tokens: {estimate.total_gib:.1f} GiB of {card.usable_gib:.1f} GiB free, "
            f"{headroom:.1f} GiB headroom; largest part: {biggest} {size:.1f} GiB")


def plan_case(case: PlanCase, card: CardSpec, profile: EngineProfile = LEAN) -> Suggestion:
    """Estimate one case on one card and explain it."""
    estimate = estimate_peak_vram(case, profile)
    fit = classify_fit(estimate, card)
    return Suggestion(case.model, case, estimate, fit, _reason(case, estimate, card, fit))


def best_option_for_model(model: ModelSpec, card: CardSpec, profile: EngineProfile = LEAN) -> Suggestion:
    """The best way to train this model on this card: the longest sequence that fits, LoRA over QLoRA
    when 16-bit weights fit at 2048 tokens or more (faster, no quantization error), else QLoRA."""
    dtype = "bf16" if card.supports_bf16 else "fp16"
    tried: list[Suggestion] = []
    for method in ("lora", "qlora"):
        for seq in SEQ_CHOICES:
            if seq > model.max_position:
                continue
            option = plan_case(PlanCase(model, method=method, seq_len=seq, compute_dtype=dtype), card, profile)
            tried.append(option)
            if option.fit == FITS and (method == "qlora" or seq >= 2048):
                return option
    fitting = [t for t in tried if t.fit != WONT_FIT and t.seq_len >= MIN_USEFUL_SEQ]
    if fitting:
        return max(fitting, key=lambda t: (t.fit == FITS, t.seq_len))
    return min(tried, key=lambda t: t.estimate.total)


def suggest(card: CardSpec, models: Iterable[ModelSpec] | None = None, profile: EngineProfile = LEAN,
            include_unfit: bool = False) -> list[Suggestion]:
    """Rank models for a card: those that fit first, the largest (most capable) model first,
    then longer sequences."""
    options = [best_option_for_model(m, card, profile) for m in (models or CATALOG.values())]
    if not include_unfit:
        options = [o for o in options if o.fit != WONT_FIT]
    order = {FITS: 0, TIGHT: 1, WONT_FIT: 2}
    return sorted(options, key=lambda o: (order[o.fit], -o.model.published_params, -o.seq_len))


@dataclass(frozen=True)
class RecipePlan:
    """A whole recipe's estimate against the card, and what to try when it won't fit."""

    estimate: VramEstimate
    fit: str
    """fits / tight / won't fit, or ``NO_CARD`` when there is no card to plan against."""
    headroom_gib: float | None
    reason: str = ""
    tips: tuple[MemoryTip, ...] = ()
    """When it won't fit: the single changes the planner says make it fit."""

    def advice(self, settings: bool = True) -> str:
        """The tips in words (with their ``--set`` options unless ``settings`` is False)."""
        return fit_advice(self.tips, settings) if self.fit == WONT_FIT else ""


def _plan_case_of(recipe: RecipeSpec, card: CardSpec | None) -> tuple[PlanCase, EngineProfile]:
    """The planner's case for a recipe; a card without bf16 is planned in fp16, as the engine trains on it."""
    case = PlanCase.from_recipe(resolve_model_spec(recipe.model), recipe)
    if card is not None and not card.supports_bf16 and case.compute_dtype == "bf16":
        case = replace(case, compute_dtype="fp16")
    return case, profile_from_memory(recipe.memory)


WORKER_BASE_RAM_GIB = 0.8
"""The CPU worker's RAM besides the training tensors: Python, torch, transformers, the tokenizer and the
data. Calibrated on the demo (tui-finetune train demo-cpu on a 2-core machine; see estimate_cpu_ram_gib)."""


def estimate_cpu_ram_gib(recipe: RecipeSpec, longest_row_tokens: int | None = None) -> float:
    """A CPU run's peak RAM (the worker's RSS) in GiB: the planner's tensors without the CUDA context and
    the allocator's slack (the CPU has neither), plus the worker itself. A batch is padded to its longest
    row, not to ``seq_len``, so the data's longest row (from the data check) sizes the logits when known;
    with ``data.packing`` a bin holds up to ``seq_len`` tokens of rows, so it is ``seq_len`` again; a length group
    (``data.group_by_length``) holds at most micro_batch x the longest row padded, so the longest row still sizes it."""
    case, profile = _plan_case_of(recipe, None)
    profile = replace(profile, input_embedding_on_cpu=False)  # on the CPU, RAM holds the embedding either way
    if longest_row_tokens and not recipe.data.packing:  # packed, a micro-batch fills seq_len with rows
        case = replace(case, seq_len=max(1, min(case.seq_len, int(longest_row_tokens))))
    estimate = estimate_peak_vram(case, profile)
    tensors = estimate.total - estimate.parts.get("cuda_context", 0.0) - estimate.parts.get("slack", 0.0)
    return tensors / GIB + WORKER_BASE_RAM_GIB


def plan_recipe(recipe: RecipeSpec, card: CardSpec | None) -> RecipePlan:
    """The planner's verdict on ``recipe`` for ``card`` (None: no card, training on the CPU)."""
    case, profile = _plan_case_of(recipe, card)
    if card is None:
        return RecipePlan(estimate_peak_vram(case, profile), NO_CARD, None)
    option = plan_case(case, card, profile)

    def fits(changed: RecipeSpec) -> bool:
        changed_case, changed_profile = _plan_case_of(changed, card)
        return plan_case(changed_case, card, changed_profile).fit != WONT_FIT

    tips = tuple(fitting_tips(recipe, fits)) if option.fit == WONT_FIT else ()
    reason = option.reason
    if recipe.memory.embeddings_on_cpu and not embedding_params_on_cpu(case, profile):
        reason += "; " + EMBEDDINGS_STAY_NOTE
    if recipe.train.devices != 1:  # several GPUs: the same verdict per card, and no promise of more room
        reason += f"; planned per card, because {DATA_PARALLEL_NOTE} (no FSDP)"
    return RecipePlan(option.estimate, option.fit, card.usable_gib - option.estimate.total_gib, reason, tips)
