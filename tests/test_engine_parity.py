"""The engine trains like a plain transformers + peft loop: same seed and data, losses within 1% for 20 steps.

Eight training rows and micro_batch 4 x grad_accum 2 make every optimizer step see all rows, so the
token-mean loss of a step doesn't depend on Trainer's shuffling; everything else (LoRA init, AdamW,
cosine schedule with warmup, clipping at 1.0) must match for the curves to agree.
"""

from __future__ import annotations

import pytest

from engine_runs import events_of, plain_loop_losses, start, tiny_recipe, wait_for_end
from engine_tiny import build_tiny_llama, write_alpaca
from tui_finetune.core.events import StepEvent

STEPS = 20


def test_engine_losses_match_plain_transformers_peft_loop_within_1_percent(tmp_path):
    model_dir = build_tiny_llama(tmp_path / "model")
    data = write_alpaca(tmp_path / "data.jsonl", rows=10)  # eval_split 0.2 leaves 8 to train on
    recipe = tiny_recipe(model_dir, train={"max_steps": STEPS, "learning_rate": 1e-2})
    run_dir = start(recipe, data, tmp_path / "home")
    assert wait_for_end(run_dir) == "completed"  # one at a time: two torch processes on 2 cores crawl
    expected = plain_loop_losses(model_dir, data, recipe, STEPS)
    steps = events_of(run_dir, StepEvent)
    got = [e.loss for e in steps]
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    assert expected[-1] < expected[0] * 0.9, "the reference loop should learn something"
    for step, (a, b) in enumerate(zip(got, expected), 1):
        assert a == pytest.approx(b, rel=0.01), f"step {step}: engine {got} vs plain loop {expected}"
