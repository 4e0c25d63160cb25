"""Packing in real runs (``data.packing = true``): the worker trains on bins of ``data.seq_len`` tokens, says so
in one event line, takes fewer passes a step than unpacked for about the same rows, and a kill and resume
continue with the very same bins, bit for bit; after an OOM halves the micro-batch, a step still takes the
same bins (engine/packed_training.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import datasets
import pytest

from engine_runs import events_of
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import assert_kill_resume_matches, reference_run, fault_recipe, launch, read_trace, wait_dead
from tui_finetune.core.events import EventLog, PhaseEvent
from tui_finetune.core.recipe import RecipeSpec, TrainSpec
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe
from tui_finetune.core.fit_levers import with_smaller_micro_batch
from tui_finetune.data.packing import PackedBins
from tui_finetune.data.prepare import PreparedData
from tui_finetune.engine.packed_training import pack_training_data, trainer_recipe

STEPS = 8
TRAIN_ROWS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


def packed_recipe(model, packing: bool = True):
    """Rows of about 47 tokens in bins of 128: about 2 rows a bin; 1 x 4 rows a step in the recipe. Unpacked is
    plain rows (no length groups), the baseline the bins are compared with."""
    return fault_recipe(model, STEPS, data={"seq_len": 128, "packing": packing, "group_by_length": False},
                        train={"micro_batch": 1, "grad_accum": 4}, eval={"every_steps": 1000})


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The packed run, uninterrupted: its folder and trace."""
    model, data = tiny
    return reference_run(packed_recipe(model), data, tmp_path_factory.mktemp("packed-reference"))


def test_a_packed_run_trains_on_bins_in_fewer_passes_and_says_so(tiny, reference, tmp_path):
    model, data = tiny
    run_dir, records = reference
    info = read_run_info(run_dir)
    packed = PackedBins.from_dict(info.packing)
    assert packed is not None and packed.rows == TRAIN_ROWS and packed.bins < TRAIN_ROWS
    accumulation = packed.accumulation(1)
    assert packed.effective_batch == 4 and accumulation < 4  # fewer passes for about 4 rows a step
    line = next(e.message for e in events_of(run_dir, PhaseEvent) if e.message.startswith("packing:"))
    assert line.startswith(f"packing: {TRAIN_ROWS} rows -> {packed.bins} bins of <= 128 tokens "
                           f"({packed.rows_per_bin:.1f} rows a bin, {packed.fill:.0%} full); accumulation 4 -> "
                           f"{accumulation}")
    train = next(e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "train")
    assert f"packed: micro-batch 1 bin(s) x accumulation {accumulation}" in train
    assert read_run_recipe(run_dir).train.grad_accum == 4  # the recipe keeps counting rows
    assert info.total_steps == STEPS and sorted(records) == list(range(1, STEPS + 1))
    assert all(r["micro_batches"] == accumulation for r in records.values())
    steps_per_epoch = packed.bins // accumulation
    for epoch in range(STEPS // steps_per_epoch):  # an epoch is still every row once
        ids = [i for s in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
               for i in records[s]["ids"]]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == TRAIN_ROWS, f"epoch {epoch + 1}: {sorted(ids)}"
    fit = next(e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "fit")
    assert "(1 example(s) in 1 x " in fit

    unpacked_dir = launch(packed_recipe(model, packing=False), data, tmp_path / "home", trace=tmp_path / "t.jsonl")
    assert wait_dead(unpacked_dir) == "completed", (unpacked_dir / "worker.log").read_text()[-3000:]
    unpacked = read_trace(tmp_path / "t.jsonl")
    assert all(r["micro_batches"] == 4 for r in unpacked.values()) and read_run_info(unpacked_dir).packing == {}
    passes = sum(r["micro_batches"] for r in records.values())
    assert passes < sum(r["micro_batches"] for r in unpacked.values())
    rows_a_step = sum(len(r["ids"]) for r in records.values()) / len(records)
    assert 3 <= rows_a_step <= 5  # about the recipe's 4 rows a step, in fewer passes


@pytest.mark.faults
def test_a_killed_packed_run_resumes_with_the_same_bins_bit_identical(tiny, reference, tmp_path):
    model, data = tiny
    assert_kill_resume_matches(packed_recipe(model), data, reference, tmp_path, STEPS)


def test_after_an_oom_shrink_a_step_still_takes_the_same_bins(tmp_path, monkeypatch):
    """Micro-batch 2 x 6 rows at 4 rows a bin: 2 x 2 = 4 bins a step (round(1.5) = 2). After the shrink to 1 x 12
    the formula would give 3 bins a step (round(12 / 4)); the recorded step size gives 1 x 4, so a resume
    skips exactly the bins trained. A changed effective batch (a forced resume) chooses again."""
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    recipe = RecipeSpec(model="phi-2", train=TrainSpec(micro_batch=2, grad_accum=6))
    recipe = replace(recipe, data=replace(recipe.data, seq_len=100, packing=True))
    run_dir = create_run(recipe, tmp_path / "d.jsonl")
    rows = datasets.Dataset.from_list([{"input_ids": [5] * 25, "labels": [5] * 25, "length": 25, "sample_id": i}
                                       for i in range(32)])
    data = PreparedData(train=rows, eval=None, data_hash="h", report=None, truncated=0, template=None)
    with EventLog(run_dir / "events.jsonl") as log:
        first = pack_training_data(run_dir, data, recipe, log)
        assert (first.packing.bins, first.packing.rows_per_bin, first.packing.bins_per_step) == (8, 4.0, 4)
        assert trainer_recipe(recipe, first.packing).train.grad_accum == 2
        shrunk = with_smaller_micro_batch(recipe)
        assert (shrunk.train.micro_batch, shrunk.train.grad_accum) == (1, 12)
        again = pack_training_data(run_dir, data, shrunk, log)
        assert again.packing.bins_per_step == 4 and trainer_recipe(shrunk, again.packing).train.grad_accum == 4
        assert len(again.train) == len(first.train) and again.train["sample_ids"] == first.train["sample_ids"]
        other = replace(shrunk, train=replace(shrunk.train, grad_accum=20))
        assert pack_training_data(run_dir, data, other, log).packing.bins_per_step == 5  # round(20 / 4)
    assert PackedBins.from_dict(read_run_info(run_dir).packing).bins_per_step == 5
    assert Counter(e.phase for e in events_of(run_dir, PhaseEvent))["tokenize"] == 3
