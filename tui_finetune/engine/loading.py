"""Load the base model for training: 4-bit for QLoRA, bf16/fp16 for LoRA on a GPU, fp32 on the CPU; then LoRA.

The memory techniques (no fp32 upcast, adapter dtype, checkpointing) come from engine/memory_techniques.py, which
the planner models; this module only decides dtypes and wires them together.

The precision rules live here so the worker and the tests agree: bitsandbytes is never imported on
the CPU, ``trust_remote_code`` stays off unless the recipe turns it on, and the compute dtype is
bf16 where the card has it, else fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_finetune.core.recipe import RecipeError, RecipeSpec
from tui_finetune.core.recipe_machine import MachineFacts

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class DeviceFacts:
    """What this process can train on, read from torch (the worker has torch; core does not)."""

    has_cuda: bool
    supports_bf16: bool
    name: str

    def machine(self, bitsandbytes_ok: bool = True) -> MachineFacts:
        return MachineFacts(has_cuda=self.has_cuda, supports_bf16=self.supports_bf16,
                            bitsandbytes_ok=bitsandbytes_ok, device_name=self.name)


def detect_device() -> DeviceFacts:
    if torch.cuda.is_available():
        return DeviceFacts(True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    return DeviceFacts(False, False, "CPU")


def compute_dtype(recipe: RecipeSpec, device: DeviceFacts) -> torch.dtype:
    """The dtype of the frozen weights (LoRA) or of the 4-bit matmuls (QLoRA)."""
    if not device.has_cuda:
        return torch.float32
    wanted = recipe.quant.compute_dtype if recipe.method == "qlora" else recipe.train.precision
    if wanted == "auto":
        wanted = "bf16" if device.supports_bf16 else "fp16"
    return DTYPES.get(wanted, torch.float32)


def quantization_config(recipe: RecipeSpec, device: DeviceFacts) -> Any | None:
    """BitsAndBytesConfig for QLoRA (nf4, double quant); None for LoRA, full, and always on the CPU."""
    if recipe.method != "qlora":
        return None
    if not device.has_cuda:
        raise RecipeError("method = 'qlora' needs an NVIDIA GPU: use method = 'lora' on the CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=recipe.quant.quant_type,
        bnb_4bit_use_double_quant=recipe.quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(recipe, device))


def load_tokenizer(folder: Path, recipe: RecipeSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=recipe.trust_remote_code)
    if tokenizer.pad_token is None:  # many base models ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_model_kwargs(recipe: RecipeSpec, device: DeviceFacts) -> dict[str, Any]:
    """``from_pretrained``'s dtype, quantization and attention for the recipe on ``device``, without the
    device map (benchmarks/step_ops.py loads with a GPU's dtypes on the CPU)."""
    kwargs: dict[str, Any] = {"dtype": compute_dtype(recipe, device), "trust_remote_code": recipe.trust_remote_code,
                              "attn_implementation": recipe.memory.attention}
    quant = quantization_config(recipe, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def load_base_model(folder: Path, recipe: RecipeSpec, device: DeviceFacts) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = base_model_kwargs(recipe, device)
    if device.has_cuda:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    model.config.use_cache = False  # the KV cache only costs memory while training
    return model


def add_lora(model: Any, recipe: RecipeSpec, device: DeviceFacts) -> Any:
    """Freeze the base and set up checkpointing (engine/memory_techniques.py), wrap it in peft LoRA, and move
    the input embedding to CPU RAM where ``memory.embeddings_on_cpu`` asks (engine/embedding_offload.py: a
    tied one stays)."""
    from peft import LoraConfig, get_peft_model

    from tui_finetune.engine.memory_techniques import prepare_for_training, set_adapter_dtype

    if recipe.method == "full":
        return model
    # The micro-batch in effect: the worker reads the run's recipe.toml, where an OOM's smaller one is written.
    # A shrink later in this process only makes batches shorter, and auto chunking decides per batch.
    model = prepare_for_training(model, recipe.memory, recipe.train.gradient_checkpointing,
                                 seq_len=recipe.data.seq_len * recipe.train.micro_batch)
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=recipe.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    set_adapter_dtype(peft_model, recipe.memory, adapter_compute_dtype(recipe, device))
    if recipe.memory.embeddings_on_cpu:
        from tui_finetune.engine.embedding_offload import move_input_embedding_to_cpu

        move_input_embedding_to_cpu(peft_model)
    return peft_model


def adapter_compute_dtype(recipe: RecipeSpec, device: DeviceFacts) -> torch.dtype:
    """The dtype ``memory.adapter_dtype = "compute"`` means: fp16 training (cards without bf16, such as
    the RTX 20 series) keeps adapters fp32, because the fp16 grad scaler refuses to unscale fp16 gradients."""
    dtype = compute_dtype(recipe, device)
    return torch.float32 if dtype == torch.float16 else dtype


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as packed by bitsandbytes; an input embedding
    in CPU RAM counts too."""
    from tui_finetune.engine.embedding_offload import offloaded_parameters

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in offloaded_parameters(model))
    return trainable, total
