"""The engine trains like a plain transformers + peft loop: same seed and data, losses within 1% for 20 steps.

Eight training rows and micro_batch 4 x grad_accum 2 make every optimizer step see all rows, so the
token-mean loss of a step doesn't depend on Trainer's shuffling; everything else (LoRA init, AdamW,
cosine schedule with warmup, clipping at 1.0) must match for the curves to agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine_runs import events_of, start, tiny_recipe, wait_for_end
from engine_tiny import build_tiny_llama, write_alpaca
from tui_finetune.core.events import StepEvent

STEPS = 20


def plain_loop_losses(model_dir, data_path, recipe) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler, set_seed

    from tui_finetune.data.prepare import prepare_datasets

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = prepare_datasets(data_path, tokenizer, recipe.data, recipe.train.seed).train
    assert len(train) == 8
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    set_seed(recipe.train.seed)
    model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    width = max(len(r) for r in train["input_ids"])
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in train["input_ids"]])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in train["labels"]])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in train["input_ids"]])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(recipe.train.scheduler, optimizer,
                              num_warmup_steps=math.ceil(recipe.train.warmup_ratio * STEPS), num_training_steps=STEPS)
    losses = []
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_engine_losses_match_plain_transformers_peft_loop_within_1_percent(tmp_path):
    model_dir = build_tiny_llama(tmp_path / "model")
    data = write_alpaca(tmp_path / "data.jsonl", rows=10)  # eval_split 0.2 leaves 8 to train on
    recipe = tiny_recipe(model_dir, train={"max_steps": STEPS, "learning_rate": 1e-2})
    run_dir = start(recipe, data, tmp_path / "home")
    assert wait_for_end(run_dir) == "completed"  # one at a time: two torch processes on 2 cores crawl
    expected = plain_loop_losses(model_dir, data, recipe)
    steps = events_of(run_dir, StepEvent)
    got = [e.loss for e in steps]
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    assert expected[-1] < expected[0] * 0.9, "the reference loop should learn something"
    for step, (a, b) in enumerate(zip(got, expected), 1):
        assert a == pytest.approx(b, rel=0.01), f"step {step}: engine {got} vs plain loop {expected}"
