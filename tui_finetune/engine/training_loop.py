"""The training loop: ``Trainer.train`` with the fit-check first, and one recovery rule for a CUDA OOM.

The fit-check (engine/fit_check.py) runs the run's own training step on its longest batch as training
begins, so an out-of-memory there and one in any later step reach the same handler:

1. where auto-fit let some layers keep their activations (``memory.layers_keeping_activations``), every
   layer recomputes again (recipe_refit.recompute_every_layer) and training goes on as after a shrink,
   with the same micro-batch and backend: it undoes only what was spent on speed;
2. else, on an accelerated backend that allocates differently (Liger, Unsloth), the backend is dropped: the
   worker records it and restarts on the universal path, as after a backend failure, before anything else
   shrinks (``auto`` must not keep a backend the fit-check can't prove on this card); the compiled backend
   allocates like the universal path (``Backend.allocates_like_universal``), so it is dropped only at
   micro-batch 1, before the run would give up or cut rows (after the embedding move of step 4); for a backend without the generic probe step (Unsloth,
   compiled: ``backends.Backend.probes``) any failure in the fit-check drops it too;
3. else the micro-batch shrinks and the accumulation grows by the same factor (``next_micro_batch``:
   the effective batch stays exactly the same), written to the run's recipe.toml
   (recipe_refit.shrink_micro_batch), and training goes on from the last checkpoint, or from the very
   same initial adapter when there is none yet; a length-grouped run's groups are rebuilt first, as
   their budget is the micro-batch times the longest row (``regroup``);
4. at micro-batch 1, a run with no checkpoint yet raises ``SequenceTooLong`` (the worker first moves the
   input embedding to CPU RAM where it can, then halves the sequence and tokenizes again; either way from
   the initial adapter and seed); once a checkpoint fixes the sequence length, it gives up with advice
   (``OomGiveUp``).

Evaluation's own OOMs shrink only the eval batch, and at batch 1 turn evaluation off (training.py).

With several ranks an OOM on any of them is raised on all of them at the same step (training.py,
fit_check.py), so each rank reaches this rule with the same values and takes the same decision; rank 0
alone records it (the others' run folder is read-only), and every value the ranks must agree on is kept
here in memory rather than read back from run.json, which rank 0 may not have written yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from transformers import set_seed

from tui_finetune.core.devices import describe_batch
from tui_finetune.core.events import EventLog, PhaseEvent, WarningEvent, first_line
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.run_folder.checkpoints import clear_staging
from tui_finetune.core.run_folder.info import mark_phase_failed, read_run_info, update_run_info
from tui_finetune.core.run_folder.layout import CHECKPOINTS_DIR
from tui_finetune.core.run_folder.resume import find_resume_checkpoint
from tui_finetune.data.collate import make_collator
from tui_finetune.engine.backends import Backend, BackendFailed
from tui_finetune.engine.callbacks import EventsCallback, SealCheckpointCallback, StepHooksCallback, StopCallback
from tui_finetune.engine.fit_check import FitCheckCallback, FitCheckResult, row_lengths
from tui_finetune.engine.packed_training import describe_bins_a_step, pack_training_data, trainer_recipe
from tui_finetune.engine.post_training import record_peak
from tui_finetune.engine.recipe_refit import SequenceTooLong, recompute_every_layer, shrink_micro_batch
from tui_finetune.engine.training import (
    build_trainer, build_training_args, free_cuda_memory, is_oom, plan_total_steps)
from tui_finetune.engine.vram_figures import reset_phase_peak


class TrainingLoop:
    """One run's training, from its first step (or its checkpoint) to its last, through any OOM."""

    def __init__(self, run_dir: Path, log: EventLog, recipe: RecipeSpec, backend: Backend | None,
                 stop_requested: Callable[[], bool], restart_without: Callable[[BackendFailed], None],
                 world_size: int = 1) -> None:
        self.run_dir = run_dir
        self.world_size = world_size
        """Ranks training together (the recipe's ``train.devices``, settled by the worker to this number)."""
        self.log = log
        self.recipe = recipe
        """The recipe in effect: an OOM's smaller micro-batch replaces it here and in the run's recipe.toml."""
        self.backend = backend
        self.stop_requested = stop_requested
        self.restart_without = restart_without
        """Records a failed backend and replaces this process with a fresh worker (never returns)."""
        self.data: Any = None
        self.total_steps = 0
        """The data training ran on and its optimizer steps: the worker's, or after an OOM shrink of length groups
        its rows regrouped (``regroup``)."""
        self.evaluated_steps: set[int] = set()
        """The steps Trainer evaluated, so the worker doesn't evaluate the last one twice."""

    def run(self, model: Any, tokenizer: Any, data: Any, device: Any, total_steps: int, resume: Path | None) -> Any:
        """Trainer.train, which fit-checks the longest batch first (engine/fit_check.py); the Trainer that
        finished, or None when a stop ended training early.

        One rule for a CUDA OOM, in the fit-check or in any later step (the module docstring has it whole):
        kept layers recompute again; else Liger or Unsloth is dropped (the worker restarts on the universal
        path, as after a backend failure); else the micro-batch shrinks and the accumulation grows by the same
        factor, and training goes on from the last checkpoint; at micro-batch 1 with no checkpoint yet,
        ``SequenceTooLong``.
        """
        recipe, run_dir, self.data, self.total_steps = self.recipe, self.run_dir, data, total_steps
        checkpoints = run_dir / CHECKPOINTS_DIR
        info = read_run_info(run_dir)
        self.eval_batch = info.eval_batch or None
        initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}
        stop_cb, events_cb, hooks_cb = StopCallback(self.stop_requested, recipe.checkpoint.every_minutes), EventsCallback(self.log), StepHooksCallback()
        seal_cb = SealCheckpointCallback(checkpoints, recipe.checkpoint.keep_last, self.log, recipe, data.data_hash)
        has_eval = data.eval is not None and len(data.eval) > 0 and "eval" not in info.failed_phases
        packed = getattr(data, "packing", None)
        collator = make_collator(tokenizer, recipe.data.packing, grouped=packed is not None and packed.kind == "grouped")
        unit = "GPUs" if device.has_cuda else "processes"
        train_message = (f"{total_steps} steps of {describe_batch(recipe, unit)}{describe_bins_a_step(recipe, packed)}"
                         + (f", resuming from {resume.name}" if resume else ""))
        while True:  # the Trainer's micro-batch and accumulation count bins when packed (trainer_recipe)
            args = build_training_args(trainer_recipe(recipe, packed), run_dir, device, total_steps, has_eval,
                                       eval_batch=self.eval_batch or recipe.train.micro_batch)  # eval: rows
            trainer = build_trainer(model, tokenizer, args, data.train, data.eval if has_eval else None, collator,
                                    [events_cb, stop_cb, seal_cb, hooks_cb], recipe.memory, self._eval_shrunk,
                                    self.backend, self._eval_skipped)
            trainer.recipe_micro_batch = recipe.train.micro_batch
            fit_cb = FitCheckCallback(trainer, data.train, collator,
                                      lambda result, m=recipe.train.micro_batch, msg=train_message: self._fit_checked(result, m, msg))
            trainer.callback_handler.callbacks.insert(0, fit_cb)  # before the others see training begin
            hooks_cb.trainer = trainer
            try:
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
                record_peak(self.run_dir, "train")
                break
            except Exception as err:
                in_check = not fit_cb.passed
                if not is_oom(err):
                    if in_check and fit_cb.stepping and self.backend is not None and not self.backend.probes:
                        # the fit-check is an unprobed backend's probe (backends.Backend.probes): its failure
                        # there drops it, as a failed probe would
                        self.restart_without(BackendFailed(self.backend.name, f"{type(err).__name__} in the "
                                                            f"fit-check: {first_line(err)}"))
                    raise
                del trainer
                free_cuda_memory()
                if self.world_size <= 1 or args.process_index == 0:
                    clear_staging(checkpoints)
                resume = find_resume_checkpoint(checkpoints).path
                where = "the fit-check" if in_check else "training"
                relieved = recompute_every_layer(self.run_dir, recipe, model, self.log, where)
                if relieved is None and self._drops_backend_after_oom(recipe, resume):
                    self.restart_without(BackendFailed(self.backend.name, f"CUDA out of memory in {where}: "
                                                        f"{first_line(err)}"))
                if relieved is not None:  # first undo what the room was spent on; micro-batch and backend stay
                    recipe = self.recipe = seal_cb.recipe = relieved
                    if resume is None:
                        model.load_state_dict(initial, strict=False)
                        set_seed(recipe.train.seed)
                    train_message = ("continuing with every layer recomputing from "
                                     + (resume.name if resume else "the start"))
                    reset_phase_peak()
                    continue
                if recipe.train.micro_batch <= 1 and resume is None:  # no checkpoint yet: the length may change
                    model.load_state_dict(initial, strict=False)  # the worker starts over: from the initial adapter,
                    set_seed(recipe.train.seed)                   # not from the steps trained before the OOM
                    raise SequenceTooLong(max(row_lengths(data.train), default=0), first_line(err), where) from None
                recipe = seal_cb.recipe = self.shrink_after_oom(err, in_check)
                if packed is not None and packed.kind == "grouped":  # the budget halved with the micro-batch
                    data, total_steps = self.regroup(data)
                    self.data, self.total_steps, packed = data, total_steps, data.packing
                if resume is None:  # no checkpoint yet: start over from the very same initial adapter
                    model.load_state_dict(initial, strict=False)
                    set_seed(recipe.train.seed)
                train_message = (f"continuing with {describe_batch(recipe, unit)}{describe_bins_a_step(recipe, packed)} from "
                                 + (resume.name if resume else "the start"))
                reset_phase_peak()
        self.evaluated_steps = set(events_cb.eval_steps)
        return None if stop_cb.stopped_at is not None else trainer

    def _fit_checked(self, result: FitCheckResult, micro_batch: int, train_message: str) -> None:
        """The fit-check passed: its measurement in the ``fit`` phase and run.json, then training begins."""
        record_peak(self.run_dir, "fit", result.peak_reserved_bytes)
        self.log.emit(PhaseEvent(phase="fit", message=result.message(micro_batch)))
        self.log.emit(PhaseEvent(phase="train", message=train_message))
        reset_phase_peak()

    def _drops_backend_after_oom(self, recipe: RecipeSpec, resume: Path | None) -> bool:
        """Rule 2: an accelerated backend that allocates differently from the universal path is dropped before
        anything shrinks; one that allocates like it (compiled) only at micro-batch 1, once a checkpoint fixes
        the length (more shrinks than ``MAX_OOM_SHRINKS`` give up as on the universal path). Without a
        checkpoint the worker first moves the input embedding to CPU RAM, and drops it before it would cut
        rows (``worker.Worker``'s SequenceTooLong)."""
        backend = self.backend
        if backend is None or backend.name == "universal":
            return False
        return not backend.allocates_like_universal or (recipe.train.micro_batch <= 1 and resume is not None)

    def shrink_after_oom(self, err: BaseException, in_check: bool = False) -> RecipeSpec:
        """The one shrink rule after an OOM (``recipe_refit.shrink_micro_batch``): the recipe in effect, with a
        smaller micro-batch and the same effective batch, written to the run's recipe.toml; or give up."""
        self.recipe = shrink_micro_batch(self.run_dir, self.recipe, self.log, first_line(err), in_check)
        return self.recipe

    def regroup(self, data: Any) -> tuple[Any, int]:
        """After an OOM shrink of a grouped run: its rows in groups of the halved budget, the step size chosen
        again and announced (engine/packed_training.py), and the run's optimizer steps planned anew."""
        data = pack_training_data(self.run_dir, data, self.recipe, self.log)
        total_steps = plan_total_steps(trainer_recipe(self.recipe, data.packing), len(data.train), self.world_size)
        update_run_info(self.run_dir, total_steps=total_steps)
        return data, total_steps

    def _eval_skipped(self, why: str) -> None:
        mark_phase_failed(self.run_dir, "eval", why)
        self.log.emit(WarningEvent(message=f"evaluation is off for the rest of this run: {why}",
                                   advice="training goes on; a smaller data.seq_len makes evaluation fit"))

    def _eval_shrunk(self, old: int, new: int) -> None:
        self.eval_batch = new
        update_run_info(self.run_dir, eval_batch=new)
        self.log.emit(WarningEvent(message=f"CUDA out of memory in evaluation: eval batch {old} -> {new} "
                                           "(training batch unchanged)"))
