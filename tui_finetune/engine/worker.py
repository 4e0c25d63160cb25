"""The training worker: ``python -m tui_finetune.engine.worker RUN_DIR``.

It reads the run folder's resolved recipe, trains, and reports through ``events.jsonl`` and
``run.json``; it never prints for a human (its stdout and stderr go to ``worker.log``). Started in its
own session, it outlives the terminal and the UI. Every way out sets a final state: ``completed``
with the adapter in ``adapter/``, ``interrupted`` with a sealed checkpoint after a STOP file or
SIGINT/SIGTERM, or ``failed`` with an error event that says what to change. Starting it again on an
interrupted run resumes from the newest valid checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tui_finetune.core.events import EndEvent, ErrorEvent, EventLog, PhaseEvent, SampleEvent, WarningEvent
from tui_finetune.core.recipe import RecipeError, RecipeSpec, check_recipe_fits_machine
from tui_finetune.core.runs import (
    ADAPTER_DIR, CHECKPOINTS_DIR, EVENTS_FILE, STOP_FILE, read_run_info, read_run_recipe, update_run_info)


class StopRequested(Exception):
    """A stop arrived before training began: nothing to checkpoint yet."""


@dataclass
class StopSignal:
    """Set by SIGINT/SIGTERM, or seen as a STOP file; polled at phase boundaries and every step."""

    run_dir: Path
    signalled: bool = False
    signals: list[int] = field(default_factory=list)

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.signalled = True
            self.signals.append(signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        if hasattr(signal, "SIGBREAK"):  # pragma: no cover - Windows console close / Ctrl+Break
            signal.signal(signal.SIGBREAK, handler)

    def __call__(self) -> bool:
        return self.signalled or (self.run_dir / STOP_FILE).exists()

    def check(self) -> None:
        if self():
            raise StopRequested()


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("tui-finetune", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def oom_advice(recipe: RecipeSpec) -> str:
    """What to change after a CUDA out-of-memory, from the recipe's own numbers."""
    data, train = recipe.data, recipe.train
    tips = [f"shorter sequences (--set data.seq_len={max(data.seq_len // 2, 16)})"]
    if train.micro_batch > 1:
        tips.append(f"a smaller micro-batch (--set train.micro_batch={max(train.micro_batch // 2, 1)} "
                    f"train.grad_accum={train.grad_accum * 2} keeps the effective batch)")
    if not train.gradient_checkpointing:
        tips.append("gradient checkpointing (--set train.gradient_checkpointing=true)")
    if recipe.method != "qlora":
        tips.append("QLoRA (--set method=qlora) to hold the base weights in 4 bits")
    if recipe.lora.r > 8:
        tips.append(f"a smaller LoRA rank (--set lora.r={recipe.lora.r // 2})")
    return "try " + "; or ".join(tips) + ". 'tui-finetune plan --recipe ...' shows what fits your card."


def _is_oom(err: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(err, oom_types) or "out of memory" in str(err).lower() and "cuda" in str(err).lower()


class Worker:
    """One training run, from the folder to a final state. ``setup / train / save`` as in torchtune."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log = EventLog(run_dir / EVENTS_FILE)
        self.stop = StopSignal(run_dir)
        self.recipe = read_run_recipe(run_dir)
        self.info = read_run_info(run_dir)

    def phase(self, name: str, message: str = "") -> None:
        self.stop.check()
        self.log.emit(PhaseEvent(phase=name, message=message))

    def run(self) -> int:
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        self.stop.install()
        update_run_info(self.run_dir, state="running", pid=os.getpid(), started_at=time.time(), ended_at=None,
                        versions=_versions(), backend="transformers",
                        backend_reason="the universal PyTorch path (Trainer + peft); no accelerated backend yet")
        try:
            stopped = self._train()
        except StopRequested:
            return self._end("interrupted", "stopped before training began: nothing to save")
        except RecipeError as err:
            return self._fail(str(err), "fix the recipe or pass --set KEY=VALUE", "recipe")
        except Exception as err:  # noqa: BLE001 - every failure must end as a state with advice
            return self._fail_from(err)
        if stopped:
            return self._end("interrupted", f"stopped; resume with 'tui-finetune resume {self.run_dir.name}'")
        return self._end("completed", f"adapter saved in {self.run_dir / ADAPTER_DIR}")

    def _fail_from(self, err: BaseException) -> int:
        from tui_finetune.engine.demo_model import DemoModelMissing
        from tui_finetune.engine.model_source import ModelAccessError

        traceback.print_exc()
        if isinstance(err, ModelAccessError):
            return self._fail(str(err), err.advice, err.kind)
        if isinstance(err, DemoModelMissing):
            return self._fail(str(err), err.advice, "model")
        if type(err).__name__ == "DataError":
            return self._fail(str(err), "fix the data file at the line named, or see 'tui-finetune data check'", "data")
        if _is_oom(err):
            return self._fail(f"CUDA out of memory: {str(err).splitlines()[0][:200]}", oom_advice(self.recipe), "oom")
        return self._fail(f"{type(err).__name__}: {err}",
                          f"the traceback is in {self.run_dir / 'worker.log'}; please report it", "crash")

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
        from transformers import set_seed

        from tui_finetune.engine import loading, samples
        from tui_finetune.engine.callbacks import EventsCallback, SealCheckpointCallback, StopCallback
        from tui_finetune.engine.checkpoints import clear_staging, find_resume_checkpoint
        from tui_finetune.engine.model_source import resolve_model
        from tui_finetune.engine.training import build_trainer, build_training_args, plan_total_steps

        recipe, run_dir = self.recipe, self.run_dir
        device = loading.detect_device()
        check_recipe_fits_machine(recipe, device.machine(), None)
        update_run_info(run_dir, device=device.name)

        self.phase("download", f"finding {recipe.model}")
        source = resolve_model(recipe.model, self.log)
        self.phase("load", f"loading {source.folder} on {device.name}")
        tokenizer = loading.load_tokenizer(source.folder, recipe)
        if recipe.method == "qlora":
            self.phase("quantize", f"quantizing to 4-bit {recipe.quant.quant_type} while loading")
        model = loading.load_base_model(source.folder, recipe, device)
        set_seed(recipe.train.seed)  # the LoRA init draws from the RNG: same seed, same adapter
        model = loading.add_lora(model, recipe, device)
        trainable, total = loading.count_parameters(model)
        self.phase("tokenize", f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train "
                               f"({100 * trainable / max(total, 1):.2f}%); preparing data")
        data = self._prepare_data(tokenizer)
        total_steps = plan_total_steps(recipe, len(data.train))
        update_run_info(run_dir, total_steps=total_steps, data_hash=data.data_hash)

        checkpoints = run_dir / CHECKPOINTS_DIR
        clear_staging(checkpoints)
        choice = find_resume_checkpoint(checkpoints)
        for bad in choice.skipped:
            self.log.emit(WarningEvent(message=f"skipped checkpoint {bad.path.name}: {bad.reason}",
                                       advice="resuming from the newest valid checkpoint before it"))
        prompt = samples.held_out_prompt(data.eval)
        if prompt and choice.path is None:
            self._sample(model, tokenizer, prompt, "before")

        stop_cb = StopCallback(self.stop, recipe.checkpoint.every_minutes)
        events_cb = EventsCallback(self.log)
        callbacks = [events_cb, stop_cb,
                     SealCheckpointCallback(checkpoints, recipe.checkpoint.keep_last, self.log)]
        args = build_training_args(recipe, run_dir, device, total_steps, has_eval=data.eval is not None and len(data.eval) > 0)
        from tui_finetune.data.collate import make_collator

        trainer = build_trainer(model, tokenizer, args, data.train, data.eval,
                                make_collator(tokenizer, recipe.data.packing), callbacks, recipe.memory)
        resume = str(choice.path) if choice.path else None
        self.phase("train", f"{total_steps} steps" + (f", resuming from {choice.path.name}" if choice.path else ""))
        if choice.path:
            update_run_info(run_dir, resumed_from=choice.path.name)
        trainer.train(resume_from_checkpoint=resume)
        if stop_cb.stopped_at is not None:
            return True
        if trainer.eval_dataset is not None and events_cb.last_eval_step != trainer.state.global_step:
            trainer.evaluate()  # Trainer evaluates at the last step itself on most versions
        self.log.emit(PhaseEvent(phase="save", message=f"writing the adapter to {run_dir / ADAPTER_DIR}"))
        model.save_pretrained(run_dir / ADAPTER_DIR, safe_serialization=True)
        tokenizer.save_pretrained(run_dir / ADAPTER_DIR)
        if prompt:
            self._sample(model, tokenizer, prompt, "after")
        return False

    def _prepare_data(self, tokenizer: Any) -> Any:
        from tui_finetune.data.prepare import prepare_datasets

        info = read_run_info(self.run_dir)
        data = prepare_datasets(info.data_path, tokenizer, self.recipe.data, self.recipe.train.seed)
        if self.info.data_hash and data.data_hash != self.info.data_hash:
            raise RecipeError(f"{info.data_path} changed since this run started (hash {data.data_hash[:12]} "
                              f"vs {self.info.data_hash[:12]}): resume with the same data, or start a new run")
        for warning in getattr(data, "warnings", []) or []:
            self.log.emit(WarningEvent(message=str(warning)))
        return data

    def _sample(self, model: Any, tokenizer: Any, prompt: list[int], label: str) -> None:
        from tui_finetune.engine.samples import generate_sample

        text = generate_sample(model, tokenizer, prompt)
        self.log.emit(SampleEvent(label=label, prompt=tokenizer.decode(prompt, skip_special_tokens=True), text=text))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tui_finetune.engine.worker RUN_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Worker(Path(argv[0])).run()


if __name__ == "__main__":
    sys.exit(main())
