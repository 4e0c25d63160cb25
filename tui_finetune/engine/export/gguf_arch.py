"""The architectures the GGUF exporter writes, and how each one's weights and numbers go into a GGUF.

Everything here follows llama.cpp's ``convert_hf_to_gguf.py`` so the file loads in llama.cpp and
Ollama: tensor names from the gguf package's TensorNameMap, Llama/Mistral's Q and K rows permuted
to llama.cpp's rotary layout, Gemma's RMSNorm weights stored as (1 + w). Each transform has its
inverse here too, which the gguf-reader check uses to read the file back into an HF model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tui_finetune.core.export_spec import ExportError


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
    """The ArchSpec of the model in ``folder``, or ExportError naming what is supported."""
    model_type = read_config(folder).get("model_type", "unknown")
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export does not support the '{model_type}' architecture yet (it writes {SUPPORTED}): "
                          "export --to merged instead and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    return ARCHS[model_type]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config: Any) -> float:
    """rope_theta from a transformers 4 or 5 config (5 moved it into ``rope_parameters``)."""
    value = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if value is None and isinstance(params, dict):
        value = params.get("rope_theta") or (params.get("full_attention") or {}).get("rope_theta")
    return float(value or 10000.0)


def partial_rotary_factor(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(getattr(config, "partial_rotary_factor", None) or params.get("partial_rotary_factor") or 1.0)


def rope_scaling(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    return params if isinstance(params, dict) and params.get("rope_type", "default") != "default" else {}


def write_hparams(writer: Any, arch: ArchSpec, config: Any, name: str) -> None:
    """The model numbers llama.cpp reads, under the keys convert_hf_to_gguf.py writes."""
    import gguf

    writer.add_name(name)  # not "mistral": transformers would then look for a gguf arch of that name, which has none
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(config))
    if arch.model_type == "phi":
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(int(partial_rotary_factor(config) * head_dim(config)))
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
    scaling = rope_scaling(config)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise ExportError(f"GGUF export does not write '{scaling.get('rope_type')}' RoPE scaling yet: "
                          "export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py")


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
    if arch.permute_qk and hf_name.endswith("q_proj.weight"):
        return _permute(data, heads, heads)
    if arch.permute_qk and hf_name.endswith("k_proj.weight"):
        return _permute(data, heads, kv)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return data + 1
    return data


def from_gguf(arch: ArchSpec, config: Any, hf_name: str, data: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_gguf`."""
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if arch.permute_qk and hf_name.endswith("q_proj.weight"):
        return _unpermute(data, heads, heads)
    if arch.permute_qk and hf_name.endswith("k_proj.weight"):
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
                              "export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py")
        out[hf_name] = f"{mapped}.{suffix}"
    return out
