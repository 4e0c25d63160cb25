"""Precision rules of the loader: fp32 and no bitsandbytes on the CPU, bf16 or fp16 by card, fp32 adapters under fp16."""

from __future__ import annotations

import pytest
import torch

from tui_finetune.core.recipe import RecipeError, RecipeSpec
from tui_finetune.engine.loading import DeviceFacts, adapter_compute_dtype, compute_dtype, quantization_config

CPU = DeviceFacts(False, False, "CPU")
AMPERE = DeviceFacts(True, True, "RTX 3060")
TURING = DeviceFacts(True, False, "RTX 2060")


def test_cpu_trains_in_fp32_and_refuses_qlora():
    assert compute_dtype(RecipeSpec(model="m", method="lora"), CPU) == torch.float32
    assert quantization_config(RecipeSpec(model="m", method="lora"), CPU) is None
    with pytest.raises(RecipeError, match="NVIDIA GPU"):
        quantization_config(RecipeSpec(model="m", method="qlora"), CPU)


@pytest.mark.parametrize("device, dtype", [(AMPERE, torch.bfloat16), (TURING, torch.float16)])
def test_auto_picks_bf16_where_the_card_has_it(device, dtype):
    recipe = RecipeSpec(model="m", method="qlora")
    assert compute_dtype(recipe, device) == dtype
    config = quantization_config(recipe, device)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == dtype


def test_adapters_stay_fp32_under_fp16_because_the_grad_scaler_needs_it():
    recipe = RecipeSpec(model="m", method="lora")
    assert adapter_compute_dtype(recipe, TURING) == torch.float32
    assert adapter_compute_dtype(recipe, AMPERE) == torch.bfloat16
