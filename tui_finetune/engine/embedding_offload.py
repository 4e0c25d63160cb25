"""The input embedding in CPU RAM (``memory.embeddings_on_cpu``): VRAM freed at no cost in quality.

A QLoRA Llama-3.1-8B holds its bf16 input embedding (128256 x 4096, 1 GiB) on the GPU, yet a step looks
up only a few thousand of its rows. Where the lm_head is a matrix of its own (untied), the embedding can
wait in CPU RAM: the lookup runs there, and one (tokens x hidden) copy goes to the GPU per forward
(2 MiB for 256 tokens of an 8B). On an 8 GB card that gigabyte decides whether a run fits. The lm_head
stays on the GPU. A tied model's lm_head *is* its input embedding, so that stays too
(``input_embedding_is_tied``), and so does a full fine-tune's, which trains it.

The model's input embedding becomes a ``CpuInputEmbedding`` that holds the original module without
registering it: the model's parameters and state_dict are the decoder's alone, so ``model.device``
(transformers reads the first parameter) stays the GPU, generate() and Trainer put their tensors
there, and checkpoints and adapters save exactly what they saved before. The original module's own
forward runs (a scaled embedding stays scaled); its output is detached, since nothing upstream of a
frozen embedding needs a gradient, and moved to the decoder's device. transformers'
``enable_input_require_grads`` hooks whatever ``get_input_embeddings()`` returns: a hook on the wrapper
marks the GPU output, and one left on the original (called before the swap) is carried over, so the
order of the calls doesn't matter. The planner models this (core/planner.py ``embedding_params_on_cpu``);
auto-fit and the fit-check's out-of-memory rule turn it on (core/fit_levers.py, engine/worker.py).
"""

from __future__ import annotations

import gc
from typing import Any, Iterator

import torch

CPU = torch.device("cpu")


class CpuInputEmbedding(torch.nn.Module):
    """Looks tokens up in an embedding kept in CPU RAM and returns the vectors on ``output_device``.

    The embedding is not a submodule: it adds no parameter, buffer or state_dict entry to the model, and
    ``model.to(...)`` leaves it where it is. Other attributes (``weight``, ``padding_idx``, a scaled
    embedding's ``embed_scale``) are read from it, for code that inspects the input embedding.
    """

    def __init__(self, embedding: torch.nn.Module, output_device: torch.device | str) -> None:
        super().__init__()
        object.__setattr__(self, "cpu_embedding", embedding)  # past Module.__setattr__: not registered
        self.output_device = torch.device(output_device)

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        looked_up = self.cpu_embedding(input_ids.to(CPU), *args, **kwargs)
        out = looked_up.detach().to(self.output_device)
        if looked_up.requires_grad:  # a require-grads hook on the original module: keep its meaning
            out.requires_grad_(True)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            embedding = self.__dict__.get("cpu_embedding")
            if embedding is None:
                raise
            return getattr(embedding, name)

    def extra_repr(self) -> str:
        return f"in CPU RAM: {self.cpu_embedding!r}, output on {self.output_device}"


def _causal_lm(model: Any) -> Any:
    """The transformers model under a peft wrapper, if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def input_embedding_is_tied(model: Any) -> bool:
    """True when the lm_head uses the input embedding's weight (Gemma, small Qwen and Llama 3.2): the config
    says so, or the two share their tensor."""
    base = _causal_lm(model)
    if getattr(base.config, "tie_word_embeddings", False):
        return True
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if isinstance(inputs, CpuInputEmbedding):
        return False
    weight_in, weight_out = getattr(inputs, "weight", None), getattr(outputs, "weight", None)
    if weight_in is None or weight_out is None:
        return False
    return weight_in is weight_out or (weight_in.device == weight_out.device
                                       and weight_in.data_ptr() == weight_out.data_ptr())


def input_embedding_on_cpu(model: Any) -> bool:
    """Whether ``move_input_embedding_to_cpu`` has moved this model's input embedding."""
    return isinstance(_causal_lm(model).get_input_embeddings(), CpuInputEmbedding)


def move_input_embedding_to_cpu(model: Any) -> bool:
    """Keep the (frozen) input embedding of ``model`` (a transformers causal LM, or a peft model around one) in
    CPU RAM and release its GPU memory. Returns True when it is in CPU RAM now, False when it must stay:
    a tied lm_head, an embedding that trains (full fine-tuning, or named in the LoRA targets: its gradient
    and optimizer step belong on the GPU), or a layout whose embedding can't be replaced."""
    base = _causal_lm(model)
    embedding = base.get_input_embeddings()
    if isinstance(embedding, CpuInputEmbedding):
        return True
    if embedding is None or input_embedding_is_tied(base):
        return False
    if any(p.requires_grad for p in embedding.parameters()):  # full fine-tuning, or a LoRA target itself:
        return False  # its gradient and optimizer step belong on the GPU
    mine = {id(p) for p in embedding.parameters()}
    output_device = next((p.device for p in base.parameters() if id(p) not in mine), CPU)
    _remove_accelerate_hook(embedding)
    embedding.to(CPU)
    base.set_input_embeddings(CpuInputEmbedding(embedding, output_device))
    if not isinstance(base.get_input_embeddings(), CpuInputEmbedding):  # a layout set_input_embeddings misses
        embedding.to(output_device)
        return False
    del embedding
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the GPU copy's blocks go back to the driver, not only to torch's cache
    return True


def _remove_accelerate_hook(module: torch.nn.Module) -> None:
    """A device-placement hook of accelerate (a model dispatched over several devices) would move the CPU
    lookup back to the GPU; a single-device ``device_map`` sets none."""
    if hasattr(module, "_hf_hook"):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module)


def offloaded_parameters(model: Any) -> Iterator[torch.nn.Parameter]:
    """The parameters kept in CPU RAM outside the model's own ``parameters()`` (to count them)."""
    for module in model.modules():
        if isinstance(module, CpuInputEmbedding):
            yield from module.cpu_embedding.parameters()
