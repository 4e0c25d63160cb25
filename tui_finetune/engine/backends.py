"""Kernel backends behind one interface: the engine picks the fastest that works and says why.

* ``universal``: pure PyTorch (engine/memory_techniques.py): no Triton, so it runs everywhere, Windows included.
* ``compiled``: the universal path with each decoder layer through ``torch.compile`` (engine/regional_compile.py),
  where Triton exists.
* ``liger``: Liger's Triton kernels (RMSNorm, SwiGLU/GeGLU, RoPE) patched into the same
  transformers + peft model; the loss and everything else is the universal path.
* ``unsloth``: Unsloth's ``FastLanguageModel`` where it is installed (an optional extra, as in
  LLaMA-Factory), with its own kernels, loss and offloaded checkpointing.

``memory.backend = "auto"`` tries Unsloth, the compiled path, then the universal path (``AUTO_ORDER``). A backend is
skipped when it is missing or the card, architecture or recipe is unsupported. One that raises while
loading, on a one-step probe (a Triton kernel that fails to compile on an old card fails there, not
hours into the run) or, for a backend with no separate probe (``Backend.probes``), in the fit-check, ends the
process with ``BackendFailed``: Liger and Unsloth patch transformers'
classes process-wide, so the worker re-executes itself and the fresh process skips that backend.
The worker records the choice, the reason, every skip and every failure in
``run.json``. Whatever the backend, the model is a peft LoRA model trained by the same Trainer, so
events, checkpoints, resume and stop are the same.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tui_finetune.core.events import first_line
from tui_finetune.core.recipe import MemorySpec, RecipeSpec
from tui_finetune.engine import kernel_support, memory_techniques, unsloth_import
from tui_finetune.engine.loading import DeviceFacts, add_lora, compute_dtype, load_base_model
from tui_finetune.engine.model_folder import model_type_of

AUTO_ORDER = ("unsloth", "compiled", "universal")
"""What ``auto`` tries. Unsloth ran 1.5-2.2x the baseline. The compiled backend (the universal path with its
decoder layers compiled) ran Gemma-2B QLoRA 1024 at 1.51x and Phi-2 2048 at 1.97x the universal path on a
4 GB cap, at the same memory within 3% (H200, docs/verification/speed.md section 13); it needs Triton, so
without it (Windows without triton-windows, a pre-Volta card) ``auto`` is the universal path.
Liger is left to an explicit ``memory.backend = "liger"``: on an H100 and an H200
it ran within 2% of the universal path's speed, with memory between 4% less and 4% more (benchmarks/
results/goals.md), so it added a patched model for no measured gain."""
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
class Backend:
    """One way to build the LoRA model and compute the training loss."""

    name = ""
    architectures: frozenset[str] | None = None
    """The ``model_type`` values it supports; None: all."""
    allocates_like_universal = False
    """Whether its memory is the universal path's, so that an out-of-memory is answered as there (shrink the
    micro-batch) and the backend is dropped only when nothing is left to shrink (engine/training_loop.py).
    Liger and Unsloth allocate differently, so an OOM drops them first."""
    probes = True
    """Whether a 16-token probe step follows loading (``probe_step``). Unsloth's is skipped: its
    torch.compile'd kernels specialise on the first shapes they see, and Unsloth warns that a different
    first call poisons that cache; on an H200 our Unsloth path, probed, stayed at the speed of Unsloth's
    first (cold) run while Unsloth called directly ran up to 1.44x faster in later runs
    (benchmarks/results/unsloth-ab-mistral-7b-2048.md). Its probe is the fit-check's step instead (the
    first training step, on the longest batch; the before-sample's generation may run earlier), where any
    failure of the step, a non-finite loss included, drops the backend just the same (engine/fit_check.py,
    engine/training_loop.py)."""
    loading_note = ""
    """What loading also does that takes a while, for the phase line (else a compile looks like a hang)."""
    moves_embeddings = False
    """Whether it honours ``memory.embeddings_on_cpu`` (engine/embedding_offload.py): the backends that load
    through engine/loading.py's ``add_lora`` do; the planner's Unsloth profile never moves it either."""

    def unavailable(self, model_type: str, recipe: RecipeSpec, device: DeviceFacts) -> str | None:
        """Why it can't run here, or None."""
        if self.architectures is not None and model_type not in self.architectures:
            return f"no {self.name} kernels for the '{model_type or 'unknown'}' architecture"
        return None

    def load(self, folder: Path, recipe: RecipeSpec, device: DeviceFacts) -> Any:
        """The base model with LoRA applied, ready to train."""
        raise NotImplementedError

    def uses_model_loss(self, memory: MemorySpec) -> bool:
        """True when the Trainer should call the model's own loss (with its gradient-accumulation scaling)."""
        return False

    def loss(self, model: Any, inputs: dict[str, Any], memory: MemorySpec,
             num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def add_seeded_lora(model: Any, recipe: RecipeSpec, device: DeviceFacts) -> Any:
    """LoRA's initialisation draws from the RNG: the same seed gives the same adapter on every backend."""
    from transformers import set_seed

    set_seed(recipe.train.seed)
    return add_lora(model, recipe, device)


class UniversalBackend(Backend):
    name = "universal"
    moves_embeddings = True
    allocates_like_universal = True

    def load(self, folder: Path, recipe: RecipeSpec, device: DeviceFacts) -> Any:
        return add_seeded_lora(load_base_model(folder, recipe, device), recipe, device)

    def uses_model_loss(self, memory: MemorySpec) -> bool:
        return not memory.chunked_loss

    def loss(self, model: Any, inputs: dict[str, Any], memory: MemorySpec,
             num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        if memory.chunked_loss:
            return memory_techniques.lean_causal_lm_loss(model, inputs, memory, num_items_in_batch)
        return model(**inputs).loss


class LigerBackend(UniversalBackend):
    name = "liger"
    allocates_like_universal = False  # its Triton kernels keep other tensors than the eager ops they replace

    def unavailable(self, model_type: str, recipe: RecipeSpec, device: DeviceFacts) -> str | None:
        if not kernel_support.module_installed("liger_kernel"):
            return "not installed (pip install 'tui-finetune[liger]')"
        reason = kernel_support.why_no_triton(device.has_cuda)
        if reason:
            return reason
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except Exception as err:  # noqa: BLE001 - a Liger that doesn't import with this transformers
            return f"failed to import ({type(err).__name__}: {first_line(err, 160)})"
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            return f"no Liger kernels for the '{model_type or 'unknown'}' architecture"
        return None

    def load(self, folder: Path, recipe: RecipeSpec, device: DeviceFacts) -> Any:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        model = load_base_model(folder, recipe, device)
        # The norms, the gated MLP and RoPE become Triton kernels; the loss stays the lean path's.
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, geglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        return add_seeded_lora(model, recipe, device)

    def uses_model_loss(self, memory: MemorySpec) -> bool:
        return False

    def loss(self, model: Any, inputs: dict[str, Any], memory: MemorySpec,
             num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """The lean path's fused cross-entropy, not Liger's: Liger sizes its chunks to about
        tokens x hidden / vocab (8 tokens a chunk for Gemma's 256k vocabulary at seq 1024), which made
        the whole Gemma-2B step 8% slower than the universal path on an H100 (benchmarks/results/
        h100-gemma-backends.md); ours sizes them to a fixed 128 MiB of logits."""
        return memory_techniques.lean_causal_lm_loss(model, inputs, memory, num_items_in_batch)


class CompiledBackend(UniversalBackend):
    """The universal path with each decoder layer compiled (engine/regional_compile.py): Inductor fuses the
    small kernels that make a tight card's step launch-bound. It needs Triton, so it is never the only path.
    Its memory is the universal path's (``allocates_like_universal``): Gemma-2B 2.87 GiB against 2.80, Phi-2
    2.95 against 2.95 (H200, docs/verification/speed.md section 13), so an OOM shrinks the batch and keeps it."""

    name = "compiled"
    probes = False
    """It probes inside ``load``, where a passing probe also turns on the eager fallback for later compiles."""
    compiler = "inductor"
    """torch.compile's backend; the CPU tests trace the same graphs with ``aot_eager``."""
    loading_note = ("then compiling its decoder layers with torch.compile (up to a minute on a first start, "
                    "cached for later runs)")

    def unavailable(self, model_type: str, recipe: RecipeSpec, device: DeviceFacts) -> str | None:
        return kernel_support.why_no_triton(device.has_cuda) or super().unavailable(model_type, recipe, device)

    def load(self, folder: Path, recipe: RecipeSpec, device: DeviceFacts) -> Any:
        from tui_finetune.core.paths import inductor_cache_dir
        from tui_finetune.engine import regional_compile

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
        model = super().load(folder, recipe, device)
        regional_compile.compile_decoder_layers(model, self.compiler)
        before_probe = regional_compile.compile_count()
        try:  # compiles now: a compiler that fails here drops the backend
            probe_step(model, self, recipe.memory)
        except Exception as err:
            from tui_finetune.engine.training import is_oom

            inner = regional_compile.compiler_error(err)
            if is_oom(inner):  # the weights fit; the universal path has no probe, and its fit-check's OOM
                raise BackendFailed(self.name, "CUDA out of memory in its probe step: "  # moves the embedding
                                    + first_line(inner)) from None  # to CPU RAM or shortens rows instead
            if inner is err:
                raise
            raise inner from err
        nothing_compiled = regional_compile.why_nothing_compiled(before_probe)
        if nothing_compiled:
            raise BackendFailed(self.name, nothing_compiled)
        regional_compile.fall_back_to_eager_on_late_failures()
        return model


class UnslothBackend(Backend):
    name = "unsloth"
    architectures = frozenset({"llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3"})
    probes = False

    def unavailable(self, model_type: str, recipe: RecipeSpec, device: DeviceFacts) -> str | None:
        if not kernel_support.module_installed("unsloth"):
            return "not installed (pip install 'tui-finetune[unsloth]')"
        reason = kernel_support.why_no_triton(device.has_cuda)
        if reason:
            return reason
        import_error = unsloth_import.import_error()
        if import_error:
            return f"failed to import: {import_error}"
        if recipe.method == "full":
            return "full fine-tuning runs on the PyTorch paths"
        if recipe.data.packing:
            # Packed examples are kept apart by the mask transformers builds from restarting
            # position_ids (data/collate.py); Unsloth replaces that attention code, unverified here.
            return "packing (data.packing) is not verified with Unsloth's attention"
        return super().unavailable(model_type, recipe, device)

    def load(self, folder: Path, recipe: RecipeSpec, device: DeviceFacts) -> Any:
        from unsloth import FastLanguageModel

        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(folder), max_seq_length=recipe.data.seq_len, dtype=compute_dtype(recipe, device),
            load_in_4bit=recipe.method == "qlora", trust_remote_code=recipe.trust_remote_code)
        targets = recipe.lora.target_modules
        return FastLanguageModel.get_peft_model(
            model, r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout, bias="none",
            target_modules=UNSLOTH_TARGETS if targets == "all-linear" else list(targets),
            use_gradient_checkpointing="unsloth" if recipe.train.gradient_checkpointing else False,
            random_state=recipe.train.seed)

    def uses_model_loss(self, memory: MemorySpec) -> bool:
        return True  # Unsloth's fused cross-entropy inside the model's forward

    def loss(self, model: Any, inputs: dict[str, Any], memory: MemorySpec,
             num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(**inputs, **extra).loss


BACKENDS: dict[str, Backend] = {b.name: b for b in (UniversalBackend(), CompiledBackend(), LigerBackend(),
                                                     UnslothBackend())}


@dataclass
class BackendChoice:
    """What ran and why; written to run.json."""

    requested: str
    name: str = "universal"
    reason: str = ""
    skipped: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: Any
    backend: Backend
    choice: BackendChoice


def candidates(requested: str) -> list[str]:
    """The backends to try, in order: the requested one, then the universal path."""
    if requested == "auto":
        return list(AUTO_ORDER)
    return [requested] + ([] if requested == "universal" else ["universal"])


def expected_backend(folder: Path, recipe: RecipeSpec, device: DeviceFacts,
                     excluded: dict[str, str] | None = None) -> str:
    """The backend ``load_for_training`` will try first: available here and for this architecture,
    and not ``excluded``. (It can still fail to load.) For planning before the model loads."""
    model_type = model_type_of(folder)
    for name in candidates(recipe.memory.backend):
        if name not in (excluded or {}) and BACKENDS[name].unavailable(model_type, recipe, device) is None:
            return name
    return "universal"


def probe_step(model: Any, backend: Backend, memory: MemorySpec) -> None:
    """One forward and backward on 16 tokens, no optimizer step: compiles the kernels now, so a backend
    that can't run on this card fails here and the next one is tried. The LoRA weights are untouched."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.device  # the decoder's: with memory.embeddings_on_cpu the embedding's weight is in RAM
    ids = torch.arange(16, device=device).unsqueeze(0) % vocab
    model.train()
    loss = backend.loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, memory)
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"the probe step's loss is {float(loss):.4g}")
    loss.backward()
    model.zero_grad(set_to_none=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BackendFailed(Exception):
    """An accelerated backend failed while loading or on its probe step. Liger and Unsloth patch
    transformers' classes for the whole process, so the fallback can't be loaded in this process: the
    caller starts a fresh one that excludes this backend (the worker re-executes itself)."""

    def __init__(self, name: str, reason: str) -> None:
        # not "on this model": the reason says what failed (a model it cannot patch, a compiler, memory)
        super().__init__(f"the {name} backend failed ({reason})")
        self.name, self.reason = name, reason


def load_for_training(folder: Path, recipe: RecipeSpec, device: DeviceFacts,
                      excluded: dict[str, str] | None = None) -> LoadedModel:
    """Load with the first backend that is available, not ``excluded`` (name: why it failed in an
    earlier process), and survives loading and a probe step.

    An accelerated backend that raises ends in ``BackendFailed``; a CUDA out-of-memory is not a backend
    failure and propagates as it is, so the caller's OOM advice applies, except in the compiled backend's
    probe (the weights fit; the universal path, which has no probe, may still train).
    """
    from tui_finetune.engine.training import is_oom

    requested, excluded = recipe.memory.backend, excluded or {}
    model_type = model_type_of(folder)
    choice = BackendChoice(requested=requested)
    for name in candidates(requested):
        backend = BACKENDS[name]
        why_not = (f"failed in an earlier attempt ({excluded[name]})" if name in excluded
                   else backend.unavailable(model_type, recipe, device))
        if why_not:
            choice.skipped.append(f"{name}: {why_not}")
            continue
        failure = ""
        try:
            model = backend.load(folder, recipe, device)
            if name != "universal" and backend.probes:
                probe_step(model, backend, recipe.memory)
        except BackendFailed:  # a backend's own verdict (compiled: out of memory in its probe)
            raise
        except Exception as err:  # noqa: BLE001 - any failure of an accelerated backend means: fall back
            if is_oom(err) or name == "universal":
                raise
            failure = f"{type(err).__name__}: {first_line(err)}"
        if failure:
            free_memory()  # outside the except block, so the traceback's frames no longer hold the model
            raise BackendFailed(name, failure)
        choice.name = name
        choice.reason = _reason(name, requested, model_type, choice.skipped)
        return LoadedModel(model, backend, choice)
    raise AssertionError("the universal backend is always a candidate")  # pragma: no cover


def _reason(name: str, requested: str, model_type: str, skipped: list[str]) -> str:
    arch = model_type or "this"
    what = {"universal": "pure PyTorch (chunked loss, no Triton)",
            "compiled": "the PyTorch path with its decoder layers compiled (torch.compile, Triton)",
            "liger": f"Liger's Triton kernels for the {arch} architecture",
            "unsloth": f"Unsloth's kernels for the {arch} architecture"}[name]
    if requested == name:
        return f"{what}, as the recipe asks"
    if requested == "auto" and not skipped:
        return f"{what}: the fastest backend available"
    return f"{what}: " + "; ".join(skipped)
