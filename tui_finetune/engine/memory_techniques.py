"""The lean memory path: what makes a 7B QLoRA fit a 16 GB card and Gemma-2B fit 4 GB.

Five techniques, each switched by the recipe's ``[memory]`` table (``MemorySpec``) and each
modelled by the planner (``core/planner.py``), which is why they live in one place:

* ``prepare_for_training`` freezes the base and turns on non-reentrant gradient checkpointing
  *without* the fp32 upcast of peft's ``prepare_model_for_kbit_training``. That upcast costs
  4 bytes per embedding weight (2 GB for Gemma's 256k vocabulary) and, because bitsandbytes returns
  outputs in the input's dtype, turns every activation fp32 and pushes SDPA to its math kernel.
* ``set_adapter_dtype`` keeps LoRA weights fp32 (stable, peft's default) or in the compute dtype.
* ``chunked_causal_lm_loss`` computes the cross-entropy a chunk of tokens at a time, with each
  chunk's gradient taken in the forward pass (``FusedLinearCrossEntropy``), so the full-vocabulary
  fp32 logits never exist and nothing of a chunk is recomputed. The result and its gradients equal
  transformers' ``ForCausalLMLoss``.
* ``chunk_mlps`` runs each decoder layer's MLP over chunks of tokens, each under its own checkpoint,
  so the backward pass recomputes one chunk's (tokens x intermediate) working set at a time instead
  of the whole sequence's: at 40k tokens that working set is the peak of a 7B.
* ``activation_offload`` keeps the checkpointed layer inputs in CPU RAM.
* ``keep_activations`` lets the last N decoder layers keep their activations where the card has room
  (``memory.layers_keeping_activations``, chosen by auto-fit): they skip their recompute.

(``memory.embeddings_on_cpu``, the input embedding in CPU RAM, is engine/embedding_offload.py's.)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tui_finetune.core.planner import MLP_CHUNK_ABOVE_TOKENS, MLP_CHUNK_TOKENS, kept_layers_of, loss_chunk_size
from tui_finetune.core.recipe import MemorySpec

IGNORE_INDEX = -100


def prepare_for_training(model: Any, memory: MemorySpec, gradient_checkpointing: bool, *,
                         seq_len: int = 0) -> Any:
    """Freeze the base model and set up checkpointing, with or without the fp32 upcast, and chunk the MLPs.

    ``seq_len``: tokens per micro-batch (sequence length x micro-batch), for the auto MLP-chunking rule;
    0 when unknown, and each batch then decides for itself.
    """
    chunk_mlps_for(model, memory, seq_len)
    if memory.upcast_frozen_fp32:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if gradient_checkpointing:
            keep_activations(model, kept_layers_of(memory))
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # With a frozen embedding nothing upstream of the first block needs a gradient, and
        # checkpointed blocks would then have none to recompute for: make the inputs require grad.
        model.enable_input_require_grads()
        enable_checkpointing(model)
        keep_activations(model, kept_layers_of(memory))
    model.config.use_cache = False
    return model


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing on transformers 5.x, old name or new.

    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (5.2x); the GPU image has 5.17, users may have either.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_activations(model: Any, kept: int) -> int:
    """On a model whose checkpointing is on: the last ``kept`` decoder layers keep their activations (no
    recompute), the rest recompute; returns how many keep theirs (0 where checkpointing is off, or where the
    decoder's layers aren't transformers' checkpointing layers, as in some remote code).

    The last ones, because the backward pass meets them first: their activations are freed before the
    first recompute starts, so the peak holds them or a recomputing layer's working set, not both.

    Set on each layer's own flag (transformers' ``GradientCheckpointingLayer.gradient_checkpointing``), which
    every forward reads: an out-of-memory turns them all back to recomputing on the loaded model between two
    steps (engine/recipe_refit.py ``recompute_every_layer``). transformers 5.2x's ``every_n_layers`` keeps
    every layer but each N-th, too coarse for this: one kept layer in N is as few as it gets (half of them for
    N = 2), where a card's room may hold three."""
    layers = _checkpointed_layers(model)
    first_kept = len(layers) - kept
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < first_kept
        layer.keeps_activations = index >= first_kept  # still a checkpointed model's layer when every one keeps its own
    return sum(layer.keeps_activations for layer in layers)


def layers_keeping_activations(model: Any) -> int:
    """Decoder layers of a checkpointed model that keep their activations (``keep_activations``); 0 where
    checkpointing is off."""
    return sum(not layer.gradient_checkpointing for layer in _checkpointed_layers(model))


def _checkpointed_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder's layers (``decoder_layers``) when they are transformers' ``GradientCheckpointingLayer`` and
    checkpointing is on (a layer recomputes, or keeps its activations by ``keep_activations``), else none. Only
    the decoder's: a multimodal model's vision layers (Gemma 3) never run in text training."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [layer for layer in decoder_layers(model) if isinstance(layer, GradientCheckpointingLayer)]
    on = any(layer.gradient_checkpointing or getattr(layer, "keeps_activations", False) for layer in layers)
    return layers if on else []


def is_checkpointing(model: Any) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) or getattr(model, "is_gradient_checkpointing", False))


def set_adapter_dtype(peft_model: Any, memory: MemorySpec, compute_dtype: torch.dtype) -> int:
    """Cast the trainable (LoRA) parameters; returns how many were cast."""
    dtype = torch.float32 if memory.adapter_dtype == "fp32" else compute_dtype
    count = 0
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def chunk_mlps_for(model: Any, memory: MemorySpec, seq_len: int = 0) -> int:
    """Apply ``memory.mlp_chunk_tokens`` (0 auto, -1 never, N tokens) to ``model``; returns the MLPs patched.

    Auto patches only when the batch may be long (``seq_len`` over ``MLP_CHUNK_ABOVE_TOKENS``, or
    unknown) and then chunks only the batches that are: with dynamic padding most batches are shorter
    than ``seq_len``, and those keep the one-pass MLP. The planner models the same rule (``mlp_chunk_size``).
    """
    setting = memory.mlp_chunk_tokens
    if setting < 0 or (setting == 0 and 0 < seq_len <= MLP_CHUNK_ABOVE_TOKENS):
        return 0
    if setting > 0:
        return chunk_mlps(model, setting)
    return chunk_mlps(model, MLP_CHUNK_TOKENS, above_tokens=MLP_CHUNK_ABOVE_TOKENS)


def decoder_mlps(model: Any) -> list[torch.nn.Module]:
    """The MLP block of every decoder layer (``layers[i].mlp``: Llama, Mistral, Qwen, Gemma, Phi), through a
    peft wrapper; none for other layouts. Mixture-of-experts blocks are left out: their routing may
    balance load across the whole batch, so chunks of it are not the same computation."""
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    return [mlp for mlp in mlps if isinstance(mlp, torch.nn.Module) and not hasattr(mlp, "experts")]


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder's layers (``get_decoder().layers``: Llama, Mistral, Qwen, Gemma, Phi, and the language model of
    a multimodal one), through a peft wrapper; none for other layouts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    return list(getattr(decoder, "layers", None) or [])


def chunk_mlps(model: Any, chunk_tokens: int, *, above_tokens: int = 0) -> int:
    """Make every decoder MLP run over chunks of ``chunk_tokens`` tokens for inputs of more than
    ``max(chunk_tokens, above_tokens)`` tokens; returns how many MLPs it patched.

    It replaces the *instance's* ``forward`` and keeps the original, which looks its projections up on
    each call: peft's LoRA layers, wrapped before or after this, are the ones that run. Patching
    again only changes the sizes. The MLP is position-wise, so the output and the gradients are those
    of the whole-sequence MLP (with LoRA dropout on, the masks are drawn per chunk: the same law).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    mlps = decoder_mlps(model)
    for mlp in mlps:
        if "_unchunked_forward" not in mlp.__dict__:
            mlp._unchunked_forward = mlp.forward
            mlp.forward = MethodType(_chunked_mlp_forward, mlp)
        mlp._mlp_chunk_tokens = chunk_tokens
        mlp._mlp_chunk_above = max(chunk_tokens, above_tokens)
    return len(mlps)


def _chunked_mlp_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The patched MLP forward: (batch, seq) flattened to tokens, split, each chunk checkpointed, joined."""
    forward = self._unchunked_forward
    width = hidden_states.shape[-1]
    if args or kwargs or hidden_states.numel() // max(width, 1) <= self._mlp_chunk_above:
        return forward(hidden_states, *args, **kwargs)
    pieces = hidden_states.reshape(-1, width).split(self._mlp_chunk_tokens)
    if torch.is_grad_enabled():
        # Each checkpoint saves only its chunk (a view of the input, which is alive anyway); split's
        # backward joins the chunks' input gradients in one copy.
        outputs = [checkpoint(forward, piece, use_reentrant=False) for piece in pieces]
    else:
        outputs = [forward(piece) for piece in pieces]
    joined = torch.cat(outputs)
    return joined.reshape(*hidden_states.shape[:-1], joined.shape[-1])


class FusedLinearCrossEntropy(torch.autograd.Function):
    """The lm_head matmul and the summed cross-entropy, a chunk of tokens at a time, with the gradients
    computed in the forward pass (the technique of Liger's fused linear cross-entropy, in plain PyTorch).

    Each chunk's fp32 logits become the softmax in place, then ``softmax - onehot`` (through the
    softcap's derivative) is multiplied straight into the gradient of the hidden states. So nothing of
    the chunk is kept for the backward pass, and the lm_head matmul runs twice per chunk instead of the
    three times a checkpointed chunk needs (forward, recompute, backward); on Gemma's 256k vocabulary
    that matmul is about a quarter of the model's FLOPs. Only the (tokens x hidden) gradient is saved.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk: int, softcap: float | None) -> torch.Tensor:
        """``labels``: one per row of ``hidden``, none of them -100 (``chunked_causal_lm_loss`` drops those
        tokens first), so no chunk needs a mask. A chunk is about a dozen ops and no host sync: the step is
        launch-bound on a fast card, and Gemma's 256k vocabulary makes 8 chunks at seq 1024."""
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # every row is written below
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        minus_one = None
        for start in range(0, hidden.shape[0], chunk):
            target = labels[start:start + chunk, None]
            piece = hidden[start:start + chunk]
            logits = F.linear(piece, weight, bias).float()
            capped = None
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, target).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad = logits.sub_(log_norm[:, None]).exp_()  # the softmax, in the logits' memory
            if minus_one is None:
                minus_one = grad.new_full((min(chunk, hidden.shape[0]), 1), -1.0)  # grad's dtype, whatever the default
            grad.scatter_add_(1, target, minus_one[:grad.shape[0]])  # softmax - onehot(label)
            if capped is not None:
                grad.mul_(1.0 - capped * capped)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                # Not mm(out=): an out= op is never autocast, so a bf16 chunk against an fp32 lm_head under
                # autocast would fail where this assignment casts; the copy is one kernel a chunk.
                grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().to(weight.dtype), piece.to(weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # In place: the saved gradients are used once, and an fp32 copy of a (tokens x hidden) or, in full
        # fine-tuning, of an lm_head-sized tensor is memory the planner does not count.
        out_hidden = None if grad_hidden is None else grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        out_weight = None if grad_weight is None else grad_weight.mul_(grad_output.to(grad_weight.dtype))
        out_bias = None if grad_bias is None else (grad_bias * grad_output.float()).to(ctx.bias_dtype)
        return out_hidden, out_weight, out_bias, None, None, None


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                           *, chunk_tokens: int = 0, num_items_in_batch: int | torch.Tensor | None = None,
                           final_logit_softcapping: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy without materialising the whole (tokens x vocab) logits.

    Same semantics as transformers' ``ForCausalLMLoss``: labels shift left by one, -100 is
    ignored, and the sum is divided by ``num_items_in_batch`` when the Trainer passes it (correct
    gradient accumulation), else by the number of counted tokens. ``chunk_tokens`` 0 sizes the
    chunk to the vocabulary (``loss_chunk_size``), as the planner assumes. Training goes through
    ``FusedLinearCrossEntropy``; without gradients (evaluation) the chunks are plain. Tokens with
    label -100 (prompt, padding) are dropped before the lm_head: the same loss and gradients, less work.
    """
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    chunk = chunk_tokens or loss_chunk_size(weight.shape[0])
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden_states.device)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    # Only the tokens that carry loss go through the lm_head: prompt and padding tokens add nothing to the
    # loss or its gradient, and on a 256k vocabulary their matmul was most of the loss's time.
    # One nonzero (a host sync on a GPU) for both selections; a boolean index would sync once for each.
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    flat, shifted = flat.index_select(0, keep), shifted.index_select(0, keep)
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad or
                                             (bias is not None and bias.requires_grad))
    if needs_grad:
        total = FusedLinearCrossEntropy.apply(flat, weight, bias, shifted, chunk, final_logit_softcapping)
    else:
        total = flat.new_zeros((), dtype=torch.float32)
        for start in range(0, flat.shape[0], chunk):
            total = total + _chunk_loss_sum(flat[start:start + chunk], weight, bias, shifted[start:start + chunk],
                                            final_logit_softcapping)
    if num_items_in_batch is None:
        denominator: Any = max(shifted.numel(), 1)  # every token left carries loss
    else:
        denominator = num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(decoder, lm_head, final logit softcap) of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    lm_head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return decoder, lm_head, softcap


def activation_offload(memory: MemorySpec) -> AbstractContextManager[Any]:
    """Keep the tensors autograd saves in the forward pass (with checkpointing: each layer's input)
    in pinned CPU RAM until the backward pass needs them. Only the forward needs to run inside it."""
    if memory.offload_activations and torch.cuda.is_available():
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return nullcontext()


def lean_causal_lm_loss(model: Any, inputs: dict[str, Any], memory: MemorySpec,
                        num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Run the decoder and the chunked loss; what the Trainer's ``compute_loss`` calls on the lean path."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    decoder, lm_head, softcap = causal_lm_parts(model)
    # Only the decoder runs under the offload hooks: the loss chunks save the lm_head weight for their
    # backward, and offloading that (1 GiB for Gemma's vocabulary) once per chunk cost more VRAM and
    # time than it saved (measured on an H200: Gemma-2B 3.59 GiB with it, 2.80 without).
    with activation_offload(memory):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, lm_head, labels, chunk_tokens=memory.loss_chunk_tokens,
                                  num_items_in_batch=num_items_in_batch, final_logit_softcapping=softcap)
