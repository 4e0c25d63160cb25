"""Layers that keep their activations (``memory.layers_keeping_activations``): the same training maths, and
the memory the planner charges for each of them."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch.autograd.graph import saved_tensors_hooks

from tui_finetune.core.catalog import model_spec_from_config
from tui_finetune.core.planner import kept_layer_bytes
from tui_finetune.core.recipe import MemorySpec
from tui_finetune.engine.memory_techniques import (
    keep_activations, layers_keeping_activations, prepare_for_training, set_adapter_dtype)

SEQ = 128


def config_dict(model_type: str) -> dict:
    """A small model of a real architecture, wide enough that per-token widths dominate what a layer keeps."""
    return dict(model_type=model_type, num_hidden_layers=3, hidden_size=512, intermediate_size=2048,
                num_attention_heads=8, num_key_value_heads=8 if model_type == "phi" else 2, head_dim=64,
                vocab_size=256, tie_word_embeddings=False, max_position_embeddings=512)


def lora_model(config: dict, kept: int, adapter_dtype: str, dtype=torch.bfloat16, dropout: float = 0.0):
    """The engine's preparation (checkpointing on, ``kept`` layers keeping theirs) and peft LoRA on every linear."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config), dtype=dtype,
                                                          attn_implementation="sdpa")
    memory = MemorySpec(adapter_dtype=adapter_dtype, layers_keeping_activations=kept)
    model = prepare_for_training(model, memory, True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    set_adapter_dtype(model, memory, dtype)
    return model.train()


def saved_bytes(model, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward, the parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids)
    return sum(kept.values())


@pytest.mark.parametrize("model_type", ["llama", "phi", "gemma"])
@pytest.mark.parametrize("adapter_dtype", ["fp32", "compute"])
def test_each_kept_layer_holds_what_the_planner_charges_for_it(model_type, adapter_dtype):
    config = config_dict(model_type)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    measured = (saved_bytes(lora_model(config, 2, adapter_dtype), ids)
                - saved_bytes(lora_model(config, 0, adapter_dtype), ids)) / 2 / SEQ
    spec = model_spec_from_config(config, "small")
    # a kept layer holds everything; a recomputing one only its input, one hidden-state copy
    planned = kept_layer_bytes(spec, 2, "fp32" if adapter_dtype == "fp32" else "bf16") - spec.hidden_size * 2
    assert measured > 10 * spec.hidden_size * 2  # far more than the one copy a recomputing layer keeps
    assert planned == pytest.approx(measured, rel=0.10)


def test_kept_layers_train_the_same_as_recomputed_ones_dropout_included():
    config = config_dict("llama")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    results = []
    for kept in (0, 2, 3):
        model = lora_model(config, kept, "fp32", dtype=torch.float32, dropout=0.1)
        recomputing = [m.gradient_checkpointing for m in model.modules()
                       if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)]
        assert recomputing == [index < 3 - kept for index in range(3)]  # the last ones keep theirs
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, grads0), *others = results
    for loss, grads in others:
        assert torch.equal(loss, loss0)
        assert grads.keys() == grads0.keys() and all(torch.allclose(grads[n], grads0[n], atol=1e-6) for n in grads)


def test_keep_activations_leaves_a_model_without_checkpointing_alone():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config_dict("llama")))
    assert keep_activations(model, 2) == 0
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_every_layer_may_keep_its_activations_and_still_be_turned_back():
    model = lora_model(config_dict("llama"), 5, "fp32", dtype=torch.float32)  # more than the 3 layers it has
    assert layers_keeping_activations(model) == 3
    assert keep_activations(model, 0) == 0 and layers_keeping_activations(model) == 0
    assert all(m.gradient_checkpointing for m in model.modules()
               if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer))


def test_only_the_decoders_layers_keep_their_activations_not_a_vision_towers():
    """AutoModelForCausalLM builds Gemma 3 with its vision tower, whose layers come first in ``modules()`` and
    never run in text training: keeping two of those would keep nothing."""
    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=300),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), mm_tokens_per_image=4)
    model = prepare_for_training(transformers.AutoModelForCausalLM.from_config(config),
                                 MemorySpec(layers_keeping_activations=2), True)
    flags = {name: module.gradient_checkpointing for name, module in model.named_modules()
             if isinstance(module, transformers.modeling_layers.GradientCheckpointingLayer)}
    assert {name for name, recomputes in flags.items() if not recomputes} == {
        "model.language_model.layers.1", "model.language_model.layers.2"}
    assert layers_keeping_activations(model) == 2
