"""Sealed checkpoints: the marker vouches for every file, and resume falls back past broken ones."""

from __future__ import annotations

import json

from tui_finetune.core.run_folder.checkpoints import (
    check_checkpoint, clear_staging, finalize_checkpoint, list_checkpoints, rotate_checkpoints)
from tui_finetune.core.run_folder.layout import CHECKPOINT_MARKER, STAGING
from tui_finetune.core.run_folder.resume import find_resume_checkpoint


def _stage(checkpoints, step, payload=b"weights"):
    staged = checkpoints / STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(payload * 100)
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return staged


def test_finalize_renames_into_step_folder_with_marker_listing_file_hashes(tmp_path):
    final = finalize_checkpoint(_stage(tmp_path, 7), tmp_path, 7)
    assert final == tmp_path / "step-000007"
    assert not (tmp_path / STAGING / "checkpoint-7").exists()
    marker = json.loads((final / CHECKPOINT_MARKER).read_text())
    assert marker["step"] == 7
    assert sorted(marker["files"]) == ["adapter_model.safetensors", "trainer_state.json"]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in marker["files"].values())
    assert marker["files"]["adapter_model.safetensors"]["size"] == 700
    assert check_checkpoint(final).ok


def test_resume_takes_newest_valid_and_reports_the_broken_newer_ones(tmp_path):
    for step in (10, 20, 30, 40):
        finalize_checkpoint(_stage(tmp_path, step), tmp_path, step)
    (tmp_path / "step-000040" / "adapter_model.safetensors").write_bytes(b"flipped bits")
    (tmp_path / "step-000030" / CHECKPOINT_MARKER).unlink()
    (tmp_path / "step-000050").mkdir()  # a folder with no marker at all
    choice = find_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step-000020"
    reasons = {c.path.name: c.reason for c in choice.skipped}
    assert set(reasons) == {"step-000050", "step-000040", "step-000030"}
    assert "adapter_model.safetensors is 12 bytes" in reasons["step-000040"] and "marker" in reasons["step-000030"]


def test_missing_file_invalidates_and_no_valid_checkpoint_means_fresh_start(tmp_path):
    final = finalize_checkpoint(_stage(tmp_path, 5), tmp_path, 5)
    (final / "trainer_state.json").unlink()
    assert "missing" in check_checkpoint(final).reason
    assert find_resume_checkpoint(tmp_path).path is None


def test_rotation_keeps_the_newest_and_staging_is_cleared(tmp_path):
    for step in (1, 2, 3, 4):
        finalize_checkpoint(_stage(tmp_path, step), tmp_path, step)
    rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    _stage(tmp_path, 5)
    clear_staging(tmp_path)
    assert not any((tmp_path / STAGING).iterdir())
