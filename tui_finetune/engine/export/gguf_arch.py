"""The architectures the GGUF exporter writes, and how each one's weights and numbers go into a GGUF.

Everything here follows llama.cpp's ``convert_hf_to_gguf.py`` so the file loads in llama.cpp and
Ollama: tensor names from the gguf package's TensorNameMap, Llama/Mistral's Q and K rows permuted
to llama.cpp's rotary layout, Gemma's RMSNorm weights stored as (1 + w). Each transform has its
inverse here too, which the gguf-reader check uses to read the file back into an HF model.
llama.cpp fixes some numbers per architecture instead of reading them from the file (Gemma 3's
global-layer pattern, local RoPE base and query scale; Qwen2 without sliding windows): a config that
differs is refused with the way round it, never written into a file that would run wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tui_finetune.core.export_spec import ExportError
from tui_finetune.engine.export.gguf_rope import head_dim, refuse_unwritten_scaling, rope_dimensions, write_rope


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    gguf_arch: str
    """The name in gguf.MODEL_ARCH_NAMES (and ``general.architecture``)."""
    permute_qk: bool = False
    norm_plus_one: bool = False
    bpe_pre: str = "default"
    """``tokenizer.ggml.pre`` for a byte-level BPE tokenizer: how llama.cpp splits text before BPE."""
    transformers_reads: bool = True
    """transformers' GGUF loader knows this architecture (it has no Gemma 1 or Phi-2 reader)."""


ARCHS = {
    "llama": ArchSpec("llama", "llama", permute_qk=True, bpe_pre="llama-bpe"),
    "mistral": ArchSpec("mistral", "llama", permute_qk=True, bpe_pre="tekken"),
    "qwen2": ArchSpec("qwen2", "qwen2", bpe_pre="qwen2"),
    "gemma": ArchSpec("gemma", "gemma", norm_plus_one=True, transformers_reads=False),
    "gemma3_text": ArchSpec("gemma3_text", "gemma3", norm_plus_one=True),
    "phi": ArchSpec("phi", "phi2", bpe_pre="phi-2", transformers_reads=False),
}
SUPPORTED = "Gemma 3 (text), Gemma, Llama, Mistral, Qwen2 and Phi-2"


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def arch_for(folder: Path) -> ArchSpec:
    """The ArchSpec of the model in ``folder``, or ExportError naming what is supported and what is not."""
    from transformers import AutoConfig

    model_type = read_config(folder).get("model_type", "unknown")
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export does not support the '{model_type}' architecture yet (it writes {SUPPORTED}): "
                          f"{_WAY_ROUND}")
    arch = ARCHS[model_type]
    refuse_unsupported_features(arch, AutoConfig.from_pretrained(str(folder)))
    return arch


_WAY_ROUND = "export --to merged instead and convert that folder with llama.cpp's convert_hf_to_gguf.py"


def refuse_unsupported_features(arch: ArchSpec, config: Any) -> None:
    """ExportError for a config setting llama.cpp's reading of this architecture would silently get wrong:
    it fixes some numbers per architecture instead of reading them from the file."""
    refuse_unwritten_scaling(config, arch.gguf_arch)
    problem = ""
    if arch.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        problem = "sliding-window attention (use_sliding_window), which llama.cpp's qwen2 doesn't do"
    elif arch.model_type == "phi" and getattr(config, "qk_layernorm", False):
        problem = "Q/K layer norms (qk_layernorm), which llama.cpp's phi2 doesn't have"
    elif arch.model_type == "gemma3_text":
        problem = _gemma3_problem(config)
    if problem:
        raise ExportError(f"GGUF export: this {arch.model_type} model uses {problem}: {_WAY_ROUND}")


GEMMA3_SWA_PATTERN = 6
GEMMA3_SWA_THETA = 10000.0
"""llama.cpp fixes these for gemma3 (every 6th layer global, local RoPE base 10000) instead of reading them."""


def _gemma3_problem(config: Any) -> str:
    layers = config.num_hidden_layers
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(layers)]
    types = getattr(config, "layer_types", None) or expected
    params = getattr(config, "rope_parameters", None) or {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    local_theta = float((local or {}).get("rope_theta") or getattr(config, "rope_local_base_freq", None)
                        or GEMMA3_SWA_THETA)
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B
    scalar = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim(config)
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping, which llama.cpp's gemma3 doesn't do"
    if list(types) != expected:
        return f"a global layer pattern other than every {GEMMA3_SWA_PATTERN}th layer, which llama.cpp assumes"
    if local_theta != GEMMA3_SWA_THETA or (local or {}).get("rope_type", "default") != "default":
        return (f"a local RoPE base of {local_theta:g} or scaled local RoPE, where llama.cpp assumes "
                f"{GEMMA3_SWA_THETA:g} unscaled")
    if float(getattr(config, "query_pre_attn_scalar", None) or scalar) != scalar:
        return (f"query_pre_attn_scalar {config.query_pre_attn_scalar:g}, where llama.cpp scales queries by "
                f"1/sqrt({scalar})")
    return ""


def write_hparams(writer: Any, arch: ArchSpec, config: Any, name: str) -> dict[str, np.ndarray]:
    """The model numbers llama.cpp reads, under the keys convert_hf_to_gguf.py writes; returns the extra
    tensors they need (``rope_freqs.weight`` for Llama 3's RoPE scaling)."""
    writer.add_name(name)  # not "mistral": transformers would then look for a gguf arch of that name, which has none
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch.model_type == "phi":
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(rope_dimensions(config))
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch.gguf_arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    if arch.gguf_arch in ("gemma", "gemma3") or head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if arch.gguf_arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    return write_rope(writer, config)


def _permute(w: np.ndarray, n_head: int, n_kv: int | None) -> np.ndarray:
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int, n_kv: int | None) -> np.ndarray:
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(arch: ArchSpec, config: Any, hf_name: str, data: np.ndarray) -> np.ndarray:
    """An HF tensor as llama.cpp stores it."""
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute(data, heads, heads)
    if arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute(data, heads, kv)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return data + 1
    return data


def from_gguf(arch: ArchSpec, config: Any, hf_name: str, data: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_gguf`."""
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return _unpermute(data, heads, heads)
    if arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return _unpermute(data, heads, kv)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return data - 1
    return data


def tensor_names(arch: ArchSpec, config: Any, hf_names: list[str]) -> dict[str, str]:
    """HF name -> GGUF name for every tensor that goes into the file (a tied output head is left out)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for hf_name in hf_names:
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor '{hf_name}' of this {arch.model_type} model: "
                              f"{_WAY_ROUND}")
        out[hf_name] = f"{mapped}.{suffix}"
    return out
