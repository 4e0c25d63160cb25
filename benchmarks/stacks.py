"""What one benchmark child process does: build the random model, set up one stack, train and measure.

Every function here runs inside a child started by ``memory_speed.py`` (one process per case and
stack, so peaks don't mix). Imports of torch, transformers and peft stay inside the functions: our
engine's backends and Unsloth must be imported before transformers.

  ours:<backend>  our engine through ``tui_finetune.engine.backends`` (universal, compiled, liger, unsloth or
                  auto), the default recipe plus --set overrides, the backend's own loss; with the
                  recipe's default ``data.group_by_length = true`` it trains the engine's length groups;
                  ``:packed`` also sets ``data.packing = true``, ``:grouped`` ``data.group_by_length =
                  true`` and ``:rows`` ``data.group_by_length = false`` (as --set does); ``:fitted``
                  auto-fits the recipe to the case's cap; ``ours:compiled:dynamic`` compiles the decoder
                  layers with ``dynamic=True``
  baseline        transformers + peft + bitsandbytes: prepare_model_for_kbit_training (QLoRA),
                  non-reentrant checkpointing, SDPA, the model's own loss
  unsloth         Unsloth's FastLanguageModel with use_gradient_checkpointing="unsloth"

All stacks use LoRA r16 / alpha 32 on all linear layers, seeded with ``SEED`` just before the
adapters are made (so the first 50 losses can be compared), and the same random token rows, batched
as ``batches.py`` says (fixed or real lengths; micro-batches padded to their longest row, or for ours
the engine's packed bins or length groups). A step is the case's accumulation of micro-batches, its
loss normalised over the step's loss-carrying tokens (``num_items_in_batch``, as HF Trainer and our
engine pass it), then one optimizer step. On a GPU the optimizer is bitsandbytes' paged AdamW 8-bit;
in --smoke mode (CPU) it is torch's AdamW.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Protocol

from benchmarks import batches
from tui_finetune.core.gpu_allocator import allocator_in_use

GIB = 1024**3
SEED = 42
"""The recipe's default ``train.seed``: our backends seed LoRA with it, so the other stacks do too."""
LEARNING_RATE = 2e-4
WARMUP_STEPS = 3
"""Steps left out of tokens/s: kernel compilation, the allocator's first growth, paged-optimizer set-up."""
PACKED = batches.PACKED
"""The stack variant ``ours:<backend>:packed``: the recipe with ``data.packing = true``."""
GROUPED = batches.GROUPED
"""The stack variant ``ours:<backend>:grouped``: the recipe with ``data.group_by_length = true`` (its default)."""
ROWS = batches.ROWS
"""The stack variant ``ours:<backend>:rows``: ``data.group_by_length = false``, ``batch`` padded rows a pass."""
FITTED = "fitted"
"""The stack variant ``ours:<backend>:fitted``: the recipe auto-fitted to the case's cap, as the worker fits a
fresh run to a card's free memory (core/fit_levers.py): on a cap with room, layers keep their activations. The
speed we reach with a reference's memory (issue #14 item 4) is this variant at the reference's peak as cap."""
DYNAMIC = "dynamic"
"""The stack variant ``ours:compiled:dynamic``: the decoder layers compiled with ``dynamic=True``
(``regional_compile.DYNAMIC_SHAPES``), so a GPU run can A/B it against the default before it becomes one."""
VARIANTS = (PACKED, GROUPED, ROWS, FITTED, DYNAMIC)
SMOKE_MODEL = "smoke-llama"
"""The --smoke model: a 2-layer Llama (hidden 64, vocabulary 512) built locally with random weights."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def scratch_dir() -> Path:
    return Path(os.environ.get("TUIFT_BENCH_SCRATCH", "/tmp/tuift-bench"))


def model_folder(key: str) -> Path:
    return scratch_dir() / key


def model_spec(key: str) -> Any:
    """The catalog's ModelSpec, or one read from the saved config.json (the smoke model)."""
    from tui_finetune.core.catalog import CATALOG, model_spec_from_config

    if key in CATALOG:
        return CATALOG[key]
    config = json.loads((model_folder(key) / "config.json").read_text(encoding="utf-8"))
    return model_spec_from_config(config, key)


# ---------------------------------------------------------------- random models

def build_model(key: str) -> Path:
    """Random weights of the catalog architecture (bf16 on the GPU), saved once per model with a stand-in
    tokenizer; or the tiny smoke Llama (fp32, CPU)."""
    import torch
    import transformers

    folder = model_folder(key)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    if key == SMOKE_MODEL:
        config = transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    else:
        from tui_finetune.core.catalog import get_model

        spec = get_model(key)
        if not torch.cuda.is_available():
            raise SystemExit(f"no CUDA GPU here to build {key}: use --smoke to test the script on the CPU")
        config = transformers.AutoConfig.for_model(**spec.to_config_dict())
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")  # a killed build never looks finished
    model.save_pretrained(partial)
    save_stand_in_tokenizer(partial, config.vocab_size)
    partial.rename(folder)
    return folder


def save_stand_in_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with the model's vocabulary size: memory_speed's batches are random token ids,
    but Unsloth's loader insists on a tokenizer beside the weights (and can't convert a slow one here).
    Text splits into words (``t5 t6`` -> ids 5, 6), so cards.py's chat rows have the lengths it writes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()  # without it a whole text is one unknown token
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level,
                                        bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- the stacks

LossFn = Callable[[Any, dict, int | None], Any]
"""(model, micro-batch, the step's loss-carrying tokens or None for a step of one micro-batch) -> loss."""


def model_loss(model: Any, batch: dict, step_items: int | None) -> Any:
    """The model's own loss; over a step of several micro-batches normalised by the step's tokens, as
    Trainer.compute_loss passes ``num_items_in_batch`` to a model that accepts loss kwargs."""
    if step_items is None:
        return model(**batch).loss
    return model(**batch, num_items_in_batch=step_items).loss


class StepObserver(Protocol):
    """Watches the measured loop without changing it (profile_step.py's profiler): ``attach`` sees the model
    once before the first step, ``step(i)`` wraps step i's timed region (forward, backward, optimizer, the
    closing synchronize). memory_speed passes none."""

    def attach(self, model: Any) -> None: ...

    def step(self, index: int) -> AbstractContextManager[Any]: ...


def split_stack(stack: str) -> tuple[str, str, str]:
    """``ours:universal:packed`` -> ("ours", "universal", "packed"); ``baseline`` -> ("baseline", "", "")."""
    kind, _, rest = stack.partition(":")
    backend, _, variant = rest.partition(":")
    return kind, backend, variant


def ours_recipe(folder: Path, case: dict, backend: str, overrides: list[str], smoke: bool,
                variant: str = "") -> Any:
    """The default recipe for the case, --set overrides applied, then the stack's backend and variant."""
    from tui_finetune.core.recipe import RecipeSpec
    from tui_finetune.core.recipe_io import apply_override, recipe_from_dict

    raw = RecipeSpec(model=str(folder), method=case["method"]).to_dict()
    raw["data"]["seq_len"], raw["train"]["micro_batch"] = case["seq"], case["batch"]
    raw["train"]["grad_accum"] = batches.accumulation(case)
    raw["train"]["seed"] = SEED
    if smoke:
        raw["train"]["optimizer"] = "adamw_torch"  # what the smoke loop uses; the planner reads it
    for item in overrides:
        apply_override(raw, item, "benchmark recipe")
    raw["memory"]["backend"] = backend
    if variant == PACKED:
        raw["data"]["packing"] = True
    elif variant in (GROUPED, ROWS):
        raw["data"]["group_by_length"] = variant == GROUPED
    return recipe_from_dict(raw, "benchmark recipe")


def fit_to_cap(recipe: Any, case: dict) -> tuple[Any, list[str]]:
    """``recipe`` auto-fitted to the case's cap, the memory torch may reserve (so the CUDA context is not
    counted), with the planner's profile of the backend it asks for; and the ``key=value`` settings changed."""
    from tui_finetune.core.fit_levers import auto_fit

    if not case.get("cap_gb"):
        raise SystemExit(f"the {FITTED} variant fits the recipe to the case's cap: give the case one")
    decision = auto_fit(recipe, model_spec(case["model"]), case["cap_gb"] * GIB, context_allocated=True)
    return decision.recipe, decision.settings


def setup_ours(folder: Path, recipe: Any) -> tuple[Any, LossFn, dict]:
    """Load through the engine's backend interface; ``unsloth_import.prepare_process`` has run already."""
    from tui_finetune.engine import backends
    from tui_finetune.engine.loading import detect_device

    loaded = backends.load_for_training(folder, recipe, detect_device())
    backend, memory = loaded.backend, recipe.memory
    info = {"backend": loaded.backend.name, "backend_requested": loaded.choice.requested,
            "backend_reason": loaded.choice.reason, "backend_skipped": list(loaded.choice.skipped)}
    return loaded.model, ours_loss(backend, memory), info


def ours_loss(backend: Any, memory: Any) -> LossFn:
    """The loss our Trainer's ``compute_loss`` takes for this backend and ``[memory]`` table."""
    def loss(model: Any, batch: dict, step_items: int | None) -> Any:
        if step_items is not None and backend.uses_model_loss(memory):
            return model_loss(model, batch, step_items)
        return backend.loss(model, batch, memory, step_items)

    return loss


def setup_baseline(folder: Path, case: dict, gpu: bool, dtype: Any = None) -> tuple[Any, LossFn, dict]:
    """``dtype``: of the loaded weights, default bf16 on a GPU and fp32 on the CPU (step_ops.py passes a GPU's)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if gpu:
        kwargs["device_map"] = {"": 0}
    if case["method"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if case["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if hasattr(model, "activation_checkpointing_enable"):  # the new name (transformers 5.2x)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    set_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    return model, model_loss, {}


def setup_unsloth(folder: Path, case: dict) -> tuple[Any, LossFn, dict]:
    from unsloth import FastLanguageModel  # noqa: I001 - imported before transformers by run_one

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=case["seq"],
                                                 load_in_4bit=case["method"] == "qlora", dtype=None)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=LORA_TARGETS, random_state=SEED)
    return model, model_loss, {}


# ---------------------------------------------------------------- one measured run

def run_one(case: dict, stack: str, steps: int, overrides: list[str], smoke: bool,
            observer: StepObserver | None = None) -> dict:
    """Train one case on one stack in this process; returns the row (losses, peak, tokens/s, planner).
    ``observer``: see ``StepObserver`` (None: the plain benchmark)."""
    kind, backend, variant = split_stack(stack)
    folder = model_folder(case["model"])
    recipe = None
    fitted: list[str] = []
    if kind == "ours":
        recipe = ours_recipe(folder, case, backend, overrides, smoke, variant)  # plain Python: no transformers yet
        if variant == FITTED:
            recipe, fitted = fit_to_cap(recipe, case)
        from tui_finetune.engine import unsloth_import
        from tui_finetune.engine.model_folder import model_type_of

        unsloth_import.prepare_process(recipe.memory.backend,  # imports Unsloth first when it may be used
                                       model_type=model_type_of(folder))
        if variant == DYNAMIC:  # ours:compiled:dynamic only (memory_speed.parse_stack)
            from tui_finetune.engine import regional_compile

            regional_compile.DYNAMIC_SHAPES = True  # this child process's alone
    elif kind == "unsloth":
        from tui_finetune.engine.model_folder import model_type_of
        from tui_finetune.engine.unsloth_import import set_unsloth_compiler

        set_unsloth_compiler(model_type_of(folder))  # as our engine runs it (Unsloth direct fails too on Gemma)
        import unsloth  # noqa: F401 - patches transformers and peft, so it must come first
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        raise SystemExit("no CUDA GPU here: memory_speed measures GPU memory; "
                         "use --smoke to test the script on the CPU")
    if gpu and case.get("cap_gb"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(case["cap_gb"] * GIB / total, 1.0))
    if smoke:
        build_model(case["model"])  # a second process just for the tiny model would double the test's time
    torch.manual_seed(SEED)
    started = time.perf_counter()
    if kind == "ours":
        model, loss_fn, info = setup_ours(folder, recipe)
    elif kind == "baseline":
        model, loss_fn, info = setup_baseline(folder, case, gpu)
    else:
        model, loss_fn, info = setup_unsloth(folder, case)
    load_s = time.perf_counter() - started
    batching = batches.batching_for(bool(recipe and recipe.data.packing),
                                    bool(recipe and recipe.data.group_by_length), case)
    collate = batches.collator_for(kind, batching, case, folder)
    measured = train_and_measure(model, loss_fn, case, steps, gpu, collate, batching, observer)
    row = {"stack": stack, **case, "accum": batches.accumulation(case), "steps": steps,
           "device": torch.cuda.get_device_name(0) if gpu else "CPU", "cuda": torch.version.cuda if gpu else None,
           "load_s": load_s, "packing": batching == PACKED, "batching": batching, "autofit": fitted,
           # set by this child for Gemma (unsloth_import.UNSLOTH_UNCOMPILED), so the parent's command line can't say it
           "unsloth_compile_disable": os.environ.get("UNSLOTH_COMPILE_DISABLE"),
           "alloc_conf": allocator_in_use(),
           "rows_per_step": batches.rows_per_step(case, steps, model_spec(case["model"]).vocab_size, batching),
           **info, **measured}
    if recipe is not None:
        row.update(plan_peak(case["model"], recipe, info.get("backend", "")))
    return row


def make_optimizer(params: list, gpu: bool) -> Any:
    import torch

    if gpu:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=LEARNING_RATE)
    return torch.optim.AdamW(params, lr=LEARNING_RATE)


def train_and_measure(model: Any, loss_fn: LossFn, case: dict, steps: int, gpu: bool,
                      collate: batches.Collate | None = None, batching: str = batches.ROWS,
                      observer: StepObserver | None = None) -> dict:
    """``steps`` optimizer steps, each over its micro-batches (``batches.plan_steps``: the accumulation's
    micro-batches of ``batch`` rows, or packed bins, or length groups); the peak counts from the first step
    on (weights included, loading transients not). A step's loss is the sum of its micro-batches' losses,
    each normalised by the step's loss-carrying tokens (a step of one micro-batch: the loss as before).

    Speeds count whole steps and leave out the first ``WARMUP_STEPS``: ``tokens_per_s`` counts every token
    of the input tensors (padding included), ``useful_tokens_per_s`` only the rows' own tokens, and
    ``loss_tokens_per_s`` those that carry loss. With fixed lengths and no padding the first two are equal."""
    import torch

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], gpu)
    device = model.get_input_embeddings().weight.device
    vocab = model_spec(case["model"]).vocab_size
    model.train()
    if observer is not None:
        observer.attach(model)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times, tokens, useful, counted, passes = [], [], [], [], [], []
    steps_in = enumerate(batches.step_batches(case, steps, vocab, collate, device, batching))
    for index, micro_batches in steps_in:
        step_items = sum(carrying for _, _, carrying in micro_batches) if len(micro_batches) > 1 else None
        parts = []
        if gpu:
            torch.cuda.synchronize()
        with observer.step(index) if observer is not None else nullcontext():
            start = time.perf_counter()
            for batch, _, _ in micro_batches:
                loss = loss_fn(model, batch, step_items)
                loss.backward()
                parts.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        losses.append(sum(float(part) for part in parts))
        tokens.append(sum(int(batch["input_ids"].numel()) for batch, _, _ in micro_batches))
        useful.append(sum(real_tokens for _, real_tokens, _ in micro_batches))
        counted.append(sum(carrying for _, _, carrying in micro_batches))
        passes.append(len(micro_batches))
    first = WARMUP_STEPS if len(times) > WARMUP_STEPS else 0
    seconds = sum(times[first:])
    return {
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if gpu else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if gpu else None,
        "tokens_per_s": sum(tokens[first:]) / seconds,
        "useful_tokens_per_s": sum(useful[first:]) / seconds,
        "loss_tokens_per_s": sum(counted[first:]) / seconds,
        "useful_share": sum(useful) / sum(tokens),
        "passes_per_step": sum(passes) / len(passes),
        "losses": losses,
    }


def plan_peak(key: str, recipe: Any, backend: str = "") -> dict:
    """The planner's prediction for our recipe on the backend that ran: ``torch_peak`` predicts
    max_memory_reserved (the CUDA context, which torch doesn't see, is only in ``total``)."""
    from dataclasses import replace

    from tui_finetune.core.planner import PlanCase, estimate_peak_vram, profile_from_memory

    memory = replace(recipe.memory, backend=backend or recipe.memory.backend)
    estimate = estimate_peak_vram(PlanCase.from_recipe(model_spec(key), recipe), profile_from_memory(memory))
    return {"planner_torch_gib": estimate.torch_peak / GIB, "planner_total_gib": estimate.total / GIB}
