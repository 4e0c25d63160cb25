"""The effective batch has one home, the run's recipe.toml: an OOM's shrink is written there, run.json keeps
only the history, and every reader (``runs``, the monitor, resume) reads the batch in effect from it.

Torch-free: the shrink rule (engine/recipe_refit.py) needs no torch, and neither do its readers.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from tui_finetune.cli import main
from tui_finetune.core.events import EventLog
from tui_finetune.core.recipe import RecipeSpec, TrainSpec
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.run_folder.checkpoints import finalize_checkpoint, write_json_atomic
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe, update_run_info
from tui_finetune.core.run_folder.layout import RUN_STATE, STAGING
from tui_finetune.core.run_folder.listing import summarize_run
from tui_finetune.core.run_folder.resume import checkpoint_state, resume_differences
from tui_finetune.engine.recipe_refit import OomGiveUp, shrink_micro_batch
from tui_finetune.ui.run_tail import RunTail


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run of 3 x 8 (an odd micro-batch) under a private home, its worker gone."""
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    run = create_run(RecipeSpec(model="phi-2", train=TrainSpec(micro_batch=3, grad_accum=8)), tmp_path / "d.jsonl")
    update_run_info(run, state="interrupted", pid=None)
    return run


def _shrink(run_dir, in_check=False):
    with EventLog(run_dir / "events.jsonl") as log:
        return shrink_micro_batch(run_dir, read_run_recipe(run_dir), log, "CUDA out of memory", in_check)


def _seal(run_dir, recipe, step):
    """A checkpoint as the worker seals it, saved while ``recipe`` was in effect."""
    checkpoints = run_dir / "checkpoints"
    staged = checkpoints / STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"w" * 64)
    write_json_atomic(staged / RUN_STATE, checkpoint_state(recipe, "", step, None))
    return finalize_checkpoint(staged, checkpoints, step)


def test_an_odd_size_shrink_is_written_to_recipe_toml_and_run_json_keeps_only_the_history(run_dir):
    shrunk = _shrink(run_dir)
    assert (shrunk.train.micro_batch, shrunk.train.grad_accum) == (1, 24)  # 3 x 8 = 1 x 24, not 1 x 16
    stored = load_recipe(run_dir / "recipe.toml").train
    assert (stored.micro_batch, stored.grad_accum) == (1, 24)
    raw = json.loads((run_dir / "run.json").read_text())
    assert "micro_batch" not in raw and "grad_accum" not in raw  # no second copy of the value in effect
    [history] = raw["oom_shrinks"]
    assert (history["micro_batch"], history["grad_accum"], history["where"]) == ([3, 1], [8, 24], "training")
    with pytest.raises(OomGiveUp, match="micro-batch 1"):
        _shrink(run_dir)
    assert load_recipe(run_dir / "recipe.toml").train == stored  # giving up changes nothing


def test_the_runs_listing_shows_the_batch_in_effect(run_dir, capsys):
    assert (summarize_run(run_dir).micro_batch, summarize_run(run_dir).grad_accum) == (3, 8)
    _shrink(run_dir, in_check=True)
    summary = summarize_run(run_dir)
    assert (summary.micro_batch, summary.grad_accum) == (1, 24)
    assert main(["runs"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if run_dir.name[:12] in line)
    assert re.search(r"\b1x24\b", row), row


def test_the_monitor_follows_recipe_toml_when_a_shrink_rewrites_it(run_dir):
    tail = RunTail(run_dir)
    first = tail.poll()
    assert (first.micro_batch, first.grad_accum) == (3, 8)
    _shrink(run_dir)
    after = tail.poll()
    assert after is not None and (after.micro_batch, after.grad_accum) == (1, 24)


def test_resume_compares_the_effective_batch_from_recipe_toml_not_its_split(run_dir, capsys):
    before = _seal(run_dir, read_run_recipe(run_dir), 2)  # saved at 3 x 8
    _shrink(run_dir)  # then an OOM: 1 x 24 in recipe.toml
    after = _seal(run_dir, read_run_recipe(run_dir), 4)
    now = read_run_recipe(run_dir)
    assert resume_differences(after, now) == []
    assert resume_differences(before, now) == []  # same 24 rows a step: the same training
    halved = replace(now, train=replace(now.train, grad_accum=12))
    [diff] = resume_differences(after, halved)
    assert diff == "effective batch (train.micro_batch x train.grad_accum): 1 x 24 = 24 -> 1 x 12 = 12"
    # the CLI's resume reads recipe.toml too, and refuses the changed effective batch before starting anything
    assert main(["resume", run_dir.name, "--set", "train.grad_accum=12"]) == 2
    out = capsys.readouterr().out
    assert "effective batch" in out and "--force" in out
    assert read_run_info(run_dir).pid is None  # no worker was started


@pytest.mark.parametrize("batching, refused", [("length groups", True), ("packed bins", True), ("padded rows", False)])
def test_on_groups_or_bins_only_a_split_the_shrink_rule_reaches_keeps_the_run(run_dir, capsys, batching, refused):
    """A group holds micro_batch x the longest row's tokens, and a step of bins must divide into micro-batches:
    4 x 6 -> 3 x 8 or growing back to 6 x 4 is another run there, refused without --force. Halving to a
    divisor (4 -> 2 -> 1) is what OOM recovery does and what its advice after giving up asks for: accepted.
    On padded rows only the effective batch counts."""
    base = read_run_recipe(run_dir)
    data = base.data.batched_as(batching)
    saved = _seal(run_dir, replace(base, data=data, train=replace(base.train, micro_batch=4, grad_accum=6)), 2)
    split = lambda micro, accum: replace(base, data=data, train=replace(base.train, micro_batch=micro,  # noqa: E731
                                                                           grad_accum=accum))
    for micro, accum in ((2, 12), (1, 24)):
        assert resume_differences(saved, split(micro, accum)) == []
    for micro, accum in ((3, 8), (6, 4), (8, 3)):
        diffs = resume_differences(saved, split(micro, accum))
        if not refused:
            assert diffs == []
            continue
        assert diffs == [f"train.micro_batch: 4 -> {micro} (on {batching} "
                         + ("a group holds micro_batch x the longest row's tokens: other groups, so other rows every step"
                            if batching == "length groups" else "a step's bins must divide into micro-batches of it")
                         + "; only halving it to a divisor, as OOM recovery does, keeps the same run)"]
    if refused:  # the CLI's resume refuses it before starting anything
        from tui_finetune.core.run_folder.info import write_run_recipe

        write_run_recipe(run_dir, split(4, 6))
        assert main(["resume", run_dir.name, "--from", "2", "--set", "train.micro_batch=3", "--set",
                     "train.grad_accum=8"]) == 2
        out = capsys.readouterr().out
        assert "train.micro_batch: 4 -> 3" in out and "--force" in out
        assert read_run_info(run_dir).pid is None  # no worker was started


def test_with_several_processes_every_reader_multiplies_by_train_devices_from_recipe_toml(run_dir, capsys):
    """The world size is in recipe.toml too (``train.devices``, settled at launch): ``runs``, the monitor and
    the OOM warning all show micro-batch x accumulation x devices, the one product of RecipeSpec."""
    recipe = read_run_recipe(run_dir)
    two = replace(recipe, train=replace(recipe.train, devices=2))
    (run_dir / "recipe.toml").unlink()
    from tui_finetune.core.run_folder.info import write_run_recipe

    write_run_recipe(run_dir, two)
    update_run_info(run_dir, world_size=2)
    assert summarize_run(run_dir).effective_batch == two.effective_batch == 3 * 8 * 2
    snap = RunTail(run_dir).poll()
    assert (snap.devices, snap.effective_batch) == (2, 48)
    _shrink(run_dir)
    assert read_run_recipe(run_dir).effective_batch == 48
    warning = (run_dir / "events.jsonl").read_text()
    assert "effective batch 48 unchanged" in warning
    assert main(["runs"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if run_dir.name[:12] in line)
    assert "1x24x2=48" in row, row
    assert "effective_batch" not in json.loads((run_dir / "run.json").read_text())  # no second copy
