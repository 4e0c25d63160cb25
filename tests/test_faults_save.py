"""Saves that die, rot or run out of disk: the resume never trusts a broken checkpoint.

A real worker is killed (``os._exit(137)`` from the fault hook) at each stage of a save, its
checkpoint files are truncated, zeroed and bit-flipped, and a save hits ENOSPC. Units cover rotation
(keep-last, best by eval loss, a held file on Windows) and the free-disk check.
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from engine_runs import cli, events_of
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import fault_recipe, launch, relaunch, wait_dead
from tui_finetune.core.events import ErrorEvent, WarningEvent
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder import checkpoints as ck
from tui_finetune.core.run_folder.layout import CHECKPOINT_MARKER, RUN_STATE, STAGING, step_dir_name, step_of
from tui_finetune.core.run_folder.resume import find_resume_checkpoint
from tui_finetune.engine.faults import parse_faults

pytestmark = pytest.mark.faults
FILES_IN_A_CHECKPOINT = 12
"""Trainer's 11 files (adapter + config, optimizer, scheduler, RNG, trainer state, args, tokenizer x3, README) + run_state.json."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-save")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


def _valid_step(run_dir):
    chosen = find_resume_checkpoint(run_dir / "checkpoints").path
    return step_of(chosen) if chosen else 0


def _staged(run_dir):
    staging = run_dir / "checkpoints" / STAGING
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def test_a_kill_at_each_stage_of_a_save_never_yields_a_broken_resume(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    stages = ["save-after-file:1", f"save-after-file:{FILES_IN_A_CHECKPOINT // 2}",
              f"save-after-file:{FILES_IN_A_CHECKPOINT}", "save-before-marker", "save-before-rename",
              "save-after-rename"]
    recipe = fault_recipe(model, 16, checkpoint={"keep_last": 3})
    run_dir = None
    valid = 0
    for stage in stages:
        killed_save = valid + 2  # the save after it succeeds once, so there is a good one to fall back to
        fault = f"exit:{stage}@{killed_save}"
        if run_dir is None:
            run_dir = launch(recipe, data, home, fault=fault)
        else:
            relaunch(run_dir, home, fault=fault)
        assert wait_dead(run_dir) == "running", f"{stage}: {(run_dir / 'worker.log').read_text()[-2000:]}"
        valid = _valid_step(run_dir)
        if stage == "save-after-rename":
            assert valid == killed_save, "once renamed, the checkpoint is complete and is taken"
            assert _staged(run_dir) == []
        else:
            assert valid == killed_save - 1, f"{stage}: resume must take the save before the broken one"
            assert not (run_dir / "checkpoints" / step_dir_name(killed_save)).exists()
            assert _staged(run_dir) == [f"checkpoint-{killed_save}"], "only this crash's leftover is there"
        if stage == f"save-after-file:{FILES_IN_A_CHECKPOINT}":
            assert "COMPLETE.json" not in {p.name for p in (run_dir / "checkpoints" / STAGING /
                                                              f"checkpoint-{killed_save}").iterdir()}
    relaunch(run_dir, home)
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-2000:]
    assert _staged(run_dir) == [], "no stray temporary folders after the next save"
    assert all(ck.check_checkpoint(p).ok for p in ck.list_checkpoints(run_dir / "checkpoints"))


def _corrupt(path, how):
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "zero":
        path.write_bytes(bytes(len(raw)))
    else:  # flip one bit in the middle: same size, so only the hash can tell
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0x01]) + raw[middle + 1:])


def test_corrupted_files_are_skipped_with_a_message_and_no_valid_checkpoint_exits_non_zero(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    run_dir = launch(fault_recipe(model, 8), data, home, fault="exit:after-save@3")
    assert wait_dead(run_dir) == "running"
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in ck.list_checkpoints(checkpoints)] == ["step-000002", "step-000003"]
    newest = checkpoints / "step-000003"
    names = sorted(p.name for p in newest.iterdir() if p.name != CHECKPOINT_MARKER)
    assert len(names) == FILES_IN_A_CHECKPOINT
    for name in names:  # every file, three kinds of damage, on a copy of the folder
        for how in ("truncate", "zero", "flip"):
            copy = tmp_path / "copies" / f"{name}-{how}"
            shutil.copytree(checkpoints, copy)
            _corrupt(copy / "step-000003" / name, how)
            choice = find_resume_checkpoint(copy)
            assert choice.path == copy / "step-000002", f"{name} {how}"
            [message] = choice.messages()
            assert message.startswith(f"step-000003 is incomplete ({name} ") and message.endswith(
                "; resuming from step-000002"), message
            shutil.rmtree(copy)

    _corrupt(newest / "optimizer.pt", "flip")
    out = cli("resume", run_dir.name, home=home, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    expected = "step-000003 is incomplete (optimizer.pt hash mismatch); resuming from step-000002"
    assert expected in out.stdout.replace("\n", " ") or expected in " ".join(out.stdout.split())
    assert any(e.message == expected for e in events_of(run_dir, WarningEvent))
    assert read_run_info(run_dir).resumed_from == "step-000002" and read_run_info(run_dir).state == "completed"

    broken = launch(fault_recipe(model, 8), data, home, fault="exit:after-save@2")
    assert wait_dead(broken) == "running"
    for path in ck.list_checkpoints(broken / "checkpoints"):
        _corrupt(path / "adapter_model.safetensors", "zero")
    out = cli("resume", broken.name, home=home, timeout=180)
    assert out.returncode == 1, out.stdout
    error = events_of(broken, ErrorEvent)[-1]
    assert error.kind == "checkpoint" and "no valid checkpoint" in error.message and "--from 0" in error.message
    out = cli("resume", broken.name, "--from", "0", home=home, timeout=180)
    assert out.returncode == 0 and read_run_info(broken).resumed_from == ""


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_how_much_is_needed(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    run_dir = launch(fault_recipe(model, 6), data, home, fault="enospc:save@3")
    assert wait_dead(run_dir) == "failed"
    error = events_of(run_dir, ErrorEvent)[-1]
    assert error.kind == "disk" and "filled up" in error.message
    assert "a checkpoint needs about" in error.message and " MB" in error.message
    assert "resume" in error.advice
    assert [p.name for p in ck.list_checkpoints(run_dir / "checkpoints")] == ["step-000001", "step-000002"]
    previous = run_dir / "checkpoints" / "step-000002"
    assert ck.check_checkpoint(previous).ok
    assert _staged(run_dir) == [], "the failed save's files are given back"
    relaunch(run_dir, home)
    assert wait_dead(run_dir) == "completed"
    assert read_run_info(run_dir).resumed_from == "step-000002"


# ---------------------------------------------------------------- units: rotation, disk, the hook's syntax

def _seal(root, step, eval_loss=None):
    staged = root / STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"w" * 64)
    (staged / RUN_STATE).write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    return ck.finalize_checkpoint(staged, root, step)


def test_rotation_keeps_the_last_k_and_the_best_by_eval_loss(tmp_path):
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.7)):
        _seal(tmp_path, step, loss)
    ck.rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000005"]


def test_rotation_never_deletes_the_only_valid_checkpoint(tmp_path):
    _seal(tmp_path, 1)
    newest = _seal(tmp_path, 2)
    (newest / "adapter_model.safetensors").write_bytes(b"rot")
    assert ck.rotate_checkpoints(tmp_path, keep_last=1) == []
    assert ck.check_checkpoint(tmp_path / "step-000001").ok


def test_a_held_file_makes_rotation_retry_then_warn_and_clean_up_next_time(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _seal(tmp_path, step)
    real_rmtree, calls, warnings = shutil.rmtree, [], []

    def held(path, *a, **k):  # what Windows raises while an antivirus scan holds a file
        calls.append(path)
        raise PermissionError(errno.EACCES, "The process cannot access the file", str(path))

    monkeypatch.setattr(ck.shutil, "rmtree", held)
    monkeypatch.setattr(ck.time, "sleep", lambda s: None)
    assert ck.rotate_checkpoints(tmp_path, keep_last=1, warn=warnings.append) == []
    assert len(calls) == 2 * ck.RMTREE_TRIES and len(warnings) == 2 and "next save" in warnings[0]
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    _seal(tmp_path, 4)
    ck.rotate_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-000004"]


def test_free_disk_check_says_how_much_is_needed(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=150_000_000))
    ck.check_free_disk(tmp_path, 70_000_000)
    with pytest.raises(ck.CheckpointError, match=r"160.0 MB needed \(2 x 80.0 MB a checkpoint\), 150.0 MB free"):
        ck.check_free_disk(tmp_path, 80_000_000)
    assert ck.estimate_checkpoint_bytes(10_000_000, "paged_adamw_8bit") < ck.estimate_checkpoint_bytes(10_000_000, "adamw_torch")


def test_fault_hook_syntax():
    [a, b] = parse_faults("exit:save-after-file:2@4, oom:train:1")
    assert (a.action, a.point, a.arg, a.step) == ("exit", "save-after-file", 2, 4)
    assert (b.action, b.point, b.arg, b.step) == ("oom", "train", 1, None)
    with pytest.raises(ValueError, match="ACTION:POINT"):
        parse_faults("exit")
