"""The lean memory path: chunked loss equals the plain loss, and the no-upcast preparation."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from tui_finetune.core.recipe import MemorySpec
from tui_finetune.engine.lean import (
    chunked_causal_lm_loss,
    is_checkpointing,
    lean_causal_lm_loss,
    prepare_for_training,
    set_adapter_dtype,
)


def tiny_llama(dtype=torch.float32, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    return LlamaForCausalLM(config).to(dtype)


def batch(vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 37), generator=g)
    labels = input_ids.clone()
    labels[0, :10] = -100  # a masked prompt
    labels[1, 30:] = -100  # padding
    return input_ids, labels


@pytest.mark.parametrize("chunk", [0, 7, 16, 1000])
@pytest.mark.parametrize("num_items", [None, 50])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk, num_items):
    model = tiny_llama()
    input_ids, labels = batch()
    hidden = model.model(input_ids=input_ids).last_hidden_state
    h1 = hidden.detach().clone().requires_grad_(True)
    h2 = hidden.detach().clone().requires_grad_(True)

    plain = ForCausalLMLoss(model.lm_head(h1), labels, vocab_size=300, num_items_in_batch=num_items)
    plain.backward()
    plain_head_grad = model.lm_head.weight.grad.clone()
    model.lm_head.weight.grad = None

    chunked = chunked_causal_lm_loss(h2, model.lm_head, labels, chunk_tokens=chunk, num_items_in_batch=num_items)
    chunked.backward()
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(model.lm_head.weight.grad, plain_head_grad, atol=1e-5, rtol=1e-5)


def test_lean_loss_through_the_model_equals_the_models_own_loss():
    model = tiny_llama()
    input_ids, labels = batch()
    expected = model(input_ids=input_ids, labels=labels).loss
    got = lean_causal_lm_loss(model, {"input_ids": input_ids, "labels": labels}, MemorySpec(loss_chunk_tokens=8))
    assert torch.allclose(got, expected, atol=1e-5)


def test_final_logit_softcapping_is_applied_like_gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=300, final_logit_softcapping=5.0,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    input_ids, labels = batch()
    expected = model(input_ids=input_ids, labels=labels).loss
    got = lean_causal_lm_loss(model, {"input_ids": input_ids, "labels": labels}, MemorySpec(loss_chunk_tokens=16))
    assert torch.allclose(got, expected, atol=1e-5)


def test_all_masked_labels_give_zero_loss_not_nan():
    model = tiny_llama()
    input_ids, _ = batch()
    labels = torch.full_like(input_ids, -100)
    hidden = model.model(input_ids=input_ids).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=8)
    assert loss.item() == 0.0


def test_no_upcast_keeps_16_bit_weights_and_freezes_the_base():
    model = tiny_llama(torch.bfloat16)
    prepare_for_training(model, MemorySpec(upcast_frozen_fp32=False), gradient_checkpointing=True)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert is_checkpointing(model)


def test_upcast_switch_gives_the_baseline_fp32_parts():
    model = tiny_llama(torch.bfloat16)
    prepare_for_training(model, MemorySpec(upcast_frozen_fp32=True), gradient_checkpointing=True)
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_adapter_dtype_follows_the_recipe():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(torch.bfloat16)
    prepare_for_training(model, MemorySpec(), gradient_checkpointing=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    set_adapter_dtype(peft_model, MemorySpec(adapter_dtype="compute"), torch.bfloat16)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    set_adapter_dtype(peft_model, MemorySpec(adapter_dtype="fp32"), torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in trainable)
    # And a training step through the lean loss reaches the adapters with checkpointing on.
    input_ids, labels = batch()
    loss = lean_causal_lm_loss(peft_model, {"input_ids": input_ids, "labels": labels}, MemorySpec())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
