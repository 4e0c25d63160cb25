"""The recipe: everything needed to start (and restart) a fine-tune, as typed dataclasses, and the values they allow.

A recipe has one spec per concern, one TOML table each. ``check_recipe_values`` checks every value and names
the key on a mistake, with a "did you mean" for typos, so that a bad recipe fails in a second instead of an
hour into a run. This module is what a recipe *is*; turning TOML text, raw dicts and ``--set`` overrides into
a spec and a spec back into TOML is recipe_io.py's (its docstring says why the cut is at the spec).
Whether a recipe runs on this machine, and what its ``auto`` precisions become there, is recipe_machine.py's;
the resolved recipe is what a run folder stores.
This module is plain Python: it must not import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from difflib import get_close_matches
from typing import Any

METHODS = ("qlora", "lora", "full")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANT_TYPES = ("nf4", "fp4")
ADAPTER_DTYPES = ("fp32", "compute")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
BACKENDS = ("auto", "universal", "compiled", "liger", "unsloth")
AUTO = "auto"
"""A setting the engine decides on the card (``memory.layers_keeping_activations``)."""
LENGTH_GROUPS, PACKED_BINS, PADDED_ROWS = BATCHINGS = ("length groups", "packed bins", "padded rows")
"""How the training rows become batches, in words (``DataSpec.batching``, the wizard's batching knob, the
launch screen): the two data keys ``packing`` and ``group_by_length`` give these three; the default first."""


class RecipeError(ValueError):
    """A recipe that can't be loaded or can't work; the message names the file, the key and the fix."""


@dataclass
class QuantSpec:
    """4-bit quantization of the frozen base weights (QLoRA only)."""

    quant_type: str = "nf4"
    """nf4 (normal float, best for normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too: saves about 0.37 bits per parameter."""
    compute_dtype: str = "auto"
    """dtype of the matmuls: auto picks bf16 where the card has it, else fp16."""


@dataclass
class LoraSpec:
    r: int = 16
    """Rank of the adapter matrices. 8-64 is usual; memory grows linearly with it."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear`` for every linear layer but the output head."""


@dataclass
class DataSpec:
    seq_len: int = 1024
    """Longest sequence in tokens; longer examples are truncated and counted."""
    packing: bool = False
    """Pack the training rows into bins of up to ``seq_len`` tokens, one bin a sequence (padding-free, no
    attention across rows): fewer, fuller passes. ``train.micro_batch`` then counts bins, and the engine lowers
    the accumulation so a step still sees about the effective batch in rows (docs/design.md, Loop)."""
    group_by_length: bool = True
    """Train on groups of rows of similar length, each padded to its longest and holding at most
    ``micro_batch x min(seq_len, the longest row)`` tokens (the padded worst case of a micro-batch of rows, so
    the plan and the fit-check still hold): one group a pass, short rows many to a pass. A pass costs nearly
    the same whatever its tokens (a profile on an H200 found 84% of a short-row step in launches), so fewer,
    fuller passes are the speed on real data; the rows stay ordinary padded rows (no attention change, Unsloth
    allowed). The accumulation is lowered so a step still sees about the effective batch in rows. Ignored
    when ``packing`` is on; a run folder written before this key existed keeps its rows (false)."""
    train_on_prompt: bool = False
    """Also train on prompt tokens; by default only assistant/completion tokens carry loss."""
    template: str = "auto"
    """Chat template: ``auto`` uses the tokenizer's own, else a named default (chatml, alpaca)."""
    eval_split: float = 0.05
    """Fraction of rows held out for evaluation (0 disables evaluation)."""
    format: str = "auto"
    """Dataset format: auto, alpaca, sharegpt, messages, prompt_completion or text."""
    columns: str = ""
    """Which file columns feed which fields, e.g. ``prompt=question,reply=answer`` (fields: prompt, input,
    reply, system, messages, text); empty: the format's own column names. ``--columns`` on the CLI."""
    max_drop_fraction: float = 0.05
    """Refuse the data when more than this fraction of its rows is unusable (a broken export shouldn't
    train on what is left by accident); 1.0 accepts any loss. ``--allow-drop`` on the CLI sets 1.0."""

    @property
    def batching(self) -> str:
        """How the training rows become batches, in words: ``packed bins`` (``packing`` wins), ``length groups``
        (``group_by_length``) or ``padded rows``; the launch screen shows it."""
        if self.packing:
            return PACKED_BINS
        return LENGTH_GROUPS if self.group_by_length else PADDED_ROWS

    def batched_as(self, batching: str) -> DataSpec:
        """This spec with its rows batched as ``batching`` (one of ``BATCHINGS``): the inverse of ``batching``,
        for the wizard's knob. ``packed bins`` leaves ``group_by_length`` as it is: packing wins over it, and
        kept it still says what turning packing off gives, so a recipe read back from the knobs is the one loaded."""
        if batching not in BATCHINGS:
            raise RecipeError(f"batching: {batching!r} is not one of {', '.join(BATCHINGS)}")
        if batching == PACKED_BINS:
            return replace(self, packing=True)
        return replace(self, packing=False, group_by_length=batching == LENGTH_GROUPS)


@dataclass
class TrainSpec:
    micro_batch: int = 1
    """Sequences per forward pass: the main memory knob after sequence length."""
    grad_accum: int = 8
    """Micro-batches per optimizer step; effective batch = micro_batch x grad_accum."""
    epochs: float = 1.0
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means train for ``epochs``."""
    learning_rate: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    optimizer: str = "adamw_8bit"
    """bitsandbytes' 8-bit AdamW in plain device memory. Not the paged variant: its states live in CUDA managed
    memory, and on a card that other programs have filled, its first step died with an illegal memory access
    (an unrecoverable crash, not an OOM) on the card simulator; LoRA's states are a few MB, so paging buys nothing."""
    precision: str = "auto"
    """Mixed precision: auto picks bf16 where the card has it, fp16 on older cards, fp32 on the CPU."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory for about 30% more time."""
    logging_steps: int = 1
    seed: int = 42
    devices: int | str = 1
    """GPUs to train on, data-parallel (torchrun): 1, a number, or ``"all"``. Every GPU holds the whole
    model and trains its own share of each step's rows, so the effective batch is micro_batch x
    grad_accum x devices; a model that doesn't fit one card is not split across cards. Without a GPU,
    N processes on the CPU (what the tests use)."""


@dataclass
class CheckpointSpec:
    every_steps: int = 100
    every_minutes: float = 10.0
    """Also save on wall-clock time: on a slow card a step interval alone can lose hours."""
    keep_last: int = 3


@dataclass
class EvalSpec:
    every_steps: int = 0
    """Evaluate on the held-out rows every this many optimizer steps; 0 = as often as checkpoints are
    saved (``checkpoint.every_steps``). Evaluation costs time, saving costs disk: each has its own knob."""


@dataclass
class MemorySpec:
    """The engine's memory techniques, each switchable; the planner models exactly these."""

    upcast_frozen_fp32: bool = False
    """Cast embeddings, lm_head and norms to fp32, as peft's prepare_model_for_kbit_training does.
    Off by default: on Gemma's 256k vocabulary it costs over 1 GB and turns activations fp32."""
    adapter_dtype: str = "fp32"
    """LoRA weights and gradients in fp32 (most stable) or ``compute`` (the compute dtype, half the memory)."""
    chunked_loss: bool = True
    """Compute the cross-entropy a chunk of tokens at a time, so full-vocabulary fp32 logits never exist."""
    loss_chunk_tokens: int = 0
    """Tokens per loss chunk; 0 sizes it to the vocabulary (about 32M logits a chunk: 1024 tokens for
    Mistral's 32k vocabulary, 128 for Gemma's 256k)."""
    offload_activations: bool = False
    """Keep checkpointed activations in CPU RAM instead of VRAM (slower; for very long sequences)."""
    embeddings_on_cpu: bool = False
    """Keep the input embedding in CPU RAM and look its rows up there; one (tokens x hidden) copy goes to the
    GPU per forward. Same result, about the same speed, and the embedding's VRAM freed (1 GiB for
    Llama-3.1-8B's 128k vocabulary). Only where the lm_head is a matrix of its own (untied) and the
    embedding is frozen (LoRA, QLoRA) on the PyTorch paths (universal, liger); elsewhere it has no effect."""
    mlp_chunk_tokens: int = 0
    """Run each decoder layer's MLP over chunks of this many tokens, each chunk checkpointed, so only one
    chunk's (tokens x intermediate) working set exists at a time: the lever for very long sequences,
    where that working set is the peak (planner: a 7B at 40k tokens, 8 GiB whole, 0.8 GiB per 4096 tokens).
    Same result, but the MLP's forward runs once more. 0 = auto: chunks of 4096 tokens for batches of
    more than 16384 tokens (seq_len x micro_batch), where the MLP outweighs that cost; -1 = never;
    N > 0 = always chunks of N tokens."""
    layers_keeping_activations: int | str = AUTO
    """With ``train.gradient_checkpointing`` on: how many decoder layers (the last N) keep their activations
    for the backward pass instead of recomputing them. Such a layer skips its recompute, a quarter of its
    step's work, and holds all its activations instead of one hidden-state copy (the planner's
    ``kept_layer_bytes``: about 240 KB a token for a Gemma-2B layer). Same result. ``auto``: none on a tight
    card; where the card has room, auto-fit keeps as many as still fit with the planner's error to spare,
    and says so; an out-of-memory turns them all back to recomputing before anything else changes. Auto-fit
    runs on a fresh run only: a resume keeps the number recipe.toml holds (``auto`` there: none).
    0: every layer recomputes (the classic); N: pinned."""
    attention: str = "sdpa"
    """Attention kernel: sdpa (PyTorch's flash/memory-efficient kernels), eager, or flash_attention_2."""
    backend: str = "auto"
    """Kernels: ``universal`` (pure PyTorch, works everywhere), ``compiled`` (the same with its decoder
    layers through torch.compile; needs Triton), ``liger`` (Triton kernels), ``unsloth``
    (when installed), or ``auto``: Unsloth where it is installed and supports the card and architecture,
    else compiled where Triton exists, else universal (engine/backends.py; the choice and its reason go to run.json)."""


@dataclass
class RecipeSpec:
    """A complete fine-tuning recipe."""

    model: str
    """Catalog key (``phi-2``), Hub id (``org/name``) or a local model folder."""
    method: str = "qlora"
    trust_remote_code: bool = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    description: str = ""

    @property
    def eval_every_steps(self) -> int:
        """Steps between evaluations: ``eval.every_steps``, or the checkpoint interval when that is 0."""
        return self.eval.every_steps or self.checkpoint.every_steps

    @property
    def device_count(self) -> int:
        """``train.devices`` as a number of processes (``"all"`` counts as 1 until the launch settles it)."""
        return self.train.devices if isinstance(self.train.devices, int) else 1

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step: micro-batch x accumulation x devices. The one place this product
        is computed: the phase line, ``runs``, the resume check and OOM recovery all read it here, from
        the recipe in effect (the run's recipe.toml)."""
        return self.train.micro_batch * self.train.grad_accum * self.device_count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"{where}: '{value}' is not one of {', '.join(choices)}.{hint}")


def _check_range(where: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RecipeError(f"{where}: {value} must be {bound}")


def check_recipe_values(recipe: RecipeSpec, source: str = "recipe") -> None:
    """Check each value on its own (types are checked on load). Raises RecipeError naming the key."""
    _check_choice(f"{source}: method", recipe.method, METHODS)
    _check_choice(f"{source}: train.optimizer", recipe.train.optimizer, OPTIMIZERS)
    _check_choice(f"{source}: train.scheduler", recipe.train.scheduler, SCHEDULERS)
    _check_choice(f"{source}: train.precision", recipe.train.precision, PRECISIONS)
    _check_choice(f"{source}: quant.quant_type", recipe.quant.quant_type, QUANT_TYPES)
    _check_choice(f"{source}: quant.compute_dtype", recipe.quant.compute_dtype, PRECISIONS)
    _check_choice(f"{source}: memory.adapter_dtype", recipe.memory.adapter_dtype, ADAPTER_DTYPES)
    _check_choice(f"{source}: memory.attention", recipe.memory.attention, ATTENTIONS)
    _check_choice(f"{source}: memory.backend", recipe.memory.backend, BACKENDS)
    _check_range(f"{source}: memory.loss_chunk_tokens", recipe.memory.loss_chunk_tokens, 0)
    _check_range(f"{source}: memory.mlp_chunk_tokens", recipe.memory.mlp_chunk_tokens, -1)
    kept = recipe.memory.layers_keeping_activations
    if kept != AUTO and not (isinstance(kept, int) and kept >= 0):
        raise RecipeError(f"{source}: memory.layers_keeping_activations: {kept!r} must be \"{AUTO}\" or a number "
                          "of layers (0 or more)")
    _check_range(f"{source}: lora.r", recipe.lora.r, 1, 1024)
    _check_range(f"{source}: lora.alpha", recipe.lora.alpha, 1)
    _check_range(f"{source}: lora.dropout", recipe.lora.dropout, 0.0, 0.9)
    _check_range(f"{source}: data.seq_len", recipe.data.seq_len, 16, 1_048_576)
    _check_range(f"{source}: data.eval_split", recipe.data.eval_split, 0.0, 0.5)
    _check_range(f"{source}: data.max_drop_fraction", recipe.data.max_drop_fraction, 0.0, 1.0)
    _check_columns(f"{source}: data.columns", recipe.data.columns)
    _check_range(f"{source}: train.micro_batch", recipe.train.micro_batch, 1, 4096)
    _check_range(f"{source}: train.grad_accum", recipe.train.grad_accum, 1, 65536)
    _check_range(f"{source}: train.learning_rate", recipe.train.learning_rate, 1e-8, 1.0)
    _check_range(f"{source}: train.warmup_ratio", recipe.train.warmup_ratio, 0.0, 0.5)
    _check_range(f"{source}: train.max_steps", recipe.train.max_steps, 0)
    _check_range(f"{source}: train.logging_steps", recipe.train.logging_steps, 1)
    if recipe.train.devices != "all" and not (isinstance(recipe.train.devices, int) and recipe.train.devices >= 1):
        raise RecipeError(f"{source}: train.devices: {recipe.train.devices!r} must be a number of GPUs (1, 2, ...) "
                          "or \"all\"")
    _check_range(f"{source}: checkpoint.every_steps", recipe.checkpoint.every_steps, 1)
    _check_range(f"{source}: checkpoint.every_minutes", recipe.checkpoint.every_minutes, 0.0)
    _check_range(f"{source}: checkpoint.keep_last", recipe.checkpoint.keep_last, 1)
    _check_range(f"{source}: eval.every_steps", recipe.eval.every_steps, 0)
    if recipe.train.max_steps == 0 and recipe.train.epochs <= 0:
        raise RecipeError(f"{source}: train.epochs must be above 0 when train.max_steps is 0")
    if not str(recipe.model).strip():
        raise RecipeError(f"{source}: model is empty: give a catalog key such as 'phi-2', a Hub id or a folder")


def _check_columns(where: str, value: str) -> None:
    """The shape only (FIELD=COLUMN, comma-separated); the data layer checks the field names."""
    for part in filter(str.strip, value.split(",")):
        if "=" not in part or not part.split("=", 1)[1].strip():
            raise RecipeError(f"{where}: '{part.strip()}' is not FIELD=COLUMN: write it like "
                              "prompt=question,reply=answer")


def recipe_diff(old: RecipeSpec, new: RecipeSpec) -> list[str]:
    """Human-readable differences ``key: old -> new``, for resume refusals."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(old.to_dict()), flat(new.to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
