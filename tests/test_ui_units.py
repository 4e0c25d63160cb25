"""The UI's textual-free parts and its import hygiene: the run tail, messages, planning, preferences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tui_finetune.core.events import EventLog, StepEvent
from tui_finetune.core.preferences import Preferences, load_preferences, preferences_path, save_preferences
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.suggest import WONT_FIT, CardSpec, plan_recipe
from tui_finetune.ui.messages import RunUpdated
from tui_finetune.ui.run_tail import MAX_POINTS, RunTail
from ui_support import REPO, ui_home, write_run  # noqa: F401 - ui_home is a fixture


def test_ui_imports_without_torch_transformers_or_engine():
    code = ("import sys, tui_finetune.ui.app, tui_finetune.ui.screens.monitor, tui_finetune.ui.screens.recipe, "
            "tui_finetune.core.run_folder.control, tui_finetune.core.preferences\n"
            "bad = [m for m in ('torch', 'transformers', 'tokenizers', 'datasets', 'tui_finetune.engine', "
            "'tui_finetune.data') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_each_test_run_has_a_ui_home_of_its_own(ui_home, tmp_path_factory):
    """Two pytest processes at once (two worktrees, CI beside a developer) must not share preferences: the home
    lies under this process's own temporary folder, and this test's alone."""
    assert ui_home.is_relative_to(tmp_path_factory.getbasetemp())
    save_preferences(Preferences(last_data_dir="mine"))
    assert preferences_path().is_relative_to(ui_home) and load_preferences().last_data_dir == "mine"


def test_tail_replays_history_then_reads_only_what_was_appended(ui_home):
    run_dir = write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    tail = RunTail(run_dir)
    first = tail.poll()
    assert first.step == 60 and len(first.train_points) == 60 and len(first.eval_points) == 3
    assert first.checkpoint_step == 60 and first.state == "completed"
    assert tail.poll() is None  # nothing new
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(StepEvent(step=61, total_steps=61, epoch=1.0, loss=0.5))
    again = tail.poll()
    assert again.step == 61 and again.train_points[-1] == (61, 0.5) and again.events_read == first.events_read + 1


def test_tail_keeps_a_bounded_series_under_a_flood(ui_home):
    run_dir = write_run(runs_dir(), 1, "running", steps=0)
    with EventLog(run_dir / "events.jsonl") as log:
        for step in range(1, 10_001):
            log.emit(StepEvent(step=step, total_steps=10_000, epoch=step / 10_000, loss=1.0 / step))
    snap = RunTail(run_dir).poll()
    assert snap.step == 10_000 and len(snap.train_points) <= MAX_POINTS
    assert snap.train_points[0][0] == 1


def test_a_newer_run_update_replaces_a_queued_one_of_the_same_run(ui_home):
    run_dir = write_run(runs_dir(), 1, "running", steps=2)
    snap = RunTail(run_dir).poll()
    assert RunUpdated(run_dir, snap).can_replace(RunUpdated(run_dir, snap))
    assert not RunUpdated(run_dir, snap).can_replace(RunUpdated(Path("other"), snap))


def test_advice_names_only_changes_the_planner_says_fit():
    card = CardSpec(total_gib=8.0)
    recipe = RecipeSpec(model="llama-3.1-8b", method="qlora")
    recipe.data.seq_len = 16384
    plan = plan_recipe(recipe, card)
    assert plan.fit == WONT_FIT and plan.headroom_gib < 0
    advice = plan.advice(settings=False)
    assert advice.startswith("To fit") and "--set" not in advice and "--set data.seq_len=" in plan.advice()
    seq = int(advice.split("sequence length ")[1].split(";")[0].rstrip("."))
    recipe.data.seq_len = seq
    assert plan_recipe(recipe, card).fit != WONT_FIT


def test_preferences_round_trip_and_survive_a_broken_file(ui_home):
    assert load_preferences() == Preferences()
    save_preferences(Preferences(theme="textual-light", last_data_dir="/data"))
    assert load_preferences() == Preferences(theme="textual-light", last_data_dir="/data")
    preferences_path().write_text("{not json")
    assert load_preferences() == Preferences()
    preferences_path().write_text(json.dumps({"theme": "neon", "last_data_dir": 3}))
    assert load_preferences() == Preferences()


def test_check_json_prints_one_object_with_file_line_problems():
    out = subprocess.run([sys.executable, "-m", "tui_finetune.data.check_json", "tests/data/broken/malformed_json.jsonl",
                          "--seq", "256"], capture_output=True, text=True, cwd=REPO)
    result = json.loads(out.stdout)
    assert out.returncode == 1 and result["refused"]
    assert result["problems"][0].startswith("tests/data/broken/malformed_json.jsonl:3:")
