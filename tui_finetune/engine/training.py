"""Build the Trainer for a recipe: TrainingArguments from the recipe's fields, our callbacks attached.

Trainer owns the loop (DESIGN.md): gradient accumulation, mixed precision, optimizers by name
(``paged_adamw_8bit``), schedulers with warmup, evaluation, and data skipping on resume. This module
only translates the recipe, once, in one place.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tui_finetune.core.recipe import MemorySpec, RecipeSpec
from tui_finetune.engine.checkpoints import STAGING
from tui_finetune.engine.loading import DeviceFacts, compute_dtype


def plan_total_steps(recipe: RecipeSpec, train_rows: int) -> int:
    """Optimizer steps the run will take, computed the way Trainer does (partial last accumulation counts)."""
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    batches = math.ceil(train_rows / recipe.train.micro_batch)
    per_epoch = max(math.ceil(batches / recipe.train.grad_accum), 1)
    return max(math.ceil(recipe.train.epochs * per_epoch), 1)


def build_training_args(recipe: RecipeSpec, run_dir: Path, device: DeviceFacts, total_steps: int,
                        has_eval: bool) -> TrainingArguments:
    train, ckpt = recipe.train, recipe.checkpoint
    dtype = compute_dtype(recipe, device)
    mixed = device.has_cuda and dtype != torch.float32
    every = ckpt.every_steps
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints" / STAGING),
        per_device_train_batch_size=train.micro_batch,
        per_device_eval_batch_size=train.micro_batch,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps if train.max_steps > 0 else -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        warmup_steps=math.ceil(train.warmup_ratio * total_steps),
        optim=train.optimizer if device.has_cuda else "adamw_torch",
        bf16=bool(mixed and dtype == torch.bfloat16),
        fp16=bool(mixed and dtype == torch.float16),
        use_cpu=not device.has_cuda,
        # checkpointing is switched on by engine/lean.py when the model is prepared (non-reentrant)
        gradient_checkpointing=False,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=every if has_eval else None,
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
    )
    return TrainingArguments(**kwargs)


class LeanTrainer(Trainer):
    """Trainer whose loss is the chunked cross-entropy of engine/lean.py (no full fp32 logits).

    ``compute_loss`` is Trainer's documented override point; everything else is Trainer's own.
    The loss is normalised by ``num_items_in_batch`` exactly like transformers' ForCausalLMLoss,
    so gradient accumulation stays correct.
    """

    def __init__(self, *args: Any, memory: MemorySpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memory = memory

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if return_outputs or not self.memory.chunked_loss or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from tui_finetune.engine import lean

        offload = getattr(lean, "activation_offload", None)
        with offload(self.memory) if offload else nullcontext():
            return lean.lean_causal_lm_loss(model, inputs, self.memory, num_items_in_batch)


def build_trainer(model: Any, tokenizer: Any, args: TrainingArguments, train_dataset: Any, eval_dataset: Any,
                  collator: Any, callbacks: Sequence[TrainerCallback], memory: MemorySpec) -> Trainer:
    return LeanTrainer(model=model, args=args, train_dataset=train_dataset,
                       eval_dataset=eval_dataset if eval_dataset is not None and len(eval_dataset) else None,
                       data_collator=collator, processing_class=tokenizer, callbacks=list(callbacks), memory=memory)
