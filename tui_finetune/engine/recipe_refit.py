"""Refitting a run's recipe to the card: the worker's memory decisions, written to the run's recipe.toml.

* ``auto_fit_run``, before the model loads on a fresh CUDA run: the planner's estimate against the
  free VRAM (core/fit_levers.py). Changed values go into the run's recipe.toml, so a resume trains with
  the same ones; each change is a warning event with the ``--set`` that pins it, and the list is kept
  in run.json (``autofit``). Auto-fit never shortens sequences on an estimate: the planner leans high
  and a shorter sequence truncates data. It refuses a run on the estimate only when the model's
  weights alone are over the budget by more than the planner's own error (``PLANNER_TOLERANCE``);
  anything nearer is measured: the fit-check shortens the sequences down to the floor, and a refusal
  then names what it measured.
* ``shrink_micro_batch``, after an out-of-memory in the fit-check or a training step: the one shrink rule
  (core/fit_levers.py ``with_smaller_micro_batch``: the effective batch stays), written to recipe.toml,
  so the monitor, ``runs`` and a resume read the batch in effect there; run.json keeps only the history
  (``oom_shrinks``). It gives up at micro-batch 1, or after ``MAX_OOM_SHRINKS`` shrinks in training.
* ``recompute_every_layer``, after an out-of-memory in the fit-check or a training step of a run whose
  auto-fit spent the card's room on keeping layers' activations (``memory.layers_keeping_activations``):
  every layer recomputes again, on the loaded model and in recipe.toml, before the micro-batch shrinks.
* ``move_embeddings_after_oom``, when the fit-check or a first training step ran out of memory at
  micro-batch 1 on a fresh run: before any row is cut, the input embedding goes to CPU RAM where it can
  (engine/embedding_offload.py: an untied model on a backend that loads through ``add_lora``), in the
  model already loaded and in recipe.toml, recorded as an auto-fit change; the worker checks again.
* ``shorten_sequence``, when that lever is on or can't apply and the fit-check (engine/fit_check.py,
  inside ``Trainer.train``) ran out of memory at micro-batch 1 on a fresh run: the sequence length is
  halved in recipe.toml and the worker tokenizes again; below the floor the run is refused on that
  measurement.

No torch at import time: the worker imports this module before it knows the device.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tui_finetune.core.advice import memory_advice
from tui_finetune.core.catalog import UnknownModelError
from tui_finetune.core.events import EventLog, WarningEvent
from tui_finetune.core.fit_levers import auto_fit, describe_changes, usable_in_worker, with_smaller_micro_batch
from tui_finetune.core.model_shape import resolve_model_spec
from tui_finetune.core.planner import (
    EMBEDDINGS_STAY_NOTE, GIB, MIN_SEQ_LEN, PLANNER_TOLERANCE, kept_layers_of,
    profile_from_memory)
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.recipe_machine import MachineFacts, resolve_precision
from tui_finetune.core.run_folder.info import read_run_info, update_run_info, write_run_recipe


MAX_OOM_SHRINKS = 3
"""OOMs in training (not in the fit-check) that shrink the micro-batch before the run gives up."""


class FitRefused(Exception):
    """The run can't fit the card: the message says by how much, ``advice`` what to change."""

    def __init__(self, message: str, advice: str) -> None:
        super().__init__(message)
        self.advice = advice


class OomGiveUp(FitRefused):
    """Out of memory even after shrinking the micro-batch: the message says what to change instead."""


class SequenceTooLong(Exception):
    """Out of memory at micro-batch 1 before any checkpoint (``where``: the fit-check or training): only
    shorter rows can fit, and with no checkpoint yet the sequence length may still change."""

    def __init__(self, longest: int, error: str, where: str = "the fit-check") -> None:
        super().__init__(error)
        self.longest, self.error, self.where = longest, error, where


def split_change(change: str) -> tuple[str, str]:
    """(what changed, the ``--set`` options) of one auto-fit sentence."""
    what, _, options = change.rpartition(": --set ")
    return (what, f"to keep this value: --set {options}") if what else (change, "")


def record_changes(run_dir: Path, log: EventLog, changes: list[str]) -> None:
    """One warning per change and the list in run.json's ``autofit``."""
    for change in changes:
        message, advice = split_change(change)
        log.emit(WarningEvent(message=f"auto-fit: {message}", advice=advice))
    update_run_info(run_dir, autofit=list(read_run_info(run_dir).autofit) + changes)


def free_vram_bytes() -> int:
    """Free memory on the current CUDA device, as the driver reports it (other programs excluded)."""
    import torch

    return int(torch.cuda.mem_get_info()[0])


def auto_fit_run(run_dir: Path, recipe: RecipeSpec, model: str, free_bytes: float, log: EventLog,
                 backend: str = "", machine: MachineFacts | None = None) -> RecipeSpec:
    """Fit a fresh run's recipe to ``free_bytes`` of VRAM; returns the recipe to train with.

    ``model`` is what ``resolve_model_spec`` reads: the downloaded folder, or a catalog key.
    ``free_bytes`` is read inside the worker, after its CUDA context started, so the context is not
    counted again; only what it still grows by (``CUDA_CONTEXT_GROWTH_GIB``) is kept back. ``backend``: the one
    ``backends.expected_backend`` says will load, so the planner models it. ``machine``: where
    ``auto`` precisions resolve (on a card without bf16 the engine keeps adapters fp32, so that saver
    can't help there). An unchanged recipe is returned as it was. Raises FitRefused.
    """
    try:
        spec = resolve_model_spec(model)
    except UnknownModelError as err:
        log.emit(WarningEvent(message=f"auto-fit skipped: the model's shape is unknown ({err})",
                              advice="the fit-check on the longest batch still runs before training"))
        return recipe

    def profile_for(memory: Any) -> Any:  # the planner models the backend that will load (engine/backends.py)
        return profile_from_memory(replace(memory, backend=backend or memory.backend))

    original, recipe = recipe, resolve_precision(recipe, machine) if machine else recipe
    usable = usable_in_worker(free_bytes)

    def fit(shorten: bool) -> Any:
        return auto_fit(recipe, spec, usable, context_allocated=True, profile_for=profile_for,
                        shorten_sequences=shorten)

    decision = fit(False)
    if not decision.fits:
        shortest = fit(True)
        weights = shortest.after.parts.get("weights", 0.0)
        if not shortest.fits and weights > shortest.budget_bytes * (1 + PLANNER_TOLERANCE):
            update_run_info(run_dir, autofit=shortest.changes)
            raise FitRefused(f"this model can't fit the {free_bytes / GIB:.1f} GiB of free VRAM: its weights alone "
                             f"take about {weights / GIB:.1f} GiB, more than the planner's "
                             f"{PLANNER_TOLERANCE:.0%} error over what is free", shortest.advice)
        log.emit(WarningEvent(
            message=f"auto-fit: the planner expects {decision.after.torch_peak / GIB:.1f} GiB against "
                    f"{usable / GIB:.1f} GiB free even after the changes below; the fit-check will measure the "
                    "longest batch and shorten the sequences only if it runs out of memory",
            advice=f"or start with shorter sequences: --set {' '.join(shortest.settings)}"))
    if not decision.changed:
        return original
    write_run_recipe(run_dir, decision.recipe)
    record_changes(run_dir, log, decision.changes)
    return decision.recipe


def shrink_micro_batch(run_dir: Path, recipe: RecipeSpec, log: EventLog, error: str, in_check: bool = False) -> RecipeSpec:
    """After an out-of-memory (``error``: its first line) in the fit-check (``in_check``) or a training step:
    the recipe with the next smaller micro-batch and the accumulation that keeps the effective batch,
    written to the run's recipe.toml, with the change in run.json's ``oom_shrinks`` and a warning.

    Raises OomGiveUp at micro-batch 1, or when training already shrank ``MAX_OOM_SHRINKS`` times; the
    fit-check's shrinks don't count, as no step was lost to them."""
    shrinks = list(read_run_info(run_dir).oom_shrinks)
    micro, accum = recipe.train.micro_batch, recipe.train.grad_accum
    if micro <= 1:
        raise OomGiveUp(f"CUDA out of memory at micro-batch 1: {error}", memory_advice(recipe))
    in_training = [s for s in shrinks if s.get("where", "training") == "training"]
    if not in_check and len(in_training) >= MAX_OOM_SHRINKS:
        raise OomGiveUp(f"CUDA out of memory even after {len(in_training)} halvings of the micro-batch "
                        f"(now {micro}): {error}", memory_advice(recipe))
    recipe = with_smaller_micro_batch(recipe)
    new_micro, new_accum = recipe.train.micro_batch, recipe.train.grad_accum
    write_run_recipe(run_dir, recipe)
    shrinks.append({"time": time.time(), "where": "fit-check" if in_check else "training",
                    "micro_batch": [micro, new_micro], "grad_accum": [accum, new_accum], "error": error})
    update_run_info(run_dir, oom_shrinks=shrinks)
    log.emit(WarningEvent(
        message=f"CUDA out of memory{' in the fit-check' if in_check else ''}: micro-batch {micro} -> {new_micro}, "
                f"gradient accumulation {accum} -> {new_accum} (effective batch {recipe.effective_batch} "
                "unchanged); nothing partial was saved",
        advice=f"to skip this next time: --set train.micro_batch={new_micro} train.grad_accum={new_accum}"))
    return recipe


def recompute_every_layer(run_dir: Path, recipe: RecipeSpec, model: Any, log: EventLog,
                          where: str) -> RecipeSpec | None:
    """After an out-of-memory in ``where``: if layers of the loaded ``model`` keep their activations
    (``memory.layers_keeping_activations``, usually auto-fit's use of the room), every layer recomputes again
    and recipe.toml says so, recorded as an auto-fit change. The first recovery, as it undoes only what was
    spent on speed. None when no layer keeps its own (none asked, or the model's layers can't: a retry would
    only meet the same out-of-memory)."""
    from tui_finetune.engine.memory_techniques import keep_activations, layers_keeping_activations

    kept = kept_layers_of(recipe.memory)
    if kept == 0 or layers_keeping_activations(model) == 0:
        return None
    keep_activations(model, 0)
    relieved = replace(recipe, memory=replace(recipe.memory, layers_keeping_activations=0))
    write_run_recipe(run_dir, relieved)
    record_changes(run_dir, log, [f"CUDA out of memory in {where}: memory.layers_keeping_activations {kept} -> 0 "
                                  "(every layer recomputes its activations again; the micro-batch stays): "
                                  "--set memory.layers_keeping_activations=0"])
    return relieved


def move_embeddings_after_oom(run_dir: Path, recipe: RecipeSpec, model: Any, backend: Any, log: EventLog,
                              oom: SequenceTooLong) -> RecipeSpec | None:
    """After an out-of-memory at micro-batch 1 on a run with no checkpoint yet (``oom``): move
    the loaded ``model``'s input embedding to CPU RAM, the lever that costs neither quality nor measurable
    speed, before ``shorten_sequence`` truncates anybody's rows. Returns the recipe with
    ``memory.embeddings_on_cpu`` on, written to recipe.toml (a resume keeps it) and recorded as an auto-fit
    change; None when it is on already or can't apply (a tied lm_head, full fine-tuning, a backend that
    loads its own way)."""
    if recipe.memory.embeddings_on_cpu or recipe.method == "full" or not getattr(backend, "moves_embeddings", False):
        return None
    from tui_finetune.engine.embedding_offload import move_input_embedding_to_cpu

    if not move_input_embedding_to_cpu(model):
        return None
    moved = replace(recipe, memory=replace(recipe.memory, embeddings_on_cpu=True))
    write_run_recipe(run_dir, moved)
    record_changes(run_dir, log, [f"CUDA out of memory in {oom.where} at micro-batch 1: {sentence}"
                                  for sentence, _ in describe_changes(recipe, moved)])
    return moved


def warn_if_embeddings_stay(recipe: RecipeSpec, model: Any, log: EventLog) -> None:
    """A recipe that asks for ``memory.embeddings_on_cpu`` where the embedding must stay on the GPU is told so."""
    from tui_finetune.engine.embedding_offload import input_embedding_on_cpu

    if recipe.memory.embeddings_on_cpu and not input_embedding_on_cpu(model):
        log.emit(WarningEvent(message=f"{EMBEDDINGS_STAY_NOTE}: it stays on the GPU for this run",
                              advice="set memory.embeddings_on_cpu = false to silence this"))


def shorten_sequence(run_dir: Path, recipe: RecipeSpec, longest: int, error: str, log: EventLog,
                     where: str = "the fit-check") -> RecipeSpec:
    """Halve ``data.seq_len`` of a run with no checkpoint yet after it ran out of memory at micro-batch 1
    (in ``where``) on rows of ``longest`` tokens; the new recipe is saved (the caller tokenizes again).
    Raises FitRefused, with what was measured, when that would go below ``MIN_SEQ_LEN``."""
    seq = min(recipe.data.seq_len, longest)
    new_seq = seq // 2
    where = f"CUDA out of memory in {where} at micro-batch 1 x {seq} tokens"
    if new_seq < min(MIN_SEQ_LEN, recipe.data.seq_len):
        raise FitRefused(f"{where}, and {new_seq} tokens would be under the {MIN_SEQ_LEN}-token floor: {error}",
                         "a smaller model, QLoRA (--set method=qlora) or closing other programs that use the GPU; "
                         "'tui-finetune plan' shows what fits your card")
    recipe = replace(recipe, data=replace(recipe.data, seq_len=new_seq))
    write_run_recipe(run_dir, recipe)
    record_changes(run_dir, log, [f"{where}: data.seq_len {seq} -> {new_seq} (rows longer than {new_seq} tokens "
                                  f"are truncated): --set data.seq_len={new_seq}"])
    return recipe
