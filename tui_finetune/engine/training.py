"""Build the Trainer for a recipe: TrainingArguments from the recipe's fields, our callbacks attached.

Trainer owns the loop (DESIGN.md): gradient accumulation, mixed precision, optimizers by name
(``adamw_8bit``), schedulers with warmup, evaluation, and data skipping on resume. This module
only translates the recipe, once, in one place, and adds what the recovery needs: the micro-batch
and accumulation can differ from the recipe's after an OOM (the worker shrinks one and grows the
other), evaluation computes the same chunked loss as training (no phase builds full-vocabulary
logits), an OOM in evaluation halves only the eval batch and at batch 1 skips evaluation with a
warning instead of failing a run whose training went well, and the fault and trace hooks of
engine/faults.py sit in Trainer's documented override points (``training_step``,
``prediction_step``, ``get_batch_samples``). With several ranks (engine/distributed.py) the
micro-batches run without DDP's reducer and the gradients are averaged once per step, after every rank
has agreed that none ran out of memory, so an OOM on one card shrinks the batch on all of them.
"""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tui_finetune.core.events import first_line
from tui_finetune.core.recipe import MemorySpec, RecipeSpec
from tui_finetune.core.run_folder.layout import STAGING
from tui_finetune.engine import distributed, memory_techniques, regional_compile
from tui_finetune.engine.faults import TRACE_ENV, oom_limit
from tui_finetune.engine.loading import DeviceFacts, compute_dtype


def plan_total_steps(recipe: RecipeSpec, train_rows: int, world_size: int = 1) -> int:
    """Optimizer steps the run will take, computed the way Trainer does (partial last accumulation counts;
    with several ranks each takes every ``world_size``-th micro-batch, the last round padded)."""
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    batches = math.ceil(math.ceil(train_rows / recipe.train.micro_batch) / world_size)
    per_epoch = max(math.ceil(batches / recipe.train.grad_accum), 1)
    return max(math.ceil(recipe.train.epochs * per_epoch), 1)


def build_training_args(recipe: RecipeSpec, run_dir: Path, device: DeviceFacts, total_steps: int,
                        has_eval: bool, eval_batch: int | None = None) -> TrainingArguments:
    """Trainer's arguments, from the recipe in effect (an OOM's smaller micro-batch is in it); ``eval_batch``
    overrides the micro-batch for evaluation after an OOM there."""
    train, ckpt = recipe.train, recipe.checkpoint
    micro_batch, grad_accum = train.micro_batch, train.grad_accum
    dtype = compute_dtype(recipe, device)
    mixed = device.has_cuda and dtype != torch.float32
    every = ckpt.every_steps
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints" / STAGING),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=eval_batch or micro_batch,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps if train.max_steps > 0 else -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        warmup_steps=math.ceil(train.warmup_ratio * total_steps),
        optim=train.optimizer if device.has_cuda else "adamw_torch",
        bf16=bool(mixed and dtype == torch.bfloat16),
        fp16=bool(mixed and dtype == torch.float16),
        use_cpu=not device.has_cuda,
        # checkpointing is switched on by engine/memory_techniques.py when the model is prepared (non-reentrant)
        gradient_checkpointing=False,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.eval_every_steps if has_eval else None,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=None,
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=device.has_cuda,
        include_num_input_tokens_seen="non_padding",
        # evaluation is a loss, never logits: LeanTrainer.prediction_step computes it in chunks
        prediction_loss_only=True,
    )
    if distributed.read_rank_facts().distributed:
        # every LoRA weight takes part in every step; buffers (rotary tables) are the same on every rank, so
        # no collective runs inside the forward, where an OOM on one rank would leave the others waiting
        kwargs.update(ddp_backend="nccl" if device.has_cuda else "gloo", ddp_find_unused_parameters=False,
                      ddp_broadcast_buffers=False)
    return TrainingArguments(**kwargs)


class LeanTrainer(Trainer):
    """Trainer whose loss is the backend's (engine/backends.py): the fused chunked cross-entropy of
    engine/memory_techniques.py (universal and Liger), or the model's own (Unsloth's); no full fp32 logits in any.

    ``compute_loss`` is Trainer's documented override point; everything else is Trainer's own.
    The loss is normalised by ``num_items_in_batch`` exactly like transformers' ForCausalLMLoss,
    so gradient accumulation stays correct.
    """

    def __init__(self, *args: Any, memory: MemorySpec, backend: Any = None,
                 on_eval_shrink: Callable[[int, int], None] | None = None,
                 on_eval_skipped: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memory = memory
        if backend is None:
            from tui_finetune.engine.backends import BACKENDS

            backend = BACKENDS["universal"]
        self.backend = backend
        self.on_eval_shrink = on_eval_shrink
        self.on_eval_skipped = on_eval_skipped
        self.eval_skipped = ""
        """Why evaluation is off for the rest of this run ('' while it is on)."""
        self.trace_path = os.environ.get(TRACE_ENV) or None
        """Test hook (engine/faults.py): where each step's sample ids and loss go, for the resume tests."""
        self.step_sample_ids: list[int] = []
        self.step_loss = 0.0
        self.step_micro_batches = 0
        self.micro_steps_left = 0
        """Micro-batches of this optimizer step still to run on this rank: at 0 the ranks sync."""
        self.rank_oom = ""
        """This rank's out-of-memory in the current step ('' for none), until all ranks have heard of it."""
        self.recipe_micro_batch = 0
        """The recipe's micro-batch (0: the Trainer's), what an injected OOM compares: with length groups the
        Trainer's is 1 and the recipe's sets the groups' budget (engine/packed_training.py)."""

    # ------------------------------------------------ test hooks (engine/faults.py): injected OOMs, the trace

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        """Fetches one optimizer step's micro-batches: a new step's trace starts here."""
        self.step_sample_ids, self.step_loss = [], 0.0
        batches, num_items = super().get_batch_samples(*args, **kwargs)
        self.step_micro_batches = len(batches)
        self.begin_optimizer_step(len(batches))
        return batches, num_items

    def begin_optimizer_step(self, micro_steps: int) -> None:
        """The next ``micro_steps`` calls of ``training_step`` make one optimizer step (the fit-check's is 1)."""
        self.micro_steps_left = micro_steps

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.args.world_size <= 1:
            return self._micro_step(model, inputs, num_items_in_batch)
        self.micro_steps_left -= 1
        with self.accelerator.no_sync(model):  # no collective inside forward or backward: see the module docstring
            try:
                loss = self._micro_step(model, inputs, num_items_in_batch)
            except Exception as err:
                if not is_oom(err):
                    raise
                self.rank_oom = self.rank_oom or first_line(err)
                loss = None
        if loss is None:  # outside the except block, so its frames no longer hold the failed step's tensors
            free_cuda_memory()
            loss = torch.zeros((), device=self.args.device)
        if self.micro_steps_left <= 0:
            self._sync_ranks(model)
        return loss

    def _sync_ranks(self, model: Any) -> None:
        """End of a step's micro-batches on every rank: all raise together when any ran out of memory (the
        one OOM rule then shrinks every rank alike), else the gradients are averaged as DDP would have."""
        mine, self.rank_oom = self.rank_oom, ""
        rank = distributed.failing_rank(bool(mine))
        if rank is not None:
            raise torch.OutOfMemoryError(f"CUDA out of memory on rank {rank}" + (f": {mine}" if mine else ""))
        distributed.average_gradients(model.parameters())

    def _micro_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        traced = inputs.pop(TracingCollator.KEY, None)
        if traced is not None:
            self.step_sample_ids.extend(int(i) for i in traced.tolist())
        limit = oom_limit("train", self.state.global_step + 1)  # fault injection for tests; None in a real run
        micro_batch = self.recipe_micro_batch or self.args.per_device_train_batch_size
        if limit is not None and micro_batch > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test hook at micro-batch {micro_batch})")
        limit = oom_limit("kept", self.state.global_step + 1)  # fault injection for tests; None in a real run
        if limit is not None and memory_techniques.layers_keeping_activations(model) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test hook: layers keep their activations)")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.trace_path:
            self.step_loss += loss.item()
        return loss

    def write_trace(self) -> None:
        """Append what this optimizer step trained on (test hook, ``TUI_FINETUNE_TRACE``)."""
        if self.trace_path:
            record = {"step": self.state.global_step, "ids": self.step_sample_ids, "loss": float(self.step_loss).hex(),
                      "micro_batches": self.step_micro_batches}
            if self.args.world_size > 1:
                record["rank"] = self.args.process_index
            with open(self.trace_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """The eval loss through the lean path's chunked cross-entropy, on every backend: a model's own
        loss (Trainer's default here) builds the full-vocabulary logits, 1 GiB in fp32 for Gemma's 256k
        vocabulary at 1024 tokens, which is more than a 4 GB card has left after training."""
        inputs.pop(TracingCollator.KEY, None)
        if self.args.world_size <= 1:
            return self._predict(model, inputs, prediction_loss_only, ignore_keys)
        try:  # every rank learns of an OOM on any, at the same batch, before the losses are gathered
            out, failed = self._predict(model, inputs, prediction_loss_only, ignore_keys), ""
        except Exception as err:
            if not is_oom(err):
                raise
            out, failed = None, first_line(err)
        rank = distributed.failing_rank(bool(failed))
        if rank is not None:
            raise torch.OutOfMemoryError(f"CUDA out of memory in evaluation on rank {rank}"
                                         + (f": {failed}" if failed else ""))
        return out

    def _predict(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                 ignore_keys: list[str] | None) -> Any:
        limit = oom_limit("eval", self.state.global_step)  # fault injection for tests; None in a real run
        if limit is not None and self.args.per_device_eval_batch_size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test hook at eval batch "
                                         f"{self.args.per_device_eval_batch_size})")
        if not prediction_loss_only or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), regional_compile.eager():
            loss = memory_techniques.lean_causal_lm_loss(self._bare(model), inputs, self.memory)
        return loss.detach(), None, None

    def _bare(self, model: Any) -> Any:
        """The model without a DDP wrapper (torchrun wraps even one process): the lean loss reaches into its
        decoder and head, and with the gradients averaged by ``_sync_ranks`` DDP's forward has nothing to do."""
        return self.accelerator.unwrap_model(model)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Trainer's evaluate; a CUDA OOM halves the eval batch and tries again (training is untouched),
        and one at eval batch 1 turns evaluation off for the run with ``on_eval_skipped``: an eval loss is
        worth less than the adapter the training is making."""
        while not self.eval_skipped:
            try:
                return super().evaluate(*args, **kwargs)
            except Exception as err:
                if not is_oom(err):
                    raise
                free_cuda_memory()
                batch = self.args.per_device_eval_batch_size
                if batch <= 1:
                    self.eval_skipped = f"CUDA out of memory in evaluation at eval batch 1: {first_line(err)}"
                    if self.on_eval_skipped:
                        self.on_eval_skipped(self.eval_skipped)
                    break
                self.args.per_device_eval_batch_size = batch // 2
                if self.on_eval_shrink:
                    self.on_eval_shrink(batch, batch // 2)
        return {}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if return_outputs or "labels" not in inputs or self.backend.uses_model_loss(self.memory):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss = self.backend.loss(self._bare(model), inputs, self.memory, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.args.world_size > 1:
            # as Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and the gradients are
            # averaged over the ranks, so each rank's share is scaled back up (the logged loss is then the mean)
            loss = loss * self.accelerator.num_processes
        return loss


class TracingCollator:
    """Wraps the data layer's collator and adds the rows' ``sample_id``s to the batch, for the trace only
    (``TUI_FINETUNE_TRACE``); the trainer takes them out again before the forward pass."""

    KEY = "trace_sample_ids"

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        ids = [int(i) for f in features for i in (f["sample_ids"] if "sample_ids" in f else [f.get("sample_id", -1)])]
        batch[self.KEY] = torch.tensor(ids, dtype=torch.long)  # a bin (data/packing.py) has the ids of its rows
        return batch


def is_oom(err: BaseException) -> bool:
    """A CUDA out-of-memory, whether torch raised its own type or a RuntimeError with the message."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(err, oom_types) or "out of memory" in str(err).lower() and "cuda" in str(err).lower()


def free_cuda_memory() -> None:
    """Drop what the failed step held, so the smaller retry starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_trainer(model: Any, tokenizer: Any, args: TrainingArguments, train_dataset: Any, eval_dataset: Any,
                  collator: Any, callbacks: Sequence[TrainerCallback], memory: MemorySpec,
                  on_eval_shrink: Callable[[int, int], None] | None = None, backend: Any = None,
                  on_eval_skipped: Callable[[str], None] | None = None) -> LeanTrainer:
    if os.environ.get(TRACE_ENV):  # test hook: the trace of each step's rows
        collator = TracingCollator(collator)
    return LeanTrainer(model=model, args=args, train_dataset=train_dataset,
                       eval_dataset=eval_dataset if eval_dataset is not None and len(eval_dataset) else None,
                       data_collator=collator, processing_class=tokenizer, callbacks=list(callbacks), memory=memory,
                       backend=backend, on_eval_shrink=on_eval_shrink, on_eval_skipped=on_eval_skipped)
