"""Auto-fit: change a recipe just enough that the planner's estimate fits the card's free VRAM.

The worker calls this before it loads the model, with the free memory it measured. The levers come
in the order of what they cost in quality, cheapest first, and each is taken only while the
estimate is still over the budget:

1. memory savers that leave the maths alone: the input embedding in CPU RAM (untied models on the
   PyTorch paths: neither quality nor measurable speed), the chunked loss, gradient checkpointing,
   activations offloaded to CPU RAM (slower, same numbers), then adapters in the compute dtype (half
   their memory, a little less precision);
2. a smaller micro-batch with more accumulation: the effective batch stays exactly the same;
3. a shorter sequence length: first down to the data's longest row when that is known (nothing is
   cut), then halving, never below ``MIN_SEQ_LEN``: longer rows get truncated.

Where the estimate fits with room to spare, auto-fit spends it on speed: with
``memory.layers_keeping_activations`` left at ``auto``, it lets as many layers keep their activations (no
recompute for them) as the estimate allows with ``ROOM_MARGIN`` to spare.

Every change is a sentence that names the old and the new value and the ``--set`` that makes it
permanent, so the user learns what happened and can pin it. When nothing fits, ``fits`` is False
and ``advice`` says what the smallest estimate was and what to do instead.
A pure function of plain values: no torch, no GPU, so the CLI, the UI and the tests can call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from tui_finetune.core.catalog import ModelSpec
from tui_finetune.core.advice import nothing_fits_advice
from tui_finetune.core.planner import (  # MLP_CHUNK_TOKENS: the chunk auto-fit turns on is the planner's auto size
    CUDA_CONTEXT_GROWTH_GIB, DTYPE_BYTES, GIB, MIN_SEQ_LEN, MLP_CHUNK_TOKENS, PLANNER_TOLERANCE, TIGHT_MARGIN,
    EngineProfile, PlanCase, VramEstimate, estimate_peak_vram, profile_from_memory)
from tui_finetune.core.recipe import AUTO, MemorySpec, RecipeSpec
RESERVE_FRACTION = TIGHT_MARGIN
"""Free VRAM kept back by default: the planner's 'tight' margin. The estimate already counts the CUDA
context and the allocator's slack, and leans high; the fit-check on the longest batch confirms it."""

ROOM_MARGIN = PLANNER_TOLERANCE
"""Kept layers are chosen so that the estimate, grown by the planner's own error, still fits: spending the
room must not turn a run that fits into one that runs out of memory in its first hour. The fit-check then
measures the longest batch, and an out-of-memory turns every layer back to recomputing first
(engine/recipe_refit.py ``recompute_every_layer``)."""

ProfileFor = Callable[[MemorySpec], EngineProfile]


def usable_in_worker(free_after_context: float) -> float:
    """The free bytes the worker auto-fits to (``context_allocated``): read after its CUDA context started, less
    what the context still grows by (``CUDA_CONTEXT_GROWTH_GIB``). ``plan`` asks the same question for a card."""
    return free_after_context - CUDA_CONTEXT_GROWTH_GIB * GIB


@dataclass(frozen=True)
class FitDecision:
    """What auto-fit decided: the recipe to train with and why."""

    recipe: RecipeSpec
    """The adjusted recipe (the original when nothing changed; the smallest tried when nothing fits)."""
    changes: list[str] = field(default_factory=list)
    """One sentence per change: old value, new value, and the ``--set`` that makes it permanent."""
    settings: list[str] = field(default_factory=list)
    """Every ``key=value`` auto-fit changed, for ``--set`` or a recipe file."""
    before: VramEstimate = field(default_factory=VramEstimate)
    after: VramEstimate = field(default_factory=VramEstimate)
    budget_bytes: float = 0.0
    """The memory the estimate had to fit in: free VRAM less the reserve."""
    fits: bool = True
    advice: str = ""
    """When nothing fits: the smallest estimate and what to do instead."""

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def auto_fit(recipe: RecipeSpec, model: ModelSpec, free_bytes: float, *, reserve_bytes: float | None = None,
             context_allocated: bool = False, data_longest: int | None = None,
             profile_for: ProfileFor = profile_from_memory, shorten_sequences: bool = True) -> FitDecision:
    """Adjust ``recipe`` until the planner's peak estimate fits ``free_bytes`` less a reserve.

    ``reserve_bytes`` defaults to ``RESERVE_FRACTION`` of the free memory. ``context_allocated``: the
    free figure was read inside the training process after CUDA started (``torch.cuda.mem_get_info``
    does that), so the CUDA context is already out of it and is not counted twice.
    ``data_longest``: the longest tokenized row, when known. ``profile_for`` maps the recipe's memory
    techniques to the planner's engine profile (a backend can model its own). ``shorten_sequences``
    False stops before the last lever, the one that truncates data: the worker leaves that to the
    fit-check, which measures instead of estimating.
    """
    reserve = RESERVE_FRACTION * free_bytes if reserve_bytes is None else reserve_bytes
    budget = free_bytes - reserve

    def need(candidate: RecipeSpec) -> tuple[float, VramEstimate]:
        estimate = estimate_peak_vram(PlanCase.from_recipe(model, candidate), profile_for(candidate.memory))
        return (estimate.torch_peak if context_allocated else estimate.total), estimate

    best_need, before = need(recipe)
    best, after = recipe, before

    def levers() -> Iterator[RecipeSpec | None]:
        """Candidates, each built on the best so far: the savers, then micro-batches, then lengths."""
        for saver in SAVERS:
            yield saver(best)
        yield from _smaller_micro_batches(best)
        if shorten_sequences:
            yield from _shorter_sequences(best, data_longest)

    for candidate in levers():
        if best_need <= budget:
            break
        if candidate is None:
            continue
        candidate_need, estimate = need(candidate)
        if candidate_need < best_need:  # a lever the planner says doesn't help is not worth its cost
            best, best_need, after = candidate, candidate_need, estimate
    fits = best_need <= budget
    if fits:
        best, after = _use_the_room(best, after, budget, model.num_layers, need, profile_for)
    changes = describe_changes(recipe, best, data_longest)
    return FitDecision(recipe=best, changes=[sentence for sentence, _ in changes],
                       settings=[item for _, items in changes for item in items], before=before, after=after,
                       budget_bytes=budget, fits=fits, advice="" if fits else nothing_fits_advice(best, best_need, budget))


def _use_the_room(recipe: RecipeSpec, estimate: VramEstimate, budget: float, num_layers: int,
                  need: Callable[[RecipeSpec], tuple[float, VramEstimate]],
                  profile_for: ProfileFor) -> tuple[RecipeSpec, VramEstimate]:
    """The recipe with ``memory.layers_keeping_activations`` at the most layers whose estimate, with
    ``ROOM_MARGIN`` added, fits ``budget``; unchanged where the setting isn't ``auto``, nothing is checkpointed
    (full fine-tuning never is: the engine checkpoints only what it wraps in LoRA), activations go to CPU RAM
    (the recipe expects a tight card), the backend checkpoints its own way, the attention keeps its seq x seq
    scores (eager, or the fp32 upcast's math kernel: ``kept_layer_bytes`` counts per-token widths only), or
    not one layer fits. Each kept layer costs the same, so the estimate grows with their number: a bisection."""
    memory = recipe.memory
    profile = profile_for(memory)
    if (memory.layers_keeping_activations != AUTO or not recipe.train.gradient_checkpointing
            or recipe.method == "full" or memory.offload_activations or not profile.keeps_layers
            or profile.attention_materialises_scores):
        return recipe, estimate

    best, best_estimate = recipe, estimate
    low, high = 0, num_layers  # keeping `low` layers fits (none kept: the fit already found); find the most
    while low < high:
        middle = (low + high + 1) // 2
        candidate = replace(recipe, memory=replace(memory, layers_keeping_activations=middle))
        candidate_need, candidate_estimate = need(candidate)
        if candidate_need * (1 + ROOM_MARGIN) <= budget:
            low, best, best_estimate = middle, candidate, candidate_estimate
        else:
            high = middle - 1
    return best, best_estimate


# ------------------------------------------------------------ the levers, cheapest first

def _embeddings_on_cpu(recipe: RecipeSpec) -> RecipeSpec | None:
    """The input embedding in CPU RAM. Where it can't leave the GPU (a tied lm_head, full fine-tuning,
    Unsloth) the planner's estimate doesn't drop, so auto-fit passes it over (core/planner.py
    ``embedding_params_on_cpu`` is the one rule)."""
    if recipe.memory.embeddings_on_cpu:
        return None
    return replace(recipe, memory=replace(recipe.memory, embeddings_on_cpu=True))


def _chunked_loss(recipe: RecipeSpec) -> RecipeSpec | None:
    if recipe.memory.chunked_loss:
        return None
    return replace(recipe, memory=replace(recipe.memory, chunked_loss=True))


def _checkpointing(recipe: RecipeSpec) -> RecipeSpec | None:
    if recipe.train.gradient_checkpointing:
        return None
    return replace(recipe, train=replace(recipe.train, gradient_checkpointing=True))


def _offload(recipe: RecipeSpec) -> RecipeSpec | None:
    if recipe.memory.offload_activations:
        return None
    return replace(recipe, memory=replace(recipe.memory, offload_activations=True))


def _mlp_chunks(recipe: RecipeSpec) -> RecipeSpec | None:
    """The MLP over chunks of tokens, where this version's MemorySpec has ``mlp_chunk_tokens``."""
    setting = getattr(recipe.memory, "mlp_chunk_tokens", None)
    tokens = recipe.data.seq_len * recipe.train.micro_batch
    if setting is None or setting > 0 or tokens <= MLP_CHUNK_TOKENS:
        return None
    return replace(recipe, memory=replace(recipe.memory, mlp_chunk_tokens=MLP_CHUNK_TOKENS))


def _compute_dtype_adapters(recipe: RecipeSpec) -> RecipeSpec | None:
    # On fp16 cards the engine keeps adapters fp32 whatever the recipe says (loading.adapter_compute_dtype).
    if recipe.memory.adapter_dtype != "fp32" or recipe.method == "full" or compute_dtype_name(recipe) != "bf16":
        return None
    return replace(recipe, memory=replace(recipe.memory, adapter_dtype="compute"))


SAVERS: tuple[Callable[[RecipeSpec], RecipeSpec | None], ...] = (
    _embeddings_on_cpu, _chunked_loss, _checkpointing, _offload, _mlp_chunks, _compute_dtype_adapters)
"""Memory savers, in order: the first five leave the maths alone (the embedding's lookup in CPU RAM costs
next to nothing, the others cost time), the last costs a little precision. Each returns the recipe with it switched on, or None where it is on already or can't apply."""


def next_micro_batch(micro_batch: int) -> int:
    """The next smaller micro-batch that divides this one (about half), so that more accumulation makes up
    exactly the same effective batch: 8 -> 4, 6 -> 3, 3 -> 1."""
    for candidate in range(micro_batch // 2, 0, -1):
        if micro_batch % candidate == 0:
            return candidate
    return 1


def shrinks_to(micro_batch: int, smaller: int) -> bool:
    """Whether ``next_micro_batch``, applied again and again, goes from ``micro_batch`` to ``smaller``: the
    splits OOM recovery (or following its advice) can reach, which a resume on bins or groups accepts."""
    while micro_batch > smaller:
        micro_batch = next_micro_batch(micro_batch)
    return micro_batch == smaller


def with_smaller_micro_batch(recipe: RecipeSpec) -> RecipeSpec:
    """The one shrink rule, for auto-fit, the fit-check and OOM recovery alike: the next smaller micro-batch
    (``next_micro_batch``) and the accumulation grown by the same factor, so the effective batch stays."""
    micro, accum = recipe.train.micro_batch, recipe.train.grad_accum
    new_micro = next_micro_batch(micro)
    return replace(recipe, train=replace(recipe.train, micro_batch=new_micro, grad_accum=accum * (micro // new_micro)))


def _smaller_micro_batches(recipe: RecipeSpec) -> Iterator[RecipeSpec]:
    while recipe.train.micro_batch > 1:
        recipe = with_smaller_micro_batch(recipe)
        yield recipe


def _shorter_sequences(recipe: RecipeSpec, data_longest: int | None) -> Iterator[RecipeSpec]:
    """The data's longest row if that is shorter (nothing is cut), then halvings of the recipe's length."""
    seq = recipe.data.seq_len
    floor = min(MIN_SEQ_LEN, seq)
    # flat bins fill seq_len whatever the rows; length groups hold micro_batch x the longest row, as rows do
    longest = data_longest if data_longest and data_longest < seq and not recipe.data.packing else None
    if longest:
        yield _with_seq(recipe, longest)
    while seq // 2 >= floor:
        seq //= 2
        if longest is None or seq < longest:
            yield _with_seq(recipe, seq)


def _with_seq(recipe: RecipeSpec, seq_len: int) -> RecipeSpec:
    return replace(recipe, data=replace(recipe.data, seq_len=seq_len))


def compute_dtype_name(recipe: RecipeSpec) -> str:
    """The dtype the planner assumes for the matmuls ('bf16' for 'auto'), as ``PlanCase.from_recipe`` does."""
    precision = recipe.train.precision if recipe.train.precision in DTYPE_BYTES else "bf16"
    if recipe.method != "qlora":
        return precision
    return recipe.quant.compute_dtype if recipe.quant.compute_dtype in DTYPE_BYTES else precision


# ------------------------------------------------------------ the words

SAVER_REASONS = {
    "memory.embeddings_on_cpu": "the input embedding waits in CPU RAM and its rows are looked up there; "
                                "the lm_head stays on the GPU: same result, about as fast",
    "memory.chunked_loss": "the loss is computed a chunk of tokens at a time; same result",
    "train.gradient_checkpointing": "activations are recomputed in the backward pass: about 30% slower, same result",
    "memory.offload_activations": "checkpointed activations wait in CPU RAM: slower, same result",
    "memory.mlp_chunk_tokens": "each layer's MLP runs a chunk of tokens at a time: about 10% slower, same result",
    "memory.adapter_dtype": "LoRA weights and gradients in the compute dtype: half their memory",
    "memory.layers_keeping_activations": "the card has room: that many layers keep their activations instead of "
                                         "recomputing them in the backward pass: faster, same result",
}


def micro_batch_sentence(old_micro: int, new_micro: int, old_accum: int, new_accum: int) -> str:
    """A micro-batch change in words: old and new of both knobs, and the effective batch that stays."""
    return (f"train.micro_batch {old_micro} -> {new_micro} and train.grad_accum {old_accum} -> {new_accum} "
            f"(effective batch {new_micro * new_accum} unchanged)")


def describe_changes(old: RecipeSpec, new: RecipeSpec, data_longest: int | None = None) -> list[tuple[str, list[str]]]:
    """(sentence, ``key=value`` settings) for each difference auto-fit makes, in the order of the levers.
    Each sentence ends with the ``--set`` options that make the change permanent."""
    out: list[tuple[str, list[str]]] = []
    for key, before, after in (
            ("memory.embeddings_on_cpu", old.memory.embeddings_on_cpu, new.memory.embeddings_on_cpu),
            ("memory.chunked_loss", old.memory.chunked_loss, new.memory.chunked_loss),
            ("train.gradient_checkpointing", old.train.gradient_checkpointing, new.train.gradient_checkpointing),
            ("memory.offload_activations", old.memory.offload_activations, new.memory.offload_activations),
            ("memory.mlp_chunk_tokens", getattr(old.memory, "mlp_chunk_tokens", None),
             getattr(new.memory, "mlp_chunk_tokens", None)),
            ("memory.adapter_dtype", old.memory.adapter_dtype, new.memory.adapter_dtype),
            ("memory.layers_keeping_activations", old.memory.layers_keeping_activations,
             new.memory.layers_keeping_activations)):
        if before != after:
            out.append((f"{key} {_toml(before)} -> {_toml(after)} ({SAVER_REASONS[key]})",
                        [f"{key}={_toml(after, bare=True)}"]))
    if (old.train.micro_batch, old.train.grad_accum) != (new.train.micro_batch, new.train.grad_accum):
        out.append((micro_batch_sentence(old.train.micro_batch, new.train.micro_batch, old.train.grad_accum,
                                         new.train.grad_accum),
                    [f"train.micro_batch={new.train.micro_batch}", f"train.grad_accum={new.train.grad_accum}"]))
    if old.data.seq_len != new.data.seq_len:
        cut = data_longest is None or new.data.seq_len < data_longest
        why = (f"rows longer than {new.data.seq_len} tokens are truncated" if cut
               else "the data's longest row: nothing is cut")
        out.append((f"data.seq_len {old.data.seq_len} -> {new.data.seq_len} ({why})",
                    [f"data.seq_len={new.data.seq_len}"]))
    return [(f"{sentence}: --set " + " --set ".join(items), items) for sentence, items in out]


def _toml(value: object, bare: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) and not bare else str(value)
