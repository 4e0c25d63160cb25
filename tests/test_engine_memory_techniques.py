"""The lean memory path: chunked loss and chunked MLP equal the plain ones, and the no-upcast preparation."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from tui_finetune.core.planner import mlp_chunk_size
from tui_finetune.core.recipe import MemorySpec
from tui_finetune.engine.memory_techniques import (
    chunk_mlps,
    chunk_mlps_for,
    chunked_causal_lm_loss,
    decoder_mlps,
    enable_checkpointing,
    is_checkpointing,
    lean_causal_lm_loss,
    prepare_for_training,
    set_adapter_dtype,
)


def tiny_llama(dtype=torch.float32, seed=0, init_range=0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
                         initializer_range=init_range)
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


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_loss_gradients_reach_hidden_weight_and_bias_like_autograd(softcap):
    """Phi-2's lm_head has a bias; full fine-tuning trains the head: every gradient the fused
    function computes in its forward pass must equal autograd's through the plain loss."""
    torch.manual_seed(3)
    head = torch.nn.Linear(32, 300, bias=True)
    hidden = torch.randn(2, 37, 32)
    _, labels = batch()
    grads = []
    for fused in (False, True):
        head.zero_grad()
        h = hidden.clone().requires_grad_(True)
        if fused:
            loss = chunked_causal_lm_loss(h, head, labels, chunk_tokens=9, final_logit_softcapping=softcap)
        else:
            logits = head(h)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            loss = ForCausalLMLoss(logits, labels, vocab_size=300)
        (loss * 3.0).backward()  # a scaled loss, as the fp16 grad scaler makes it
        grads.append((loss.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    for plain, fused in zip(*grads):
        assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)


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


def _mlp_grads(model, embeds):
    """Loss, input gradient and parameter gradients of one forward and backward."""
    embeds = embeds.detach().clone().requires_grad_(True)
    loss = model(inputs_embeds=embeds).logits.float().pow(2).mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), embeds.grad, grads


def _assert_same(got, expected):
    loss, input_grad, grads = got
    assert torch.allclose(loss, expected[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(input_grad, expected[1], atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected[2].keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[2][name], atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("micro_batch", [1, 2])
@pytest.mark.parametrize("layer_checkpointing", [False, True])
def test_chunked_mlp_output_and_gradients_equal_the_whole_mlp(micro_batch, layer_checkpointing):
    # Weights large enough that a misplaced chunk moves the loss and gradients far past the tolerance.
    plain, chunked = tiny_llama(init_range=0.3), tiny_llama(init_range=0.3)
    for model in (plain, chunked):
        model.train()
        if layer_checkpointing:  # the engine's setting: the chunk checkpoints nest in the layer's
            enable_checkpointing(model)
    assert chunk_mlps(chunked, 5) == 2  # 37 or 74 tokens: chunks of 5 and a shorter last one
    embeds = torch.randn(micro_batch, 37, 32, generator=torch.Generator().manual_seed(3))
    _assert_same(_mlp_grads(chunked, embeds), _mlp_grads(plain, embeds))


def test_chunked_mlp_splits_batch_and_sequence_into_token_chunks():
    model = tiny_llama()
    chunk_mlps(model, 16)
    seen = []
    mlp = decoder_mlps(model)[0]
    original = mlp._unchunked_forward
    mlp._unchunked_forward = lambda x: seen.append(tuple(x.shape)) or original(x)
    with torch.no_grad():  # chunked without checkpoints: evaluation at long lengths gains too
        model(input_ids=batch()[0])
    assert seen == [(16, 32)] * 4 + [(10, 32)]  # 2 x 37 = 74 tokens


@pytest.mark.parametrize("patch_first", [True, False])
def test_chunked_mlp_runs_the_lora_layers_peft_wraps_before_or_after(patch_first):
    from peft import LoraConfig, get_peft_model

    def lora_model(chunk: bool):
        model = tiny_llama(init_range=0.3)
        if chunk and patch_first:
            prepare_for_training(model, MemorySpec(mlp_chunk_tokens=8), gradient_checkpointing=True)
        else:
            prepare_for_training(model, MemorySpec(mlp_chunk_tokens=-1), gradient_checkpointing=True)
        torch.manual_seed(7)  # the same random A and B in both, B non-zero so the adapters matter
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if chunk and not patch_first:
            chunk_mlps(peft_model, 8)
        return peft_model.train()

    plain, chunked = lora_model(False), lora_model(True)
    assert type(decoder_mlps(chunked)[0].gate_proj).__module__.startswith("peft")
    embeds = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(3))
    expected, got = _mlp_grads(plain, embeds), _mlp_grads(chunked, embeds)
    _assert_same(got, expected)
    assert any("mlp" in name and "lora_A" in name for name in got[2])  # the MLP's adapters learn


def test_chunked_mlp_saves_no_intermediate_activations():
    def saved_intermediate_elements(model) -> int:
        count = 0

        def pack(tensor):
            nonlocal count
            count += tensor.numel() if tensor.dim() and tensor.shape[-1] == 64 else 0  # intermediate_size
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=batch()[0]).logits.sum().backward()
        return count

    plain, chunked = tiny_llama(), tiny_llama()
    chunk_mlps(chunked, 16)
    assert saved_intermediate_elements(plain) >= 2 * 2 * 74 * 64  # gate and up outputs, at least, per layer
    assert saved_intermediate_elements(chunked) == 0  # only the chunks' inputs wait for the backward


def _cpu_peak_bytes(step) -> int:
    """Peak bytes the CPU allocator held during ``step``, from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_chunked_mlp_lowers_the_peak_of_a_checkpointed_layer():
    # An MLP-heavy model, as a 7B's is: the backward's recomputed (tokens x 2048) intermediates are the peak.
    config = LlamaConfig(hidden_size=64, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=2048)
    input_ids = torch.randint(0, 100, (1, 2048), generator=torch.Generator().manual_seed(0))
    peaks = []
    for chunk in (0, 256):
        model = LlamaForCausalLM(config).train()
        enable_checkpointing(model)
        if chunk:
            chunk_mlps(model, chunk)
        peaks.append(_cpu_peak_bytes(lambda: model(input_ids=input_ids).logits.sum().backward()))  # noqa: B023 - called at once, inside this iteration
    whole, chunked = peaks
    if whole == 0:
        pytest.skip("this torch's profiler records no CPU allocations")
    # Measured 71 MiB whole, 17 MiB in chunks: the nested checkpoints recompute one chunk at a time.
    assert chunked < 0.5 * whole


def test_auto_rule_chunks_only_long_batches():
    def patched(memory, seq_len):
        model = tiny_llama()
        prepare_for_training(model, memory, gradient_checkpointing=True, seq_len=seq_len)
        return [mlp.__dict__.get("_mlp_chunk_tokens") for mlp in decoder_mlps(model)]

    assert patched(MemorySpec(), 2048) == [None, None]  # short: the MLP is left alone
    assert patched(MemorySpec(), 40960) == [4096, 4096]
    assert patched(MemorySpec(mlp_chunk_tokens=-1), 40960) == [None, None]
    assert patched(MemorySpec(mlp_chunk_tokens=512), 2048) == [512, 512]
    assert mlp_chunk_size(0, 2048) == 0 and mlp_chunk_size(0, 40960) == 4096  # the planner agrees
    # Length unknown: patched, but a batch at or under the threshold still runs whole.
    model = tiny_llama()
    assert chunk_mlps_for(model, MemorySpec(), seq_len=0) == 2
    mlp = decoder_mlps(model)[0]
    assert mlp._mlp_chunk_above == 16384
    calls = []
    original = mlp._unchunked_forward
    mlp._unchunked_forward = lambda x: calls.append(x.shape) or original(x)
    model(input_ids=batch()[0])
    assert calls == [torch.Size([2, 37, 32])]


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_in_bf16_equals_the_plain_loss_and_syncs_the_host_once(softcap):
    """The GPU's dtypes (bf16 hidden states and head, fp32 logits): the fused chunks give transformers' loss
    and autograd's gradient, and the whole loss reads one value back to the host (the nonzero that drops
    the -100 tokens), none per chunk: on a fast card a sync per chunk stalled the launch-bound step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(5)
    head = torch.nn.Linear(32, 300, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 37, 32, dtype=torch.bfloat16)
    _, labels = batch()

    class Ops(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    h_fused, h_plain = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with Ops():
        fused = chunked_causal_lm_loss(h_fused, head, labels, chunk_tokens=9, final_logit_softcapping=softcap)
    logits = head(h_plain).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = ForCausalLMLoss(logits, labels, vocab_size=300)
    fused.backward()
    plain.backward()
    assert torch.allclose(fused, plain, rtol=1e-5)
    assert torch.allclose(h_fused.grad.float(), h_plain.grad.float(), atol=1e-3, rtol=1e-2)
    assert Ops.names.count("nonzero") == 1 and "_local_scalar_dense" not in Ops.names and "item" not in Ops.names


def test_chunked_loss_under_autocast_takes_bf16_hidden_states_against_an_fp32_head():
    """The Trainer's bf16 autocast with an fp32 lm_head (``upcast_frozen_fp32``) and bf16 hidden states: the
    chunks' matmuls autocast, so the hidden-state gradient must be assigned, not written by an out= op
    (never autocast: ``mm(bf16, fp32, out=bf16)`` raises); loss and gradient still match the plain loss."""
    torch.manual_seed(6)
    head = torch.nn.Linear(32, 300, bias=False)  # fp32
    hidden = torch.randn(2, 37, 32, dtype=torch.bfloat16)
    _, labels = batch()
    h_fused, h_plain = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = chunked_causal_lm_loss(h_fused, head, labels, chunk_tokens=9)
        logits = head(h_plain).float()
    plain = ForCausalLMLoss(logits, labels, vocab_size=300)
    fused.backward()
    plain.backward()
    assert h_fused.grad.dtype == torch.bfloat16 and head.weight.grad is not None
    assert torch.allclose(fused, plain, rtol=1e-2)
    assert torch.allclose(h_fused.grad.float(), h_plain.grad.float(), atol=2e-3, rtol=2e-2)
