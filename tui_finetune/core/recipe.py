"""The recipe: everything needed to start (and restart) a fine-tune, as typed dataclasses.

A recipe is a TOML file with one table per concern. Loading it checks every key and value and
names the file and the key on any mistake, with a "did you mean" for typos, so that a bad recipe
fails in a second instead of an hour into a run. Whether it runs on this machine, and what its
``auto`` precisions become there, is recipe_machine.py's; the resolved recipe is what a run folder stores.
This module is plain Python: it must not import torch.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

METHODS = ("qlora", "lora", "full")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANT_TYPES = ("nf4", "fp4")
ADAPTER_DTYPES = ("fp32", "compute")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
BACKENDS = ("auto", "universal", "liger", "unsloth")
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
            return "packed bins"
        return "length groups" if self.group_by_length else "padded rows"


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
    attention: str = "sdpa"
    """Attention kernel: sdpa (PyTorch's flash/memory-efficient kernels), eager, or flash_attention_2."""
    backend: str = "auto"
    """Kernels: ``universal`` (pure PyTorch, works everywhere), ``liger`` (Triton kernels), ``unsloth``
    (when installed), or ``auto``: Unsloth where it is installed and supports the card and architecture,
    else universal (engine/backends.py; the choice and its reason go to run.json)."""


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


# ---------------------------------------------------------------- TOML in and out

def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against the dataclass field's type; ints are accepted for floats."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string in quotes, got {value!r}")
    if hint == int | str:  # train.devices: a number or "all"
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected a whole number or a string in quotes, got {value!r}")
    # list[str] | str (LoRA target modules)
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise RecipeError(f"{where}: expected a string or a list of strings, got {value!r}")


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in names:
            close = get_close_matches(key, names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
            raise RecipeError(f"{where}: unknown key.{hint}")
        hint = hints[key]
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: expected a [{prefix}{key}] table")
            kwargs[key] = _build(hint, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(where, value, hint)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'top level'}: {err}") from None


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> RecipeSpec:
    recipe = _build(RecipeSpec, data, source)
    check_recipe_values(recipe, source)
    return recipe


def fill_missing_keys(data: dict[str, Any], missing: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a raw recipe dict, changed in place) with each dotted key of ``missing`` it lacks set to the
    value given there instead of today's default."""
    for key, value in missing.items():
        *tables, name = key.split(".")
        table = data
        for part in tables:
            table = table.setdefault(part, {})
        if isinstance(table, dict):
            table.setdefault(name, value)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                missing: dict[str, Any] | None = None) -> RecipeSpec:
    """Load and check a recipe TOML, then apply ``key=value`` overrides (``--set``). ``missing``: dotted keys
    the file may lack and the value they then take (a run folder's recipe written before a key existed,
    core/run_folder/info.py), not today's default."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file: list the presets with 'tui-finetune plan'") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: invalid TOML ({err}): fix the line it names") from None
    if "model" not in data:
        raise RecipeError(f"{path}: model: missing: add a line such as model = \"phi-2\"")
    fill_missing_keys(data, missing or {})
    recipe = recipe_from_dict(data, str(path))
    for item in overrides or []:  # one at a time, so a bad value is blamed on its --set, not on the file
        apply_override(data, item, str(path))
        recipe = recipe_from_dict(data, f"--set {item.strip()}")
    return recipe


def _parse_override_value(raw: str) -> Any:
    """Read the right-hand side of ``--set`` as a TOML value, or as a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _find_field_path(key: str, source: str) -> list[str]:
    """Resolve ``train.micro_batch`` or a unique bare name such as ``micro_batch`` to a path."""
    parts = key.split(".")
    cls: Any = RecipeSpec
    for i, part in enumerate(parts):
        hints = get_type_hints(cls)
        if part not in hints:
            break
        if i == len(parts) - 1:
            return parts
        cls = hints[part]
        if not is_dataclass(cls):
            break
    else:
        return parts
    if len(parts) == 1:
        owners = [f.name for f in fields(RecipeSpec)
                  if is_dataclass(get_type_hints(RecipeSpec)[f.name])
                  and key in get_type_hints(get_type_hints(RecipeSpec)[f.name])]
        if len(owners) == 1:
            return [owners[0], key]
    every = [f.name for f in fields(RecipeSpec) if not is_dataclass(get_type_hints(RecipeSpec)[f.name])]
    for f in fields(RecipeSpec):
        sub = get_type_hints(RecipeSpec)[f.name]
        if is_dataclass(sub):
            every += [f"{f.name}.{g.name}" for g in fields(sub)]
    close = get_close_matches(key, every, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(f"{source}: --set {key}: unknown key.{hint}")


def apply_override(data: dict[str, Any], item: str, source: str = "recipe") -> None:
    """Apply one ``key=value`` override to a raw recipe dict in place."""
    if "=" not in item:
        raise RecipeError(f"{source}: --set {item}: expected key=value, e.g. --set train.micro_batch=2")
    key, raw = item.split("=", 1)
    path = _find_field_path(key.strip(), source)
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = _parse_override_value(raw.strip())


def recipe_to_toml(recipe: RecipeSpec, header: str = "") -> str:
    """TOML text of a recipe, with an optional leading comment block."""
    body = tomli_w.dumps(_drop_none(recipe.to_dict()))
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    return ("\n".join(lines) + "\n\n" if lines else "") + body


def save_recipe(recipe: RecipeSpec, path: str | Path, header: str = "") -> None:
    Path(path).write_text(recipe_to_toml(recipe, header), encoding="utf-8")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


def recipe_diff(old: RecipeSpec, new: RecipeSpec) -> list[str]:
    """Human-readable differences ``key: old -> new``, for resume refusals."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(old.to_dict()), flat(new.to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
