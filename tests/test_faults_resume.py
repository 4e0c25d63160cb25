"""Exact resume after real kills: the resumed run is bit-identical to one that was never interrupted.

The tiny Llama trains 32 steps (8 epochs of 4 steps) with a checkpoint every step. The reference
run goes through untouched; the others are killed and resumed, and every step's sample ids, every
step's exact loss (a hex float from the trace hook) and the final adapter weights must match it.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import pytest

from engine_runs import cli
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import (
    STEPS_PER_EPOCH, TRAIN_ROWS, assert_same_adapter, events_since, fault_recipe, launch, read_trace, relaunch,
    wait_dead)
from tui_finetune.core.events import StepEvent
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder.listing import shown_state
from tui_finetune.core.run_folder.layout import STAGING, step_of
from tui_finetune.core.run_folder.resume import find_resume_checkpoint

pytestmark = pytest.mark.faults
STEPS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-resume")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run: its trace and run folder."""
    model, data = tiny
    root = tmp_path_factory.mktemp("reference")
    trace = root / "trace.jsonl"
    run_dir = launch(fault_recipe(model, STEPS), data, root / "home", trace=trace)
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]
    records = read_trace(trace)
    assert sorted(records) == list(range(1, STEPS + 1))
    return run_dir, records


def _assert_same_lineage(trace, reference_records):
    records = read_trace(trace)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert records[step]["ids"] == reference_records[step]["ids"], f"step {step} trained on other rows"
        assert records[step]["loss"] == reference_records[step]["loss"], (
            f"step {step}: loss {float.fromhex(records[step]['loss'])} vs {float.fromhex(reference_records[step]['loss'])}")
    return records


def test_kill_9_at_20_random_steps_resumes_bit_identical_to_an_uninterrupted_run(tiny, reference, tmp_path):
    model, data = tiny
    ref_dir, ref_records = reference
    home, trace = tmp_path / "home", tmp_path / "trace.jsonl"
    rng = random.Random(20261126)
    targets = sorted(rng.sample(range(1, STEPS - 4), 20))
    run_dir = launch(fault_recipe(model, STEPS), data, home, trace=trace)
    offset, killed, resumed_at = 0, [], 0
    for target in targets:
        target = max(target, resumed_at + 1)  # the resumed run starts after its checkpoint
        deadline = time.time() + 90
        seen = None
        while seen is None:
            events, offset = events_since(run_dir, offset)
            seen = next((e for e in events if isinstance(e, StepEvent) and e.step >= target), None)
            assert time.time() < deadline and seen or read_run_info(run_dir).state == "running", (
                f"no step {target}: " + (run_dir / "worker.log").read_text()[-3000:])
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.12))  # land anywhere: in the eval, the save, the next step
        os.kill(read_run_info(run_dir).pid, signal.SIGKILL)
        assert wait_dead(run_dir) == "running", "a SIGKILL leaves no chance to write a state"
        assert shown_state(read_run_info(run_dir)) == "interrupted"
        newest = find_resume_checkpoint(run_dir / "checkpoints").path
        assert newest is not None and step_of(newest) >= seen.step - 1, "a kill loses at most one interval"
        resumed_at = step_of(newest)
        killed.append((seen.step, resumed_at))
        relaunch(run_dir, home, trace=trace)
        offset = (run_dir / "events.jsonl").stat().st_size
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]
    print(f"\nkilled after step / resumed from: {killed}")
    assert len(killed) == 20

    _assert_same_lineage(trace, ref_records)
    assert_same_adapter(run_dir, ref_dir)
    assert not any((run_dir / "checkpoints" / STAGING).iterdir()), "no half-written save left behind"
    row = next(line for line in cli("runs", home=home).stdout.splitlines() if run_dir.name in line)
    assert "completed" in row and f"{STEPS}/{STEPS}" in row


def test_resume_at_start_mid_epoch_epoch_boundary_and_last_step_sees_the_same_samples(tiny, reference, tmp_path):
    model, data = tiny
    ref_dir, ref_records = reference
    home, trace = tmp_path / "home", tmp_path / "trace.jsonl"
    boundary = 2 * STEPS_PER_EPOCH
    stops = [("exit:step@1", ""),                        # killed in step 1, before any checkpoint: start again
             ("exit:after-save@6", "step-000006"),       # mid-epoch (epoch 2, step 2 of 4)
             (f"exit:after-save@{boundary}", f"step-{boundary:06d}"),   # exactly on an epoch boundary
             (f"exit:after-save@{STEPS}", f"step-{STEPS:06d}")]         # after the last step, before the adapter
    run_dir = launch(fault_recipe(model, STEPS), data, home, fault=stops[0][0], trace=trace)
    resumed = []
    for (_, expected_checkpoint), (next_fault, _) in zip(stops, stops[1:] + [("", "")]):
        assert wait_dead(run_dir) == "running"
        chosen = find_resume_checkpoint(run_dir / "checkpoints").path
        assert (chosen.name if chosen else "") == expected_checkpoint
        relaunch(run_dir, home, fault=next_fault, trace=trace)
        deadline = time.time() + 60
        while read_run_info(run_dir).resumed_from != expected_checkpoint or read_run_info(run_dir).state != "running":
            assert time.time() < deadline
            time.sleep(0.05)
        resumed.append(read_run_info(run_dir).resumed_from)
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]
    assert resumed == ["", "step-000006", f"step-{boundary:06d}", f"step-{STEPS:06d}"]

    records = _assert_same_lineage(trace, ref_records)
    seen = Counter(i for r in records.values() for i in r["ids"])
    assert seen == Counter(i for r in ref_records.values() for i in r["ids"])
    for epoch in range(STEPS // STEPS_PER_EPOCH):  # every epoch sees every training row exactly once
        ids = [i for s in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1) for i in records[s]["ids"]]
        assert len(ids) == len(set(ids)) == TRAIN_ROWS, f"epoch {epoch + 1}: {sorted(ids)}"
    assert_same_adapter(run_dir, ref_dir)
