"""A recipe against the machine it runs on: what can't work here (refused with the fix), and the
``auto`` precisions this machine resolves to. ``MachineFacts`` carries what that needs to know about
the device (core/hardware.py builds it from the hardware report, the engine from torch), so this
stays plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tui_finetune.core.recipe import RecipeError, RecipeSpec

FULL_FINETUNE_MAX_PARAMS = 600e6
"""Full fine-tuning keeps fp32 master weights and two Adam states: only tiny models fit a hobby card."""


@dataclass(frozen=True)
class MachineFacts:
    """What ``check_recipe_fits_machine`` needs to know about the device, without importing torch."""

    has_cuda: bool
    supports_bf16: bool
    bitsandbytes_ok: bool = True
    device_name: str = "CPU"


def check_recipe_fits_machine(recipe: RecipeSpec, machine: MachineFacts, model_params: float | None) -> None:
    """Refuse recipes that can't work on this machine, with the fix in the message."""
    if recipe.method == "qlora" and not machine.has_cuda:
        raise RecipeError("method = 'qlora' needs an NVIDIA GPU (bitsandbytes 4-bit runs on CUDA): "
                          "use method = 'lora' on the CPU, or run on a machine with a GPU")
    if recipe.method == "qlora" and not machine.bitsandbytes_ok:
        raise RecipeError("method = 'qlora' needs bitsandbytes, which is not working here: "
                          "run 'tui-finetune doctor' to see why, or use method = 'lora'")
    for key, value in (("train.precision", recipe.train.precision), ("quant.compute_dtype", recipe.quant.compute_dtype)):
        if value == "bf16" and not machine.supports_bf16:
            raise RecipeError(f"{key} = 'bf16' but {machine.device_name} has no bf16 support: "
                              "use 'fp16' or 'auto'")
        if value == "fp16" and not machine.has_cuda:
            raise RecipeError(f"{key} = 'fp16' on the CPU is slow and unstable: use 'fp32' or 'auto'")
    if recipe.train.optimizer != "adamw_torch" and not machine.has_cuda:
        raise RecipeError(f"train.optimizer = '{recipe.train.optimizer}' needs a CUDA GPU (bitsandbytes): "
                          "use 'adamw_torch' on the CPU")
    if recipe.method == "full" and model_params is not None and model_params > FULL_FINETUNE_MAX_PARAMS:
        raise RecipeError(f"method = 'full' is only for tiny models (under {FULL_FINETUNE_MAX_PARAMS / 1e6:.0f}M "
                          f"parameters); this one has {model_params / 1e9:.1f}B: use 'lora' or 'qlora'")


def resolve_precision(recipe: RecipeSpec, machine: MachineFacts) -> RecipeSpec:
    """Replace ``auto`` precisions with what this machine should use."""
    best = "bf16" if machine.supports_bf16 else ("fp16" if machine.has_cuda else "fp32")
    train = replace(recipe.train, precision=best if recipe.train.precision == "auto" else recipe.train.precision)
    quant = replace(recipe.quant, compute_dtype=best if recipe.quant.compute_dtype == "auto" else recipe.quant.compute_dtype)
    return replace(recipe, train=train, quant=quant)
