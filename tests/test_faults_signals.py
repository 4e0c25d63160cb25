"""Signals, time-based saves, OOM recovery and changed configs, each on the real worker.

SIGINT (Ctrl+C), SIGTERM (a shutdown) and SIGHUP (a closed terminal) must each end in a checkpoint
and ``interrupted``. An injected CUDA OOM (the test hook raises torch.OutOfMemoryError, as the CUDA
allocator would) must halve the micro-batch, keep the effective batch, and finish on the same rows
as a run that never ran out of memory.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest

from engine_runs import cli, events_of, wait_for
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import fault_recipe, launch, read_trace, relaunch, wait_dead
from tui_finetune.core.events import CheckpointEvent, ErrorEvent, PhaseEvent, StepEvent, WarningEvent
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe
from tui_finetune.core.run_folder.checkpoints import check_checkpoint, list_checkpoints
from tui_finetune.core.run_folder.layout import step_of

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-signals")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


@pytest.fixture(scope="module")
def interrupted_runs(tiny, tmp_path_factory):
    """Three long runs with a save every 0.6 s of training, stopped by SIGINT, SIGTERM and SIGHUP."""
    model, data = tiny
    home = tmp_path_factory.mktemp("signals") / "home"
    recipe = fault_recipe(model, 400, checkpoint={"every_steps": 1000, "every_minutes": 0.01})
    runs = {sig: launch(recipe, data, home) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig, run_dir in runs.items():
        wait_for(run_dir, lambda e: isinstance(e, CheckpointEvent), timeout=120)  # a save on time, not steps
        os.kill(read_run_info(run_dir).pid, sig)
    for run_dir in runs.values():
        wait_dead(run_dir)
    return home, runs


def test_sigint_sigterm_and_sighup_each_save_a_checkpoint_and_end_interrupted(interrupted_runs):
    _, runs = interrupted_runs
    for sig, run_dir in runs.items():
        info = read_run_info(run_dir)
        assert info.state == "interrupted", f"{sig.name}: {(run_dir / 'worker.log').read_text()[-2000:]}"
        saves = [e.step for e in events_of(run_dir, CheckpointEvent)]
        last_step = events_of(run_dir, StepEvent)[-1].step
        assert len(saves) >= 2 and saves[0] % 1000 != 0, f"{sig.name}: a time-based save came first: {saves}"
        assert saves[-1] == last_step < 400, f"{sig.name}: the stop saved the step it stopped at"
        newest = list_checkpoints(run_dir / "checkpoints")[-1]
        assert step_of(newest) == last_step and check_checkpoint(newest).ok


def test_a_changed_config_is_refused_with_the_difference_and_accepted_with_force(interrupted_runs):
    home, runs = interrupted_runs
    run_dir = runs[signal.SIGINT]
    stopped = step_of(list_checkpoints(run_dir / "checkpoints")[-1])
    recipe_before = (run_dir / "recipe.toml").read_text()
    changes = ["--set", "train.learning_rate=0.001", "--set", f"train.max_steps={stopped + 2}"]
    out = cli("resume", run_dir.name, *changes, home=home)
    assert out.returncode == 2
    text = " ".join(out.stdout.split())
    assert "train.learning_rate: 0.002 -> 0.001" in text and f"train.max_steps: 400 -> {stopped + 2}" in text
    assert "--force" in text
    assert (run_dir / "recipe.toml").read_text() == recipe_before and read_run_info(run_dir).state == "interrupted"

    out = cli("resume", run_dir.name, *changes, "--force", home=home, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert read_run_info(run_dir).state == "completed"
    assert events_of(run_dir, StepEvent)[-1].step == stopped + 2
    assert any("resuming with changes (--force)" in e.message for e in events_of(run_dir, WarningEvent))

    edited = runs[signal.SIGTERM]  # edited by hand and resumed without the CLI (as the app does)
    (edited / "recipe.toml").write_text((edited / "recipe.toml").read_text().replace("r = 8", "r = 4"))
    relaunch(edited, home)
    assert wait_dead(edited) == "failed"
    error = events_of(edited, ErrorEvent)[-1]
    assert error.kind == "recipe" and "lora.r: 8 -> 4" in error.message and "--force" in error.message


def _oom_recipe(model, rows: bool = False, **checkpoint):
    """``rows``: plain rows, no length groups (whose OOM shrink regroups the rows: tests/test_engine_grouping.py)."""
    return fault_recipe(model, 8, train={"micro_batch": 4, "grad_accum": 2}, data={"group_by_length": not rows},
                        checkpoint={"every_steps": 2, **checkpoint})


def test_an_oom_at_step_1_and_at_a_later_step_halves_the_micro_batch_and_completes(tiny, tmp_path):
    """On plain rows (pinned): a step then trains on the very rows of the uninterrupted run."""
    model, data = tiny
    home = tmp_path / "home"
    traces = {name: tmp_path / f"{name}.jsonl" for name in ("plain", "oom1", "oom5")}
    plain = launch(_oom_recipe(model, rows=True), data, home, trace=traces["plain"])
    assert wait_dead(plain) == "completed"
    early = launch(_oom_recipe(model, rows=True), data, home, fault="oom:train:2@1,oom:eval:1", trace=traces["oom1"])
    assert wait_dead(early) == "completed", (early / "worker.log").read_text()[-2000:]
    late = launch(_oom_recipe(model, rows=True), data, home, fault="oom:train:2@5", trace=traces["oom5"])
    assert wait_dead(late) == "completed", (late / "worker.log").read_text()[-2000:]

    reference = read_trace(traces["plain"])
    # at step 1 the OOM strikes in the fit-check, the run's own first step on its longest batch
    for run_dir, name, resumed_from, where in ((early, "oom1", "the start", "fit-check"),
                                               (late, "oom5", "step-000004", "training")):
        info, train = read_run_info(run_dir), read_run_recipe(run_dir).train
        assert (train.micro_batch, train.grad_accum) == (2, 4), "micro-batch halved, accumulation doubled, in recipe.toml"
        assert len(info.oom_shrinks) == 1 and info.oom_shrinks[0]["micro_batch"] == [4, 2]
        assert info.oom_shrinks[0]["where"] == where
        warning = next(e for e in events_of(run_dir, WarningEvent) if "micro-batch 4 -> 2" in e.message)
        assert warning.message.startswith("CUDA out of memory" + (" in the fit-check" if where == "fit-check" else ":"))
        assert "effective batch 8 unchanged" in warning.message
        assert any(e.phase == "train" and e.message.endswith(f"from {resumed_from}") for e in events_of(run_dir, PhaseEvent))
        trace = read_trace(traces[name])
        assert sorted(trace) == list(range(1, 9))
        for step in trace:  # the same rows in every step, and the same loss up to float summation order
            assert trace[step]["ids"] == reference[step]["ids"], f"{name} step {step}"
            assert float.fromhex(trace[step]["loss"]) == pytest.approx(float.fromhex(reference[step]["loss"]), rel=1e-4)
    assert read_run_info(early).eval_batch == 1
    assert [e.message for e in events_of(early, WarningEvent) if "in evaluation" in e.message] == [
        "CUDA out of memory in evaluation: eval batch 2 -> 1 (training batch unchanged)"]


def test_a_run_killed_after_an_oom_shrink_resumes_at_the_batch_its_recipe_toml_holds(tiny, tmp_path):
    """The shrink is written to recipe.toml, so the next worker reads 2 x 4 there: with the injected OOM still
    armed above micro-batch 2 it never runs out of memory again, and the step-4 checkpoint (saved at 4 x 2)
    is accepted, as the effective batch is the same."""
    model, data = tiny
    home = tmp_path / "home"
    run_dir = launch(_oom_recipe(model), data, home, fault="oom:train:2@5,exit:step@6")
    wait_dead(run_dir)
    assert [s["micro_batch"] for s in read_run_info(run_dir).oom_shrinks] == [[4, 2]]
    train = read_run_recipe(run_dir).train
    assert (train.micro_batch, train.grad_accum) == (2, 4)
    out = cli("runs", home=home).stdout
    assert run_dir.name in out and "2x4" in out  # the listing shows the batch in effect
    relaunch(run_dir, home, fault="oom:train:2")
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-2000:]
    info = read_run_info(run_dir)
    assert info.resumed_from == "step-000004" and len(info.oom_shrinks) == 1  # no second OOM: it trained at 2
    fits = [e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "fit"]
    assert fits[-1].startswith("the longest batch fits (2 example(s)")


def test_oom_gives_up_at_micro_batch_1_and_after_three_shrinks_with_advice(tiny, tmp_path, monkeypatch):
    import torch

    from tui_finetune.core.events import EventLog
    from tui_finetune.engine.recipe_refit import OomGiveUp
    from tui_finetune.engine.training_loop import TrainingLoop

    model, data = tiny
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path))
    recipe = fault_recipe(model, 8, data={"seq_len": 512}, train={"micro_batch": 16, "grad_accum": 1})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    log = EventLog(run_dir / "events.jsonl")
    loop = TrainingLoop(run_dir, log, recipe, None, lambda: False, lambda err: None)
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    train = loop.shrink_after_oom(err, in_check=True).train  # the fit-check's shrinks don't count
    assert (train.micro_batch, train.grad_accum) == (8, 2)
    for _ in range(3):
        train = loop.shrink_after_oom(err).train
    assert (train.micro_batch, train.grad_accum) == (1, 16) and len(read_run_info(run_dir).oom_shrinks) == 4
    with pytest.raises(OomGiveUp, match="micro-batch 1") as at_one:
        loop.shrink_after_oom(err)
    assert "data.seq_len=256" in at_one.value.advice and "tui-finetune plan" in at_one.value.advice
    loop.recipe = replace(loop.recipe, train=replace(loop.recipe.train, micro_batch=4, grad_accum=4))
    with pytest.raises(OomGiveUp, match="after 3 halvings") as after_three:
        loop.shrink_after_oom(err)
    assert "data.seq_len=256" in after_three.value.advice
    log.close()


def test_an_odd_micro_batch_shrinks_to_a_divisor_so_the_effective_batch_really_stays(tiny, tmp_path):
    """3 x 8 used to become 1 x 16 while the warning said "unchanged"; now 3 x 8 -> 1 x 24."""
    import torch

    from tui_finetune.core.events import EventLog
    from tui_finetune.engine.training_loop import TrainingLoop

    model, data = tiny
    recipe = fault_recipe(model, 8, train={"micro_batch": 3, "grad_accum": 8})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    with EventLog(run_dir / "events.jsonl") as log:
        loop = TrainingLoop(run_dir, log, recipe, None, lambda: False, lambda err: None)
        err = torch.OutOfMemoryError("CUDA out of memory")
        shrunk = loop.shrink_after_oom(err).train
        assert (shrunk.micro_batch, shrunk.grad_accum) == (1, 24)
        assert read_run_recipe(run_dir).train == shrunk  # written where every reader looks
        loop.recipe = replace(recipe, train=replace(recipe.train, micro_batch=6, grad_accum=2))
        shrunk = loop.shrink_after_oom(err).train
        assert (shrunk.micro_batch, shrunk.grad_accum) == (3, 4)
    assert read_run_recipe(run_dir).train == shrunk
    info = read_run_info(run_dir)
    assert [s["micro_batch"] for s in info.oom_shrinks] == [[3, 1], [6, 3]]
    assert [s["grad_accum"] for s in info.oom_shrinks] == [[8, 24], [2, 4]]
    warnings = [e.message for e in events_of(run_dir, WarningEvent)]
    assert "effective batch 24 unchanged" in warnings[0] and "effective batch 12 unchanged" in warnings[1]
