"""Real torchrun runs of the worker on the CPU: 2 processes talking gloo, the tiny Llama (issue 16).

Data-parallel training must be the same training: 2 ranks x micro-batch 2 see the very rows that 1
process x micro-batch 2 x accumulation 2 sees, and log the same losses. Only rank 0 writes the run
folder; a stop, an out-of-memory on one rank and a kill -9 of one rank are taken by both together, and
the run stays resumable.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict

import pytest

from engine_runs import cli, events_of, tiny_recipe, wait_for
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import launch, wait_dead
from tui_finetune.core.events import CheckpointEvent, EndEvent, PhaseEvent, StepEvent, WarningEvent
from tui_finetune.core.run_folder.checkpoints import check_checkpoint, list_checkpoints
from tui_finetune.core.run_folder.info import read_run_info, read_run_recipe
from tui_finetune.core.run_folder.listing import pid_alive, shown_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


def _recipe(model, devices: int, micro: int, accum: int, steps: int, rows: bool = False):
    """``rows``: plain rows, no length groups (data.group_by_length), where a test counts rows a rank."""
    return tiny_recipe(model, train={"micro_batch": micro, "grad_accum": accum, "max_steps": steps, "devices": devices},
                       checkpoint={"every_steps": 2, "every_minutes": 0.0, "keep_last": 2},
                       data={"group_by_length": not rows})


def _trace(path) -> dict[int, dict[int, dict]]:
    """step -> rank -> the trace record (the last one of a step retried after an OOM)."""
    import json

    out: dict[int, dict[int, dict]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out[record["step"]][record.get("rank", 0)] = record
    return out


def test_two_processes_train_the_same_rows_to_the_same_losses_as_one_with_the_same_effective_batch(tiny, tmp_path):
    model, data = tiny
    two_trace, one_trace = tmp_path / "two.jsonl", tmp_path / "one.jsonl"
    two = launch(_recipe(model, devices=2, micro=2, accum=1, steps=6, rows=True), data, tmp_path / "two", trace=two_trace)
    one = launch(_recipe(model, devices=1, micro=2, accum=2, steps=6, rows=True), data, tmp_path / "one", trace=one_trace)
    assert wait_dead(two) == "completed", (two / "worker.log").read_text()[-3000:]
    assert wait_dead(one) == "completed", (one / "worker.log").read_text()[-3000:]

    two_losses = [s.loss for s in events_of(two, StepEvent)]
    one_losses = [s.loss for s in events_of(one, StepEvent)]
    assert len(two_losses) == len(one_losses) == 6
    assert two_losses == pytest.approx(one_losses, rel=0.01)
    assert two_losses[-1] < two_losses[0]  # it learns

    # each rank trains different rows, and together they are the single process's step
    traced_two, traced_one = _trace(two_trace), _trace(one_trace)
    for step in range(1, 7):
        rank0, rank1 = traced_two[step][0]["ids"], traced_two[step][1]["ids"]
        assert len(rank0) == len(rank1) == 2 and not set(rank0) & set(rank1), f"step {step}: the ranks shared rows"
        assert sorted(rank0 + rank1) == sorted(traced_one[step][0]["ids"]), f"step {step}: other rows than 1 process"
        # the logged loss is the mean over the ranks of what each computed
        mean = sum(float.fromhex(traced_two[step][r]["loss"]) for r in (0, 1)) / 2
        assert two_losses[step - 1] == pytest.approx(mean, rel=1e-5)

    info = read_run_info(two)
    assert (info.world_size, read_run_recipe(two).effective_batch, info.device) == (2, 4, "CPU x 2")
    assert len(set(info.rank_pids)) == 2 and info.pid not in info.rank_pids  # run.json's pid is torchrun's
    assert read_run_recipe(one).effective_batch == 4
    train = next(e for e in events_of(two, PhaseEvent) if e.phase == "train")
    assert "4 sequences a step (micro-batch 2 x accumulation 1 x 2 processes)" in train.message
    # one author: every phase and the end once, as in a single-process run
    phases = [e.phase for e in events_of(two, PhaseEvent)]
    assert phases == ["download", "load", "tokenize", "sample", "fit", "train", "save", "sample", "done"]
    assert [e.state for e in events_of(two, EndEvent)] == ["completed"]
    for ckpt in list_checkpoints(two / "checkpoints"):
        assert check_checkpoint(ckpt).ok and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}


def test_an_out_of_memory_on_one_rank_shrinks_the_batch_on_both_and_the_run_completes(tiny, tmp_path):
    model, data = tiny
    run = launch(_recipe(model, devices=2, micro=2, accum=1, steps=6), data, tmp_path / "home",
                 fault="oom:train:1@3#1")  # rank 1 alone runs out of memory at micro-batch 2 from step 3 on
    assert wait_dead(run) == "completed", (run / "worker.log").read_text()[-3000:]
    info = read_run_info(run)
    [shrink] = info.oom_shrinks
    assert (shrink["micro_batch"], shrink["grad_accum"]) == ([2, 1], [1, 2]) and "rank 1" in shrink["error"]
    after = read_run_recipe(run)  # the batch in effect lives in recipe.toml, written by rank 0 alone
    assert (after.train.micro_batch, after.train.grad_accum, after.train.devices, after.effective_batch) == (1, 2, 2, 4)
    [warning] = [w for w in events_of(run, WarningEvent) if "out of memory" in w.message]
    assert "effective batch 4 unchanged" in warning.message
    assert [s.step for s in events_of(run, StepEvent)][-4:] == [3, 4, 5, 6]  # from the step-2 checkpoint on
    trains = [e.message for e in events_of(run, PhaseEvent) if e.phase == "train"]
    assert trains[-1].startswith("continuing with 4 sequences a step (micro-batch 1 x accumulation 2 x 2 processes)")


def test_a_stop_ends_both_ranks_at_the_same_step_with_a_checkpoint(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    run = launch(_recipe(model, devices=2, micro=2, accum=1, steps=400), data, home)
    wait_for(run, lambda e: isinstance(e, StepEvent) and e.step >= 3, timeout=120)
    out = cli("stop", run.name, home=home)
    assert out.returncode == 0, out.stdout + out.stderr
    info = read_run_info(run)
    assert info.state == "interrupted" and "resume" in info.message and not pid_alive(info.pid)
    assert not any(pid_alive(pid) for pid in info.rank_pids)
    stopped_at = events_of(run, CheckpointEvent)[-1].step
    assert check_checkpoint(list_checkpoints(run / "checkpoints")[-1]).ok
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{stopped_at:06d}"


def test_a_kill_9_of_rank_1_leaves_the_run_interrupted_and_resume_completes_from_its_checkpoint(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    run = launch(_recipe(model, devices=2, micro=2, accum=1, steps=10), data, home)
    wait_for(run, lambda e: isinstance(e, CheckpointEvent) and e.step >= 2, timeout=120)
    info = read_run_info(run)
    assert len(info.rank_pids) == 2
    os.kill(info.rank_pids[1], signal.SIGKILL)
    started = time.time()
    assert wait_dead(run, timeout=60) == "interrupted", (run / "worker.log").read_text()[-3000:]
    assert time.time() - started < 45, "torchrun ended rank 0 promptly"
    info = read_run_info(run)
    assert shown_state(info) == "interrupted" and "another process" in info.message and "resume" in info.message
    assert [e.state for e in events_of(run, EndEvent)] == ["interrupted"]
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert check_checkpoint(newest).ok

    out = cli("resume", run.name, home=home, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr + (run / "worker.log").read_text()[-3000:]
    step = int(newest.name.split("-")[1])
    assert f"resumes from the checkpoint at step {step}" in out.stdout and "run completed" in out.stdout
    info = read_run_info(run)
    assert (info.state, info.resumed_from) == ("completed", newest.name)
    train = [e.message for e in events_of(run, PhaseEvent) if e.phase == "train"][-1]
    assert train.endswith(f"resuming from {newest.name}")
    steps = [s.step for s in events_of(run, StepEvent)]
    resumed_at = len(steps) - 1 - steps[::-1].index(step + 1)
    assert steps[resumed_at:] == list(range(step + 1, 11))  # the resumed attempt goes on from the checkpoint


def test_a_bad_row_fails_a_two_process_run_with_the_data_advice_not_as_interrupted(tiny, tmp_path):
    """Both ranks meet the bad row; whichever dies first, torchrun ends the other, and the run must still
    say what to fix rather than offer a resume that would fail the same way."""
    from tui_finetune.core.events import ErrorEvent

    model, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ho"}\n{"instruction": \n', encoding="utf-8")
    run = launch(_recipe(model, devices=2, micro=2, accum=1, steps=4), bad, tmp_path / "home")
    assert wait_dead(run) == "failed", (run / "worker.log").read_text()[-3000:]
    [error] = events_of(run, ErrorEvent)
    assert error.kind == "data" and "bad.jsonl:2" in error.message


def test_packed_bins_are_shared_out_between_two_processes_as_one_process_takes_them(tiny, tmp_path):
    """With ``data.packing`` each rank takes its share of the bins: 2 ranks x 1 bin a step train the very bins
    1 process x 2 bins a step trains (about 2 rows a bin, 4 rows a step either way), to the same losses."""
    model, data = tiny
    packing = {"seq_len": 128, "eval_split": 0.2, "packing": True}
    two_trace, one_trace = tmp_path / "two.jsonl", tmp_path / "one.jsonl"
    two = launch(tiny_recipe(model, data=packing, train={"micro_batch": 1, "grad_accum": 2, "max_steps": 4,
                                                           "devices": 2}), data, tmp_path / "two", trace=two_trace)
    one = launch(tiny_recipe(model, data=packing, train={"micro_batch": 1, "grad_accum": 4, "max_steps": 4}),
                 data, tmp_path / "one", trace=one_trace)
    assert wait_dead(two) == "completed", (two / "worker.log").read_text()[-3000:]
    assert wait_dead(one) == "completed", (one / "worker.log").read_text()[-3000:]
    two_packing, one_packing = read_run_info(two).packing, read_run_info(one).packing
    assert two_packing["bins"] == one_packing["bins"] and two_packing["rows"] == one_packing["rows"] == 16
    assert (two_packing["bins_per_step"], one_packing["bins_per_step"]) == (1, 2)
    traced_two, traced_one = _trace(two_trace), _trace(one_trace)
    for step in range(1, 5):
        rank0, rank1 = traced_two[step][0]["ids"], traced_two[step][1]["ids"]
        assert rank0 and rank1 and not set(rank0) & set(rank1), f"step {step}: the ranks shared rows"
        assert sorted(rank0 + rank1) == sorted(traced_one[step][0]["ids"]), f"step {step}: other bins than 1 process"
    two_losses = [s.loss for s in events_of(two, StepEvent)]
    assert two_losses == pytest.approx([s.loss for s in events_of(one, StepEvent)], rel=0.01)
