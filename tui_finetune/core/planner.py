"""The VRAM planner: estimate peak GPU memory of a (model, recipe, engine) before anything loads.

The estimate is a sum of named parts, so the user sees *why* a run fits or not:

  weights          quantized linear layers (NF4 at 4.127 bits with double quant) plus the
                   16- or 32-bit parts (embeddings, lm_head, norms); without the input embedding
                   when it waits in CPU RAM (``memory.embeddings_on_cpu``, untied models only)
  lora             adapter weights, their gradients and the optimizer states
  activations      the checkpointed hidden state of every recomputing layer (or of none, when offloaded),
                   and everything autograd keeps of each layer that is not checkpointed
  layer            one decoder layer's working set, recomputed during the backward pass (its MLP
                   part over one chunk of tokens when the MLP runs in chunks)
  attention        the score matrix, when the attention kernel has to materialise it
  logits           the output logits and the cross-entropy's copies of them
  slack            what the caching allocator reserves beyond what tensors use
  cuda_context     the CUDA context and kernels, outside torch's own accounting

The shape of the model comes from the catalog; the techniques the engine uses come in as an
``EngineProfile``, because the baseline stack and a lean engine differ by 2x or more in memory.
The constants were fitted to peak ``max_memory_reserved`` measured on real GPUs (the calibration
table lives in tests/test_core_planner.py) and the planner must stay within 15% of each.
Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tui_finetune.core.catalog import ModelSpec
from tui_finetune.core.recipe import MemorySpec, RecipeSpec

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BITS = {True: 4.127, False: 4.5}
"""Bits per quantized weight: 4 bits + an fp32 absmax per 64 weights, or with double quant an
8-bit absmax per 64 weights plus an fp32 constant per 256 of those."""
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2.0, "adamw_8bit": 2.0, "adamw_torch": 8.0}
"""Bytes of optimizer state per trainable parameter (Adam's two moments)."""
CUDA_CONTEXT_GIB = 0.45
"""The CUDA context, cuBLAS workspace and loaded kernels: 0.3-0.5 GiB on a real card, invisible to torch."""
SAFETY_MARGIN = 0.10
"""A suggestion fits only with 10% of the card left over: the desktop and the driver need room too."""
TIGHT_MARGIN = 0.03
CUDA_CONTEXT_GROWTH_GIB = 0.3
"""What the CUDA context still grows by after the worker first reads the free memory (cuBLAS workspace,
lazily loaded kernels of torch and bitsandbytes). Measured on the card simulator (H200, 2026-12-02): the
worker's NVML peak was 0.75 GiB over torch's reserved peak on Phi-2, Gemma-2B and Llama-3.1-8B, of which
0.5 GiB was already in use when it read the free memory."""
PLANNER_TOLERANCE = 0.10
"""How far the estimate may sit from a measured peak (tests/test_core_planner.py holds every calibration row
to it). An estimate over the budget by less than this is not grounds to refuse: the fit-check measures."""


LOSS_CHUNK_LOGITS = 32 * 1024 * 1024
"""Logits per loss chunk when the chunk is sized automatically: 128 MiB in fp32."""


def loss_chunk_size(vocab_size: int) -> int:
    """Tokens per loss chunk for this vocabulary: a power of two with about 32M logits, 64 to 4096.

    The engine and the planner both call this, so they agree on what a chunk costs.
    """
    size = 64
    while size * 2 * vocab_size <= LOSS_CHUNK_LOGITS and size < 4096:
        size *= 2
    return size


MIN_SEQ_LEN = 256
"""The shortest sequence auto-fit, the fit-check and the advice ever shorten to: shorter cuts most
instruction examples short. (A recipe may still ask for less; only our own shortening stops here.)"""
MLP_CHUNK_TOKENS = 4096
"""Tokens per MLP chunk when the recipe says auto: 0.8 GiB of working set for a 7B's 14336-wide MLP,
while the matmuls stay large enough (4096 rows) that the NF4 dequantization each chunk repeats should
cost a few percent (estimated from bandwidth and FLOPs, not measured), not a quarter as at 1024."""
MLP_CHUNK_ABOVE_TOKENS = 16384
"""Auto chunks the MLP only for batches longer than this. Chunking runs the MLP's forward a third time
(an estimated 10-15% more step time at these lengths; attention's share grows with the sequence). Up
to 16k tokens a 7-8B's one-layer MLP working set is under 3.3 GiB, less than its 4-bit weights; beyond
that it becomes the largest part of the peak and keeps growing with the sequence."""
KEPT_LAYER_BYTES = {"fp32": (12.46, 11.33), "bf16": (7.96, 7.61)}
"""What one decoder layer keeps for its backward pass when it is not checkpointed, in bytes a token with 16-bit
activations, by adapter dtype: (per unit of the attention's widths, hidden + q + 2 kv; per unit of the MLP's
width / 3). Fitted by least squares to what autograd saves in our engine's LoRA layers (saved-tensor hooks
on the CPU, seq 256, 2026-12-02) for Gemma-2B, Llama-3.2-1B, Qwen2.5-1.5B, Mistral-7B and Phi-2, each
within 4%. fp32 adapters cost more because peft casts each adapted layer's input to fp32 and keeps the copy.
tests/test_engine_kept_layers.py measures a layer again and holds the fit to 10%. Per-token widths only: where
the attention keeps its seq x seq scores (eager, the fp32 upcast) a kept layer costs more, and auto-fit keeps none."""
MLP_LINEARS = frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2"})
"""The linear layers inside the MLP block (``ModelSpec.linear_shapes`` names): they run per chunk."""


def mlp_chunk_size(setting: int, tokens: int) -> int:
    """Tokens per MLP chunk for ``memory.mlp_chunk_tokens`` and a batch of ``tokens``; 0: not chunked.

    The engine and the planner both call this, so they agree on when the MLP runs in chunks.
    """
    if setting > 0:
        return setting
    if setting < 0 or tokens <= MLP_CHUNK_ABOVE_TOKENS:
        return 0
    return MLP_CHUNK_TOKENS


@dataclass(frozen=True)
class EngineProfile:
    """The memory techniques the training engine actually uses; the planner follows them."""

    name: str
    upcast_frozen_to_fp32: bool
    """peft's prepare_model_for_kbit_training casts embeddings, lm_head and norms to fp32."""
    adapter_dtype: str
    """dtype of LoRA weights and their gradients (peft keeps them fp32 by default)."""
    activation_dtype_follows_upcast: bool
    """With fp32 embeddings, bitsandbytes returns outputs in the input's dtype: activations turn fp32."""
    attention_materialises_scores: bool
    """The math SDPA backend (fp32 inputs with grouped-query attention) stores the s x s scores."""
    ce_chunk_tokens: int = 0
    """Tokens per cross-entropy chunk; 0 means full-vocabulary logits for the whole sequence, and -1
    a chunk sized to the vocabulary (``loss_chunk_size``)."""
    offload_checkpoints: bool = False
    """Checkpointed activations wait in CPU RAM instead of on the GPU."""
    mlp_chunk_tokens: int = -1
    """The MLP runs over chunks of tokens, as ``MemorySpec.mlp_chunk_tokens`` says (0 auto, -1 never, N)."""
    input_embedding_on_cpu: bool = False
    """The input embedding waits in CPU RAM (``MemorySpec.embeddings_on_cpu``, engine/embedding_offload.py).
    It leaves the GPU only where the lm_head is a separate matrix and the embedding is frozen (not ``full``):
    a tied model's lm_head is the input embedding, so it stays."""
    logits_copies: float = 3.1
    """fp32-equivalent copies of the logits alive at the loss's peak (logits, log-softmax, gradient)."""
    chunked_logits_copies: float = 3.0
    """The same for one chunk of a chunked loss: its bf16 logits, their fp32 copy and the gradient."""
    layer_factor: float = 1.0
    """Scales the one-layer working set (its attention half, and the MLP too unless ``mlp_factor``
    is set); fitted per profile."""
    mlp_factor: float = 0.0
    """Scales the MLP's share of the one-layer working set; 0: ``layer_factor``."""
    adapter_upcast_copies: float = 1.4
    """fp32 copies of each adapted layer's input alive in one layer's backward: peft casts the
    input of every LoRA branch to the adapter's dtype, so fp32 adapters on 16-bit activations
    add a 4-byte copy per adapted linear."""
    attention_copies: float = 4.5
    """Copies of the s x s score matrix the math backend keeps (scores, softmax, their gradients)."""
    slack: float = 0.06
    """Allocator slack as a fraction of the activation memory."""
    keeps_layers: bool = True
    """The engine honours ``memory.layers_keeping_activations``; Unsloth checkpoints its own way, every layer."""


BASELINE = EngineProfile(
    name="baseline", upcast_frozen_to_fp32=True, adapter_dtype="fp32",
    activation_dtype_follows_upcast=True, attention_materialises_scores=True,
    logits_copies=3.75, layer_factor=1.5, attention_copies=4.0, slack=0.22)
"""Plain transformers + peft + bitsandbytes with prepare_model_for_kbit_training (the calibration stack)."""

LEAN = EngineProfile(
    name="lean", upcast_frozen_to_fp32=False, adapter_dtype="fp32",
    activation_dtype_follows_upcast=False, attention_materialises_scores=False, ce_chunk_tokens=-1,
    logits_copies=3.75, layer_factor=4.4, mlp_factor=1.55, attention_copies=4.0, slack=0.22,
    adapter_upcast_copies=1.0, mlp_chunk_tokens=0)
"""Our engine's default: no fp32 upcast, bf16/fp16 activations, flash/efficient SDPA, chunked loss,
the MLP in chunks for long batches.
Fitted to our engine measured on H200 and H100 (seq 1024 to 32768): within 6%, leaning high."""

UNSLOTH = replace(LEAN, name="unsloth", adapter_dtype="bf16", offload_checkpoints=True, ce_chunk_tokens=256,
                  mlp_chunk_tokens=-1, keeps_layers=False)
"""Unsloth's FastLanguageModel (engine/backends.py): bf16 LoRA weights, its CPU-offloaded checkpoints,
and a fused cross-entropy whose working set matches a 256-token chunk of ours. Fitted to Gemma-2B
1024/2048, Mistral-7B 2048 and Llama-3.1-8B 2048 on an H100 (within 9%); it ignores our [memory] table."""

PROFILES: dict[str, EngineProfile] = {BASELINE.name: BASELINE, LEAN.name: LEAN, UNSLOTH.name: UNSLOTH}


def profile_from_memory(memory: MemorySpec, name: str = "recipe") -> EngineProfile:
    """The profile of the techniques a recipe switches on (see ``MemorySpec``) on its backend.

    Liger's kernels measured within 8% of the lean profile (Gemma-2B 2.91 GiB against 2.80 for the
    universal path, Mistral-7B 5.69 against 5.81), so ``liger``, ``universal`` and ``auto`` share it; for ``auto`` that is the universal path the engine falls back
    to. The worker resolves ``auto`` to the backend it will load before it auto-fits."""
    if memory.backend == "unsloth":
        return UNSLOTH
    return replace(
        LEAN, name=name,
        upcast_frozen_to_fp32=memory.upcast_frozen_fp32,
        activation_dtype_follows_upcast=memory.upcast_frozen_fp32,
        attention_materialises_scores=memory.attention == "eager" or memory.upcast_frozen_fp32,
        adapter_dtype="fp32" if memory.adapter_dtype == "fp32" else "bf16",
        ce_chunk_tokens=(memory.loss_chunk_tokens or -1) if memory.chunked_loss else 0,
        offload_checkpoints=memory.offload_activations, mlp_chunk_tokens=memory.mlp_chunk_tokens,
        input_embedding_on_cpu=memory.embeddings_on_cpu)


@dataclass(frozen=True)
class PlanCase:
    """What to plan: a model and the recipe values that drive memory."""

    model: ModelSpec
    method: str = "qlora"
    seq_len: int = 1024
    micro_batch: int = 1
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    compute_dtype: str = "bf16"
    double_quant: bool = True
    optimizer: str = "adamw_8bit"
    gradient_checkpointing: bool = True
    kept_layers: int = 0
    """Checkpointed models: decoder layers that keep their activations (``memory.layers_keeping_activations``;
    ``auto`` not yet decided plans as 0)."""

    @classmethod
    def from_recipe(cls, model: ModelSpec, recipe: RecipeSpec) -> PlanCase:
        precision = recipe.train.precision if recipe.train.precision in DTYPE_BYTES else "bf16"
        compute = recipe.quant.compute_dtype if recipe.quant.compute_dtype in DTYPE_BYTES else precision
        targets = recipe.lora.target_modules
        return cls(model=model, method=recipe.method, seq_len=recipe.data.seq_len,
                   micro_batch=recipe.train.micro_batch, lora_r=recipe.lora.r,
                   lora_targets=targets if isinstance(targets, str) else tuple(targets),
                   compute_dtype=compute if recipe.method == "qlora" else precision,
                   double_quant=recipe.quant.double_quant, optimizer=recipe.train.optimizer,
                   gradient_checkpointing=recipe.train.gradient_checkpointing,
                   kept_layers=kept_layers_of(recipe.memory))


@dataclass(frozen=True)
class VramEstimate:
    """Peak VRAM in bytes, by part. ``torch_peak`` is what torch.cuda.max_memory_reserved reports."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def torch_peak(self) -> float:
        return self.total - self.parts.get("cuda_context", 0.0)

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def describe(self) -> list[tuple[str, float]]:
        """(part, GiB) largest first, for tables and the TUI's breakdown bar."""
        return sorted(((k, v / GIB) for k, v in self.parts.items()), key=lambda kv: -kv[1])


def _targeted_shapes(model: ModelSpec, targets: str | tuple[str, ...]) -> list[tuple[str, tuple[int, int]]]:
    """(name, (in, out)) of each linear layer LoRA adapts in one block."""
    shapes = model.linear_shapes()
    if targets == "all-linear":
        return list(shapes.items())
    wanted = {targets} if isinstance(targets, str) else set(targets)
    return [(name, shape) for name, shape in shapes.items() if name in wanted]


def lora_params(model: ModelSpec, r: int, targets: str | tuple[str, ...] = "all-linear") -> int:
    """Trainable LoRA parameters: r x (in + out) for each adapted linear layer in every block."""
    return model.num_layers * sum(r * (i + o) for _, (i, o) in _targeted_shapes(model, targets))


def _frozen_small_params(model: ModelSpec) -> int:
    """Norm weights and biases: small, but they follow the embedding's dtype."""
    norms = (2 * model.num_layers + 1) * model.hidden_size
    biases = 0
    if model.attention_bias:
        biases = model.num_layers * (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    return norms + biases


def estimate_peak_vram(case: PlanCase, profile: EngineProfile = BASELINE) -> VramEstimate:
    """Estimate the peak VRAM of one training step, as named parts in bytes."""
    m = case.model
    compute_bytes = DTYPE_BYTES[case.compute_dtype]
    tokens = case.seq_len * case.micro_batch
    linear = m.num_layers * m.block_linear_params()
    frozen_other = m.embedding_params() + _frozen_small_params(m) - embedding_params_on_cpu(case, profile)
    parts: dict[str, float] = {}

    if case.method == "qlora":
        other_bytes = 4 if profile.upcast_frozen_to_fp32 else compute_bytes
        parts["weights"] = linear * NF4_BITS[case.double_quant] / 8 + frozen_other * other_bytes
        act_bytes = 4 if (profile.upcast_frozen_to_fp32 and profile.activation_dtype_follows_upcast) else compute_bytes
    else:
        parts["weights"] = (linear + frozen_other) * compute_bytes
        act_bytes = compute_bytes

    # fp16 training (cards without bf16) keeps adapters fp32 whatever the recipe says (engine/loading.py
    # ``adapter_compute_dtype``): the fp16 grad scaler refuses to unscale fp16 gradients
    adapter_dtype = "fp32" if case.compute_dtype == "fp16" else profile.adapter_dtype
    optimizer_bytes = OPTIMIZER_STATE_BYTES[case.optimizer]
    if case.method == "full":
        trainable = linear + frozen_other
        parts["trainable"] = trainable * (4 + 4 + optimizer_bytes)  # fp32 master copy, grads, states
    else:
        adapter_bytes = DTYPE_BYTES[adapter_dtype]
        parts["lora"] = lora_params(m, case.lora_r, case.lora_targets) * (2 * adapter_bytes + optimizer_bytes)

    kept = min(case.kept_layers if profile.keeps_layers else 0, m.num_layers)
    recomputed = m.num_layers - kept if case.gradient_checkpointing else 0
    hidden_copies = 0 if profile.offload_checkpoints else recomputed
    kept_adapter = "bf16" if case.method == "full" else adapter_dtype
    # a kept layer also keeps the attention's (rows x s x s) padding mask, at most tokens x seq_len
    kept_each = tokens * (kept_layer_bytes(m, act_bytes, kept_adapter) + case.seq_len * act_bytes)
    parts["activations"] = tokens * hidden_copies * m.hidden_size * act_bytes + (m.num_layers - recomputed) * kept_each

    q_width = m.num_heads * m.head_dim
    kv_width = m.num_kv_heads * m.head_dim
    mlp_width = m.intermediate_size * (3 if m.mlp_is_gated else 2)
    rest_width = 2 * m.hidden_size + q_width + 2 * kv_width + q_width
    # A chunked MLP keeps one chunk's intermediates (and their gradients) at a time; its input and
    # output are the hidden-wide tensors the rest of the layer already counts.
    mlp_tokens = min(tokens, mlp_chunk_size(profile.mlp_chunk_tokens, tokens) or tokens)
    mlp_factor = profile.mlp_factor or profile.layer_factor
    layer = (profile.layer_factor * tokens * rest_width + mlp_factor * mlp_tokens * mlp_width) * act_bytes
    if case.method != "full" and DTYPE_BYTES[adapter_dtype] > act_bytes:
        adapted = _targeted_shapes(m, case.lora_targets)
        upcast_elements = sum(i * (mlp_tokens if name in MLP_LINEARS else tokens)
                              for name, (i, _) in adapted)
        layer += profile.adapter_upcast_copies * upcast_elements * DTYPE_BYTES[adapter_dtype]

    attention = 0.0
    # The math SDPA backend is the fallback for fp32 inputs with grouped-query attention; eager always
    # materialises the scores.
    if profile.attention_materialises_scores and (m.num_kv_heads < m.num_heads or not profile.upcast_frozen_to_fp32):
        attention = profile.attention_copies * case.micro_batch * m.num_heads * case.seq_len**2 * act_bytes

    if profile.ce_chunk_tokens:
        chunk = profile.ce_chunk_tokens if profile.ce_chunk_tokens > 0 else loss_chunk_size(m.vocab_size)
        logits = profile.chunked_logits_copies * min(tokens, chunk) * m.vocab_size * 4
    else:
        logits = profile.logits_copies * tokens * m.vocab_size * 4
    # The loss's peak (end of forward) and the last layer's recomputation (start of backward) don't
    # overlap: only the larger of the two is part of the peak.
    if logits >= layer + attention:
        parts["logits"] = logits
    else:
        parts["layer"], parts["attention"] = layer, attention
    peak_transient = max(logits, layer + attention)
    parts["slack"] = profile.slack * (parts["activations"] + peak_transient + parts["weights"] * 0.1)
    parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return VramEstimate({k: v for k, v in parts.items() if v > 0})


def kept_layers_of(memory: MemorySpec) -> int:
    """``memory.layers_keeping_activations`` as a number: ``auto`` not yet decided by auto-fit keeps none."""
    kept = memory.layers_keeping_activations
    return kept if isinstance(kept, int) else 0


def kept_layer_bytes(model: ModelSpec, act_bytes: int, adapter_dtype: str) -> float:
    """Bytes a token that one decoder layer keeps for the backward pass when it is not checkpointed
    (``KEPT_LAYER_BYTES``), scaled to the activations' dtype."""
    per_width, per_mlp = KEPT_LAYER_BYTES["fp32" if adapter_dtype == "fp32" else "bf16"]
    attention_width = model.hidden_size + (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    mlp_width = model.intermediate_size * (3 if model.mlp_is_gated else 2)
    return (per_width * attention_width + per_mlp * mlp_width / 3) * act_bytes / 2


EMBEDDINGS_STAY_NOTE = ("memory.embeddings_on_cpu has no effect here: the input embedding stays on the GPU where "
                        "the lm_head is the input embedding (tied), where it trains (full fine-tuning, or a LoRA target) "
                        "and on Unsloth")
"""Why ``memory.embeddings_on_cpu`` saves nothing (``embedding_params_on_cpu``): the plan's verdict and the
worker's warning both say it."""


def embedding_params_on_cpu(case: PlanCase, profile: EngineProfile) -> int:
    """Parameters of the input embedding kept in CPU RAM rather than on the GPU: all of it when the profile
    says so, the model's lm_head is a matrix of its own and the embedding is frozen (not a full fine-tune,
    not a LoRA target); else none. (Unsloth's
    profile never moves it: that backend loads its own way.)"""
    if (not profile.input_embedding_on_cpu or case.model.tied_embeddings or case.method == "full"
            or adapts_input_embedding(case.lora_targets)):
        return 0
    return case.model.input_embedding_params()


INPUT_EMBEDDING_NAMES = ("embed_tokens", "embed_in", "wte", "word_embeddings")
"""Module names of the input embedding in the architectures we train (Llama, Mistral, Qwen2, Gemma and
Phi use ``embed_tokens``); ``all-linear`` never adapts it."""


def adapts_input_embedding(lora_targets: str | tuple[str, ...] | list[str]) -> bool:
    """Whether the LoRA targets name the input embedding: then it trains (its LoRA weights at least) and
    has to stay on the GPU with the optimizer."""
    if isinstance(lora_targets, str):
        return lora_targets in INPUT_EMBEDDING_NAMES
    return any(name.split(".")[-1] in INPUT_EMBEDDING_NAMES for name in lora_targets)


def profile_named(name: str) -> EngineProfile:
    """One of ``PROFILES`` by name (the calibration table in tests/test_core_planner.py names its stacks)."""
    return PROFILES[name]
