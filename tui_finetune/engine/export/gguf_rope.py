"""RoPE in a GGUF the way llama.cpp reads it: the base frequency, the rotary dimensions, and the scaling.

Two scalings are written, as llama.cpp's ``convert_hf_to_gguf.py`` writes them:

- ``linear``: ``rope.scaling.type = linear`` and ``rope.scaling.factor`` in the metadata.
- ``llama3`` (Llama 3.1 and 3.2): no scaling keys at all. The converter writes one F32 tensor,
  ``rope_freqs.weight``, with a factor per rotary frequency (``LlamaModel.generate_extra_tensors``),
  and llama.cpp divides each frequency by its factor. Only ``rope.freq_base`` goes into the metadata.

Any other scaling (YaRN, longrope, dynamic) is refused with the way round it. transformers' GGUF
loader reads neither scaling (it builds plain RoPE from ``rope.freq_base``), so the checks give the
reloaded model the file's own RoPE with :func:`apply_file_rope`, as llama.cpp would use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tui_finetune.core.export_spec import ExportError

ROPE_FREQS = "rope_freqs.weight"
"""The tensor name of gguf.MODEL_TENSOR.ROPE_FREQS."""
WRITTEN_SCALINGS = ("linear", "llama3")


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict[str, Any]:
    """The full-attention RoPE settings of a transformers 4 or 5 config, as one dict with ``rope_type``
    (5 keeps them in ``rope_parameters``, per layer type for Gemma 3; 4 in ``rope_scaling`` and ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        params = {}
    params = dict(params.get("full_attention") or params)
    params.setdefault("rope_type", params.pop("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def rope_theta(config: Any) -> float:
    return float(rope_parameters(config)["rope_theta"])


def rope_scaling(config: Any) -> dict[str, Any]:
    """The full-attention RoPE scaling, or {} when there is none."""
    params = rope_parameters(config)
    return params if params["rope_type"] != "default" else {}


def partial_rotary_factor(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(getattr(config, "partial_rotary_factor", None) or params.get("partial_rotary_factor") or 1.0)


def rope_dimensions(config: Any) -> int:
    return int(partial_rotary_factor(config) * head_dim(config))


def refuse_unwritten_scaling(config: Any, gguf_arch: str) -> None:
    """ExportError for a RoPE scaling this writer can't describe to llama.cpp."""
    kind = rope_scaling(config).get("rope_type", "default")
    if kind == "llama3" and gguf_arch != "llama":
        raise ExportError(f"GGUF export writes 'llama3' RoPE scaling for Llama models only, not {gguf_arch}: "
                          "export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    if kind not in ("default", *WRITTEN_SCALINGS):
        raise ExportError(f"GGUF export does not write '{kind}' RoPE scaling yet (it writes "
                          f"{' and '.join(WRITTEN_SCALINGS)}): export --to merged and convert it with "
                          "llama.cpp's convert_hf_to_gguf.py")


def llama3_factors(config: Any) -> np.ndarray:
    """Llama 3's per-frequency RoPE factors, computed as llama.cpp's converter does: 1 for short
    wavelengths, ``factor`` for long ones, and a smooth blend between the two wavelength bounds."""
    params = rope_parameters(config)
    dims = rope_dimensions(config)
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    # llama.cpp reads this key from the top of config.json; HF configs keep it inside rope_scaling, where
    # transformers reads it (the two agree for the Llama 3.x models, both 8192)
    old_context = float(params.get("original_max_position_embeddings")
                        or getattr(config, "original_max_position_embeddings", None) or 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_rope(writer: Any, config: Any) -> dict[str, np.ndarray]:
    """Add the RoPE metadata; returns the extra tensors the scaling needs (``rope_freqs.weight`` for llama3)."""
    import gguf

    writer.add_rope_freq_base(rope_theta(config))
    scaling = rope_scaling(config)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling.get("rope_type") == "llama3":
        return {ROPE_FREQS: llama3_factors(config)}
    return {}


@dataclass
class FileRope:
    """The RoPE a GGUF describes: what llama.cpp will compute from the file."""

    theta: float
    dims: int
    factors: np.ndarray | None
    """One divisor per rotary frequency (rope_freqs, or the linear factor repeated); None when unscaled."""

    def inv_freq(self) -> np.ndarray:
        plain = 1.0 / (self.theta ** (np.arange(0, self.dims, 2, dtype=np.float64) / self.dims))
        return (plain / self.factors if self.factors is not None else plain).astype(np.float32)


def read_file_rope(reader: Any, gguf_arch: str, config: Any) -> FileRope:
    """The RoPE of a GGUF opened with gguf.GGUFReader; ``config`` only fills what llama.cpp would default."""
    def value(key: str) -> Any:
        field = reader.fields.get(f"{gguf_arch}.{key}")
        return field.contents() if field is not None else None

    dims = int(value("rope.dimension_count") or head_dim(config))
    factors = next((np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors if t.name == ROPE_FREQS),
                   None)
    if factors is None and value("rope.scaling.type") == "linear":
        factors = np.full(dims // 2, float(value("rope.scaling.factor")), dtype=np.float32)
    return FileRope(float(value("rope.freq_base") or 10000.0), dims, factors)


def _rotary_buffers(model: Any) -> list[tuple[Any, str]]:
    """(module, buffer name) of each full-attention rotary frequency table (Gemma 3 keeps one per layer type)."""
    import torch

    found = []
    for module in model.modules():
        name = next((n for n in ("full_attention_inv_freq", "inv_freq")
                     if isinstance(getattr(module, n, None), torch.Tensor)), None)
        if name is not None:
            found.append((module, name))
    return found


def full_attention_inv_freq(model: Any) -> Any:
    """The rotary frequencies a transformers model uses on its full-attention layers (a torch tensor), or
    None when it has none (a Gemma 3 of fewer than 6 layers has only sliding-window layers)."""
    buffers = _rotary_buffers(model)
    return getattr(*buffers[0]) if buffers else None


def apply_file_rope(model: Any, rope: FileRope) -> bool:
    """Give a transformers model the scaled RoPE the GGUF describes (its full-attention layers only, as
    llama.cpp scales them); False, and nothing changed, when the file has no scaling. A table of another
    size is left alone: the file's rope.dimension_count is then wrong, which the RoPE check reports."""
    import torch

    if rope.factors is None:
        return False
    inv_freq = torch.from_numpy(rope.inv_freq())
    for module, name in _rotary_buffers(model):
        current = getattr(module, name)
        if current.shape != inv_freq.shape:
            continue
        current.copy_(inv_freq.to(current.device, current.dtype))
        original = getattr(module, name.replace("inv_freq", "original_inv_freq"), None)
        if isinstance(original, torch.Tensor):
            original.copy_(current)
    return True
