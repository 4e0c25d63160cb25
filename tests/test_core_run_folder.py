"""Run folders: ids, the file layout, atomic run.json, listing, lookup and interrupted detection."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import pytest

from tui_finetune.core.events import EventLog, StepEvent
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.run_folder.control import request_stop
from tui_finetune.core.run_folder.info import RunError, create_run, make_run_id, read_run_info, update_run_info
from tui_finetune.core.run_folder.listing import find_run, list_runs, pid_alive, summarize_run


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_run_ids_read_and_sort_by_time():
    early = make_run_id("HuggingFaceTB/SmolLM2-135M", datetime(2026, 1, 2, 3, 4, 5))
    late = make_run_id("/models/My Model/", datetime(2026, 1, 2, 13, 0, 0))
    assert early == "20260102-030405-smollm2-135m"
    assert late == "20260102-130000-my-model"
    assert sorted([late, early]) == [early, late]


def test_create_run_lays_out_the_documented_files_under_home(home, tmp_path):
    recipe = RecipeSpec(model="phi-2")
    run_dir = create_run(recipe, tmp_path / "data.jsonl", now=datetime(2026, 5, 6, 7, 8, 9))
    assert run_dir.parent == home / "runs"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "events.jsonl", "recipe.toml", "run.json"]
    assert load_recipe(run_dir / "recipe.toml") == recipe
    info = read_run_info(run_dir)
    assert (info.run_id, info.state, info.model) == (run_dir.name, "running", "phi-2")
    again = create_run(recipe, tmp_path / "data.jsonl", now=datetime(2026, 5, 6, 7, 8, 9))
    assert again.name == run_dir.name + "-2"


def test_running_run_with_a_dead_pid_shows_as_interrupted(home, tmp_path):
    run_dir = create_run(RecipeSpec(model="phi-2"), tmp_path / "d.jsonl")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    update_run_info(run_dir, pid=dead.pid)
    assert summarize_run(run_dir).state == "interrupted"
    update_run_info(run_dir, pid=os.getpid())
    assert summarize_run(run_dir).state == "running"
    update_run_info(run_dir, state="completed", pid=dead.pid)
    assert summarize_run(run_dir).state == "completed"


def test_list_runs_shows_last_step_and_loss(home, tmp_path):
    first = create_run(RecipeSpec(model="phi-2"), tmp_path / "d.jsonl", now=datetime(2026, 1, 1))
    second = create_run(RecipeSpec(model="qwen2.5-0.5b"), tmp_path / "d.jsonl", now=datetime(2026, 1, 2))
    with EventLog(second / "events.jsonl") as log:
        log.emit(StepEvent(step=1, total_steps=10, epoch=0.1, loss=3.0))
        log.emit(StepEvent(step=2, total_steps=10, epoch=0.2, loss=2.5))
    listed = list_runs()
    assert [r.run_id for r in listed] == [first.name, second.name]
    assert (listed[1].step, listed[1].total_steps, listed[1].last_loss) == (2, 10, 2.5)
    assert listed[0].last_loss is None


def test_find_run_by_id_prefix_suffix_last_and_path(home, tmp_path):
    a = create_run(RecipeSpec(model="phi-2"), tmp_path / "d.jsonl", now=datetime(2026, 1, 1))
    b = create_run(RecipeSpec(model="qwen2.5-0.5b"), tmp_path / "d.jsonl", now=datetime(2026, 1, 2))
    assert find_run(a.name) == a
    assert find_run("last") == b
    assert find_run("qwen2.5-0.5b") == b
    assert find_run(str(a)) == a
    with pytest.raises(RunError, match="matches 2 runs"):
        find_run("2026")
    with pytest.raises(RunError, match="tui-finetune runs"):
        find_run("nope")


def test_request_stop_writes_stop_file_and_marks_stopping(home, tmp_path):
    run_dir = create_run(RecipeSpec(model="phi-2"), tmp_path / "d.jsonl")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        update_run_info(run_dir, pid=sleeper.pid)
        info = request_stop(run_dir)
        assert (run_dir / "STOP").exists()
        assert info.state == "stopping"
        assert sleeper.wait(timeout=10) != 0  # SIGINT reached it
    finally:
        sleeper.kill()


def test_a_finished_child_not_yet_reaped_is_not_alive():
    import time

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 20
    while pid_alive(child.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
