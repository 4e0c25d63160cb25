"""The training worker: ``python -m tui_finetune.engine.worker RUN_DIR``.

It reads the run folder's resolved recipe, trains, and reports through ``events.jsonl`` and
``run.json``; it never prints for a human (its stdout and stderr go to ``worker.log``). Started in its
own session, it outlives the terminal and the UI. Every way out sets a final state: ``completed``
with the adapter in ``adapter/``, ``interrupted`` with a sealed checkpoint after a STOP file or
SIGINT/SIGTERM/SIGHUP, or ``failed`` with an error event that says what to change. Starting it again
on an interrupted run resumes from the newest valid checkpoint (or the one ``resume --from`` named,
recorded in run.json), after checking that the recipe, model and data are those it was saved with.
On a GPU, a fresh run's recipe is first fitted to the free VRAM (auto-fit, engine/recipe_refit.py). Training
(engine/training_loop.py) fit-checks the longest batch with the run's own training step before the
first step, and recovers from a CUDA OOM anywhere in it by its one rule (engine/training_loop.py): Liger or
Unsloth is dropped (this process re-executes itself without it), else the micro-batch shrinks with the
effective batch unchanged, and the compiled backend only goes at micro-batch 1, where the run would
otherwise cut rows or give up. The adapter is saved before anything else happens after training, and
evaluation and the samples can fail without failing the run (engine/post_training.py). Stops arrive
through engine/stop_signal.py.

Started by torchrun (``train.devices`` above 1), each process is one rank (engine/distributed.py): all
of them load the model on their own card and train; rank 0 alone writes the run folder, runs the
samples and saves the adapter; the evaluation runs on all of them. When another rank dies, torchrun
ends the rest and rank 0 records the run as ``interrupted``: it resumes like any other.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from tui_finetune.core.events import EndEvent, ErrorEvent, EventLog, PhaseEvent, SampleEvent, WarningEvent, first_line
from tui_finetune.core.recipe import RecipeError
from tui_finetune.core.recipe_machine import check_recipe_fits_machine
from tui_finetune.core.run_folder.info import (
    make_run_folders_read_only, mark_interrupted_phase_failed, read_run_info, read_run_recipe, update_run_info)
from tui_finetune.core.run_folder.layout import ADAPTER_DIR, CHECKPOINTS_DIR, EVENTS_FILE, STOP_FILE
from tui_finetune.core.advice import memory_advice
from tui_finetune.engine.recipe_refit import FitRefused
from tui_finetune.engine.stop_signal import StopRequested, StopSignal


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("tui-finetune", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _with_note(message: str, note: str) -> str:
    return f"{message}, {note}" if note else message


def _is_oom(err: BaseException) -> bool:
    from tui_finetune.engine.training import is_oom

    return is_oom(err)


def _is_peer_failure(err: BaseException) -> bool:
    from tui_finetune.engine.distributed import is_peer_failure

    return is_peer_failure(err)


def with_devices(recipe: Any, world_size: int) -> Any:
    """The recipe with ``train.devices`` the processes really training (the launch settles it to that, so
    this changes only a hand-started worker's): its effective batch is then the one trained."""
    if recipe.train.devices == world_size:
        return recipe
    from dataclasses import replace

    return replace(recipe, train=replace(recipe.train, devices=world_size))


class Worker:
    """One training run, from the folder to a final state. ``setup / train / save`` as in torchtune."""

    def __init__(self, run_dir: Path) -> None:
        from tui_finetune.engine.distributed import SilentEventLog, read_rank_facts

        self.run_dir = run_dir
        self.ranks = read_rank_facts()
        self.stop = StopSignal(run_dir)
        self.recipe = with_devices(read_run_recipe(run_dir), self.ranks.world_size)
        self.info = read_run_info(run_dir)
        if self.ranks.is_main:
            self.log = EventLog(run_dir / EVENTS_FILE)
        else:  # the run folder has one author, rank 0
            make_run_folders_read_only()
            self.log = SilentEventLog(run_dir / EVENTS_FILE)
        self.checkpoint_bytes = 0
        self.backend: Any = None

    def phase(self, name: str, message: str = "") -> None:
        self.stop.check()
        self.log.emit(PhaseEvent(phase=name, message=message))

    def run(self) -> int:
        if self.ranks.is_main:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        self.stop.install()
        mark_interrupted_phase_failed(self.run_dir)
        started: dict[str, Any] = dict(state="running", started_at=time.time(), ended_at=None, versions=_versions(),
                                       world_size=self.ranks.world_size)
        if not self.ranks.under_torchrun:  # else run.json keeps torchrun's pid, the parent of every rank
            started["pid"] = os.getpid()
        update_run_info(self.run_dir, **started)
        try:
            stopped = self._train()
        except StopRequested:
            return self._end("interrupted", "stopped before training began: nothing to save")
        except RecipeError as err:
            return self._fail(str(err), "fix the recipe or pass --set KEY=VALUE", "recipe")
        except FitRefused as err:  # OomGiveUp too
            return self._fail(str(err), err.advice, "oom")
        except Exception as err:  # noqa: BLE001 - every failure must end as a state with advice
            if not self.ranks.is_main:  # its traceback goes to worker.log; rank 0 says how the run ended
                traceback.print_exc()
                return 1
            # the error must say a peer is gone; torchrun's SIGTERM alone is no proof: when the other rank failed
            # first on the same data, this one fails the same way a moment later, and must say so
            if self.ranks.distributed and _is_peer_failure(err):
                return self._another_rank_ended(err)
            return self._fail_from(err)
        if stopped:
            return self._end("interrupted", f"stopped; resume with 'tui-finetune resume {self.run_dir.name}'")
        return self._end("completed", f"adapter saved in {self.run_dir / ADAPTER_DIR}")

    def _fail_from(self, err: BaseException) -> int:
        from tui_finetune.engine.demo_model import DemoModelMissing
        from tui_finetune.engine.model_folder import ModelAccessError

        from tui_finetune.core.run_folder.checkpoints import CheckpointError, clear_staging, disk_full_message

        traceback.print_exc()
        checkpoints = self.run_dir / CHECKPOINTS_DIR
        if isinstance(err, CheckpointError):
            return self._fail(str(err), f"see 'tui-finetune resume --help'; the run folder is {self.run_dir}", "checkpoint")
        if isinstance(err, OSError) and disk_full_message(err, checkpoints, self.checkpoint_bytes):
            clear_staging(checkpoints)  # give back what the failed save took; the previous checkpoint stays
            return self._fail(disk_full_message(err, checkpoints, self.checkpoint_bytes) or "",
                              f"free disk space, then 'tui-finetune resume {self.run_dir.name}'", "disk")
        if isinstance(err, ModelAccessError):
            return self._fail(str(err), err.advice, err.kind)
        if isinstance(err, DemoModelMissing):
            return self._fail(str(err), err.advice, "model")
        if type(err).__name__ == "DataError":
            return self._fail(str(err), "fix the data file at the line named, or see 'tui-finetune data check'", "data")
        if _is_oom(err):
            return self._fail(f"CUDA out of memory: {first_line(err)}", memory_advice(self.recipe), "oom")
        return self._fail(f"{type(err).__name__}: {err}",
                          f"the traceback is in {self.run_dir / 'worker.log'}; please report it", "crash")

    def _another_rank_ended(self, err: BaseException) -> int:
        """Another rank was killed or crashed, and torchrun ended this one: nothing of this rank failed, and
        the newest checkpoint is intact, so the run is interrupted and resumes like any other."""
        traceback.print_exc()
        return self._end("interrupted", f"another process of this {self.ranks.world_size}-process run ended (killed, "
                                        f"or crashed: see {self.run_dir / 'worker.log'}); resume with "
                                        f"'tui-finetune resume {self.run_dir.name}'")

    def _fail(self, message: str, advice: str, kind: str) -> int:
        self.log.emit(ErrorEvent(message=message, advice=advice, kind=kind))
        return self._end("failed", message)

    def _end(self, state: str, message: str) -> int:
        update_run_info(self.run_dir, state=state, ended_at=time.time(), message=message)
        if state == "completed":
            self.log.emit(PhaseEvent(phase="done", message=message))
        self.log.emit(EndEvent(state=state, message=message))
        self.log.close()
        return {"completed": 0, "interrupted": 130}.get(state, 1)

    # ------------------------------------------------------------ the run itself

    def _train(self) -> bool:
        """Load, prepare, train and save; True when training stopped early on request."""
        from tui_finetune.engine import unsloth_import
        from tui_finetune.engine.model_folder import model_type_before_loading

        failures = dict(self.info.backend_failures)
        if self.ranks.distributed:
            self._keep_to_the_universal_backend()
        unsloth_import.prepare_process(self.recipe.memory.backend, failures,  # before transformers and peft
                                       model_type_before_loading(self.recipe.model))
        from tui_finetune.engine import backends, distributed, loading, recipe_refit, samples
        from tui_finetune.engine.post_training import run_optional_phase, save_adapter
        from tui_finetune.engine.recipe_refit import SequenceTooLong
        from tui_finetune.engine.training_loop import TrainingLoop
        from tui_finetune.core.run_folder.checkpoints import list_checkpoints
        from tui_finetune.engine.model_folder import resolve_model
        from tui_finetune.engine.packed_training import trainer_recipe
        from tui_finetune.engine.training import plan_total_steps

        recipe, run_dir, ranks = self.recipe, self.run_dir, self.ranks
        distributed.start_process_group(ranks)
        if ranks.distributed:
            update_run_info(run_dir, rank_pids=[int(pid) for pid in distributed.gather_from_ranks(os.getpid())])
        device = loading.detect_device()
        check_recipe_fits_machine(recipe, device.machine(), None)
        update_run_info(run_dir, device=device.name + (f" x {ranks.world_size}" if ranks.distributed else ""))

        self.phase("download", f"finding {recipe.model}")
        source = resolve_model(recipe.model, self.log)
        if device.has_cuda and not list_checkpoints(run_dir / CHECKPOINTS_DIR):  # auto-fit a fresh run only
            free = distributed.min_over_ranks(recipe_refit.free_vram_bytes())  # every rank fits the smallest card
            recipe = self.recipe = recipe_refit.auto_fit_run(run_dir, recipe, str(source.folder), free, self.log,
                                                             backends.expected_backend(source.folder, recipe, device, failures),
                                                             device.machine())
        expected = backends.expected_backend(source.folder, recipe, device, failures)  # after auto-fit's changes
        note = backends.BACKENDS[expected].loading_note
        quantizes = recipe.method == "qlora"  # the phase that lasts until the model is ready says what else it does
        self.phase("load", _with_note(f"loading {source.folder} on {device.name}", "" if quantizes else note))
        tokenizer = loading.load_tokenizer(source.folder, recipe)
        if quantizes:
            self.phase("quantize", _with_note(f"quantizing to 4-bit {recipe.quant.quant_type} while loading", note))
        load_oom: BaseException | None = None
        try:
            loaded = backends.load_for_training(source.folder, recipe, device, failures)
        except backends.BackendFailed as err:
            self._restart_without(err)
        except Exception as err:
            if not _is_oom(err):
                raise
            load_oom = err
        if distributed.any_rank(load_oom is not None)[0]:  # the smallest card refuses for all of them
            self._refuse_load_oom(load_oom or RuntimeError("CUDA out of memory on another GPU of this run"),
                                  expected)
        model, self.backend = loaded.model, loaded.backend
        recipe_refit.warn_if_embeddings_stay(recipe, model, self.log)
        reason = loaded.choice.reason if not ranks.distributed else "pure PyTorch: multi-GPU runs train on it"
        update_run_info(run_dir, backend=loaded.choice.name, backend_reason=reason,
                        backend_skipped=loaded.choice.skipped)
        trainable, total = loading.count_parameters(model)
        self.phase("tokenize", f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train "
                               f"({100 * trainable / max(total, 1):.2f}%) on the {loaded.choice.name} backend "
                               f"({reason}); preparing data")
        data = self._prepare_data(tokenizer)
        total_steps = plan_total_steps(trainer_recipe(recipe, data.packing), len(data.train), ranks.world_size)
        update_run_info(run_dir, total_steps=total_steps, data_hash=data.data_hash)

        resume = self._choose_checkpoint(data.data_hash, trainable)
        prompt = samples.held_out_prompt(data.eval)
        if prompt and resume is None and ranks.is_main:
            run_optional_phase(run_dir, self.log, "sample-before", "a generation before training",
                               lambda: self._sample(model, tokenizer, prompt, "before"))
        while True:
            try:
                loop = TrainingLoop(run_dir, self.log, recipe, self.backend, self.stop, self._restart_without,
                                    ranks.world_size)
                trainer = loop.run(model, tokenizer, data, device, total_steps, resume)
                recipe = self.recipe = loop.recipe  # with an OOM's smaller micro-batch, as recipe.toml has it
                break
            except SequenceTooLong as err:  # OOM at micro-batch 1, no checkpoint yet: shorter rows, tokenized again
                moved = recipe_refit.move_embeddings_after_oom(run_dir, loop.recipe, model, self.backend, self.log, err)
                if moved is not None:  # first the lever that cuts no row: the input embedding in CPU RAM
                    recipe, data, total_steps = moved, loop.data, loop.total_steps  # of the batch in effect
                    self.recipe = recipe
                    continue
                if self.backend.name != "universal":  # compiled (the others went first): its speed before any row
                    self._restart_without(backends.BackendFailed(
                        self.backend.name, f"CUDA out of memory in {err.where} at micro-batch 1: {err.error}"))
                recipe = self.recipe = recipe_refit.shorten_sequence(run_dir, loop.recipe, err.longest, err.error,
                                                                     self.log, err.where)
                data = self._prepare_data(tokenizer)
                total_steps = plan_total_steps(trainer_recipe(recipe, data.packing), len(data.train), ranks.world_size)
                update_run_info(run_dir, total_steps=total_steps)
        if trainer is None:
            return True
        # The adapter first: nothing after training (evaluation, the sample) may cost it.
        if ranks.is_main:
            save_adapter(run_dir, model, tokenizer, self.log)
        distributed.barrier()  # rank 0's writes so far are what every rank reads next (failed_phases)
        if trainer.eval_dataset is not None and trainer.state.global_step not in loop.evaluated_steps:
            run_optional_phase(run_dir, self.log, "eval", "the final evaluation", trainer.evaluate)  # on every rank
        if prompt and ranks.is_main:
            run_optional_phase(run_dir, self.log, "sample-after", "a generation after training",
                               lambda: self._sample(model, tokenizer, prompt, "after"))
        return False

    def _choose_checkpoint(self, data_hash: str, trainable: int) -> Path | None:
        """The checkpoint to resume from, checked against the run as it is now; also the disk check."""
        from tui_finetune.core.run_folder.checkpoints import (
            CheckpointError, check_free_disk, clear_staging, estimate_checkpoint_bytes, folder_size)
        from tui_finetune.core.run_folder.resume import find_resume_checkpoint, refusal_message, resume_differences

        checkpoints = self.run_dir / CHECKPOINTS_DIR
        if self.ranks.is_main:
            clear_staging(checkpoints)
        from_step, force = self.info.resume_from_step, self.info.resume_force
        choice = find_resume_checkpoint(checkpoints, from_step)
        for message in choice.messages():
            self.log.emit(WarningEvent(message=message, advice="the broken checkpoint is left for inspection"))
        if choice.path is None and choice.skipped:
            raise CheckpointError("no valid checkpoint to resume from: " + "; ".join(choice.messages()) +
                                  f". Start again from the beginning with 'tui-finetune resume {self.run_dir.name} --from 0'")
        if choice.path is not None:
            diffs = resume_differences(choice.path, self.recipe, data_hash)
            if diffs and not force:
                raise RecipeError(refusal_message(choice.path, diffs, self.run_dir.name))
            if diffs:
                self.log.emit(WarningEvent(message="resuming with changes (--force): " + "; ".join(diffs)))
        self.checkpoint_bytes = (folder_size(choice.path) if choice.path else
                                 estimate_checkpoint_bytes(trainable, self.recipe.train.optimizer))
        check_free_disk(checkpoints, self.checkpoint_bytes)
        update_run_info(self.run_dir, resume_from_step=None, resume_force=False,
                        resumed_from=choice.path.name if choice.path else "")
        return choice.path

    def _keep_to_the_universal_backend(self) -> None:
        """A multi-GPU run trains on the universal path: an accelerated backend that fails restarts its
        process (``_restart_without``), which one rank of a torchrun group can't do alone."""
        from dataclasses import replace

        if self.recipe.memory.backend in ("auto", "universal"):
            self.recipe = replace(self.recipe, memory=replace(self.recipe.memory, backend="universal"))
            return
        self.log.emit(WarningEvent(message=f"memory.backend = {self.recipe.memory.backend!r} is for one GPU: this "
                                           f"{self.ranks.world_size}-process run trains on the universal path",
                                   advice='set memory.backend = "auto" to leave the choice to the worker'))
        self.recipe = replace(self.recipe, memory=replace(self.recipe.memory, backend="universal"))

    def _refuse_load_oom(self, err: BaseException, backend: str) -> None:
        """Out of memory while loading: measured, the weights don't fit. An accelerated backend may load
        differently, so it is dropped first; on the universal path, or one that allocates like it (compiled:
        its weights load the same way), the run is refused with what to change."""
        from tui_finetune.engine.backends import BACKENDS, BackendFailed
        if not BACKENDS[backend].allocates_like_universal:
            self._restart_without(BackendFailed(backend, f"CUDA out of memory while loading: {first_line(err)}"))
        raise FitRefused(f"the model doesn't fit this card: CUDA out of memory while loading its weights "
                         f"({first_line(err)})", memory_advice(self.recipe)) from None

    def _restart_without(self, err: Any) -> None:
        """A backend failed after patching this process: record it and start afresh in this process's
        place (same pid on POSIX), where ``load_for_training`` skips it."""
        failures = {**read_run_info(self.run_dir).backend_failures, err.name: err.reason}
        update_run_info(self.run_dir, backend_failures=failures)
        self.log.emit(WarningEvent(message=f"{err}; restarting the worker without it",
                                   advice='set memory.backend = "universal" to skip the attempt'))
        self.log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "tui_finetune.engine.worker", str(self.run_dir)])

    def _prepare_data(self, tokenizer: Any) -> Any:
        from tui_finetune.data.prepare import prepare_datasets

        info = read_run_info(self.run_dir)
        data = prepare_datasets(info.data_path, tokenizer, self.recipe.data, self.recipe.train.seed)
        if self.info.data_hash and data.data_hash != self.info.data_hash and not self.info.resume_force:
            raise RecipeError(f"{info.data_path} changed since this run started (hash {data.data_hash[:12]} "
                              f"vs {self.info.data_hash[:12]}): resume with the same data, or start a new run")
        for warning in getattr(data, "warnings", []) or []:
            self.log.emit(WarningEvent(message=str(warning)))
        from tui_finetune.engine.packed_training import pack_training_data

        return pack_training_data(self.run_dir, data, self.recipe, self.log)  # flat bins, length groups or rows

    def _sample(self, model: Any, tokenizer: Any, prompt: list[int], label: str) -> None:
        from tui_finetune.engine.faults import raise_injected_oom
        from tui_finetune.engine.samples import generate_sample

        raise_injected_oom("sample")  # fault injection for tests (engine/faults.py); nothing unless one asks
        text = generate_sample(model, tokenizer, prompt)
        self.log.emit(SampleEvent(label=label, prompt=tokenizer.decode(prompt, skip_special_tokens=True), text=text))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tui_finetune.engine.worker RUN_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return Worker(Path(argv[0])).run()
    finally:
        from tui_finetune.engine.distributed import stop_process_group

        stop_process_group()


if __name__ == "__main__":
    sys.exit(main())
