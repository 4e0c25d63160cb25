"""The real worker process, started detached through the CLI and the launcher, on a tiny local model.

What a run leaves behind, how it is followed, stopped, resumed and killed, and how failures end:
always a final state in run.json and an event that says what to do.
"""

from __future__ import annotations

import os
import signal

import pytest

from engine_runs import cli, events_of, start, tiny_recipe, wait_for, wait_for_end
from engine_tiny import build_tiny_llama, write_alpaca
from tui_finetune.core.events import (
    CheckpointEvent, EndEvent, ErrorEvent, EvalEvent, PhaseEvent, SampleEvent, StepEvent)
from tui_finetune.core.recipe_io import recipe_to_toml
from tui_finetune.core.run_folder.info import read_run_info, read_run_recipe
from tui_finetune.core.run_folder.checkpoints import check_checkpoint, list_checkpoints

RUN_FILES = {"recipe.toml", "run.json", "events.jsonl", "worker.log", "checkpoints", "adapter"}
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=24)


def _recipe_file(tmp_path, recipe):
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_to_toml(recipe), encoding="utf-8")
    return path


def test_detached_run_completes_and_leaves_the_documented_run_folder(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    out = cli("train", str(_recipe_file(tmp_path, tiny_recipe(model))), "--data", str(data), "--detach",
              "--set", "train.max_steps=12", home=home)
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    run_dir = home / "runs" / run_id
    follow = cli("logs", "-f", run_id, home=home)
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert "run completed" in follow.stdout and "step 12/12" in follow.stdout

    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert ADAPTER_FILES <= {p.name for p in (run_dir / "adapter").iterdir()}
    info = read_run_info(run_dir)
    assert (info.state, info.total_steps, info.pid is not None) == ("completed", 12, True)
    assert len(info.data_hash) >= 16 and "torch" in info.versions and info.ended_at >= info.started_at
    # memory.backend = "auto" on a CPU: Unsloth and the compiled path are passed over, with its reason
    assert info.backend == "universal" and "pure PyTorch" in info.backend_reason
    assert [s.split(":")[0] for s in info.backend_skipped] == ["unsloth", "compiled"]
    assert all(len(s.split(": ", 1)[1]) > 5 for s in info.backend_skipped)
    assert info.autofit == [] and info.oom_shrinks == []  # auto-fit: CUDA only
    train = read_run_recipe(run_dir).train  # the batch in effect lives in recipe.toml: unchanged here
    assert (train.micro_batch, train.grad_accum) == (4, 2)
    phases = [e.phase for e in events_of(run_dir, PhaseEvent)]
    # the fit-check runs inside Trainer.train, before the first step; the adapter is saved before the
    # after-sample, and the final evaluation already ran at step 12 (every_steps divides 12)
    # the second tokenize is the line that says how the rows were grouped (data.group_by_length, the default)
    assert phases == ["download", "load", "tokenize", "tokenize", "sample", "fit", "train", "save", "sample", "done"]
    load = next(e for e in events_of(run_dir, PhaseEvent) if e.phase == "load")
    assert load.message.startswith("loading ") and "compil" not in load.message  # universal compiles nothing
    grouping = [e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "tokenize"][1]
    assert grouping.startswith("grouping: ") and "padded tokens" in grouping
    fit = next(e for e in events_of(run_dir, PhaseEvent) if e.phase == "fit")
    assert fit.message.startswith("the longest batch fits") and "GiB" not in fit.message  # CPU: no VRAM figures
    assert info.phase_peaks_gib == {} and info.failed_phases == {} and info.phase_running == ""
    steps = events_of(run_dir, StepEvent)
    assert [s.step for s in steps] == list(range(1, 13)) and all(s.total_steps == 12 for s in steps)
    assert all(s.lr is not None and s.grad_norm is not None and s.tokens_per_s for s in steps)
    assert steps[-1].eta_s == pytest.approx(0.0) and steps[0].vram_reserved_mb is None  # CPU: no VRAM figures
    assert events_of(run_dir, EvalEvent)[-1].eval_loss > 0
    assert [s.label for s in events_of(run_dir, SampleEvent)] == ["before", "after"]
    assert events_of(run_dir, EndEvent)[-1].state == "completed"
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        assert check_checkpoint(ckpt).ok

    table = cli("runs", home=home)
    row = next(line for line in table.stdout.splitlines() if run_id in line)
    assert "completed" in row and "12/12" in row and f"{steps[-1].loss:.4f}" in row


def test_stop_checkpoints_and_resume_continues_even_after_a_kill(tiny, tmp_path):
    model, shared_data = tiny
    data = tmp_path / "data.jsonl"
    data.write_bytes(shared_data.read_bytes())
    home = tmp_path / "home"
    run_dir = start(tiny_recipe(model, train={"max_steps": 100}), data, home)
    wait_for(run_dir, lambda e: isinstance(e, StepEvent) and e.step >= 2)
    stop = cli("stop", run_dir.name, home=home)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    info = read_run_info(run_dir)
    assert info.state == "interrupted" and "resume" in info.message
    [ckpt] = list_checkpoints(run_dir / "checkpoints")
    assert check_checkpoint(ckpt).ok
    stopped_at = int(ckpt.name.split("-")[1])
    assert 2 <= stopped_at < 100
    assert events_of(run_dir, CheckpointEvent)[-1].step == stopped_at

    assert cli("resume", run_dir.name, "--detach", home=home).returncode == 0
    resumed = wait_for(run_dir, lambda e: isinstance(e, StepEvent) and e.step > stopped_at)
    assert resumed.step == stopped_at + 1, "resume continues at the next step, not from zero"
    os.kill(read_run_info(run_dir).pid, signal.SIGKILL)  # a crash: no chance to write a state
    wait_for_end(run_dir)
    row = next(line for line in cli("runs", home=home).stdout.splitlines() if run_dir.name in line)
    assert "interrupted" in row

    original = data.read_bytes()
    data.write_bytes(original + b'{"instruction": "What is 1 + 1?", "input": "", "output": "1 + 1 = 2"}\n')
    assert cli("resume", run_dir.name, "--detach", home=home).returncode == 0
    assert wait_for_end(run_dir) == "failed", "resuming on different data must be refused"
    assert "changed since this run started" in events_of(run_dir, ErrorEvent)[-1].message

    data.write_bytes(original)
    assert cli("resume", run_dir.name, "--detach", home=home).returncode == 0
    assert wait_for_end(run_dir) == "completed"
    assert read_run_info(run_dir).resumed_from == ckpt.name
    assert events_of(run_dir, StepEvent)[-1].step == 100


def test_bad_data_and_an_unreachable_hub_model_fail_with_advice(tiny, tmp_path):
    model, data = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ho"}\n{"instruction": \n', encoding="utf-8")
    bad_run = start(tiny_recipe(model), bad, tmp_path / "home")
    hub_run = start(tiny_recipe("someone/some-model"), data, tmp_path / "home2")
    assert wait_for_end(bad_run) == "failed"
    error = events_of(bad_run, ErrorEvent)[-1]
    assert error.kind == "data" and "bad.jsonl:2" in error.message
    assert wait_for_end(hub_run) == "failed"
    error = events_of(hub_run, ErrorEvent)[-1]
    assert error.kind in ("offline", "not_found") and "local model folder" in error.advice
    assert read_run_info(hub_run).message == error.message


def test_oom_advice_names_the_knobs_from_the_recipe():
    from tui_finetune.core.advice import memory_advice

    recipe = tiny_recipe("m", data={"seq_len": 2048}, train={"micro_batch": 4, "grad_accum": 2})
    advice = memory_advice(recipe)
    assert "data.seq_len=1024" in advice
    assert "train.micro_batch=1" in advice and "train.grad_accum=8" in advice  # the effective batch stays
    assert "method=qlora" in advice


def test_cuda_out_of_memory_is_recognised_as_oom():
    import torch

    from tui_finetune.engine.worker import _is_oom

    assert _is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_oom(RuntimeError("CUDA error: out of memory"))
    assert not _is_oom(RuntimeError("expected scalar type Float but found Half"))


def test_sigterm_sets_the_stop_flag(tmp_path):
    from tui_finetune.engine.stop_signal import StopSignal

    stop = StopSignal(tmp_path)
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop.install()
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.signals == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    fresh = StopSignal(tmp_path)
    (tmp_path / "STOP").touch()
    assert fresh()


def test_ctrl_c_on_a_followed_train_stops_the_run_with_a_checkpoint(tiny, tmp_path):
    import subprocess
    import sys
    import time

    from engine_runs import REPO

    model, data = tiny
    home = tmp_path / "home"
    env = {**os.environ, "TUI_FINETUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    follower = subprocess.Popen([sys.executable, "-m", "tui_finetune.cli", "train",
                                 str(_recipe_file(tmp_path, tiny_recipe(model, train={"max_steps": 400}))),
                                 "--data", str(data)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=str(REPO))
    deadline = time.time() + 60
    while not list((home / "runs").glob("*/events.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    [run_dir] = list((home / "runs").iterdir())
    wait_for(run_dir, lambda e: isinstance(e, StepEvent) and e.step >= 2)
    follower.send_signal(signal.SIGINT)  # what Ctrl+C in the terminal does to the CLI
    out, _ = follower.communicate(timeout=60)
    assert follower.returncode == 130, out
    assert "stopping" in out and "run interrupted" in out
    assert read_run_info(run_dir).state == "interrupted"
    assert check_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1]).ok
