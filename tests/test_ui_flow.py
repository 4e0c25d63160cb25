"""The wizard and the runs list driven by keyboard through Textual's pilot, against real run folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tui_finetune.core.preferences import load_preferences
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder.layout import STOP_FILE
from tui_finetune.ui.screens.dataset import run_data_check
from ui_support import build_app, run_async, ui_home, write_run  # noqa: F401 - ui_home is a fixture
from test_ui_snapshots import to_dataset, to_recipe, wait_for

SIZE = (100, 30)


def screen_name(app) -> str:
    return type(app.screen).__name__


@run_async
async def test_recipe_estimate_updates_on_every_change_and_turns_red(ui_home):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await to_recipe(pilot)
        before = app.state.plan.estimate.total
        app.screen.query_one("#knob-mb").value = "2"
        await wait_for(pilot, lambda: app.state.plan.estimate.total > before)
        app.screen.query_one("#knob-seq").value = "16384"
        await wait_for(pilot, lambda: app.state.plan.fit == "won't fit")
        advice = str(app.screen.query_one("#fit-advice").render())
        assert "To fit" in advice or "No single change" in advice
        assert "WON'T FIT" in str(app.screen.query_one("#fit-verdict").render())


@run_async
async def test_recipe_batching_knob_sets_packing_and_grouping_in_the_saved_and_launched_recipe(ui_home, tmp_path):
    from tui_finetune.core.recipe_io import load_recipe

    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await to_recipe(pilot)
        assert app.state.recipe.data.group_by_length and not app.state.recipe.data.packing  # the default
        knob = app.screen.query_one("#knob-batching")
        expected = {"padded rows": (False, False), "packed bins": (True, True), "length groups": (False, True)}
        for word, flags in expected.items():
            knob.value = word  # a word that is not one of the knob's options raises
            # the live re-plan puts the knob's recipe in the state the launch screen starts the run from
            await wait_for(pilot, lambda word=word: app.state.recipe.data.batching == word)
            assert (app.state.recipe.data.packing, app.state.recipe.data.group_by_length) == flags
            target = tmp_path / f"{word.replace(' ', '-')}.toml"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: screen_name(app) == "SaveRecipeDialog")
            app.screen.query_one("#save-path").value = str(target)
            await pilot.press("enter")
            await wait_for(pilot, lambda target=target: target.exists() and screen_name(app) == "RecipeScreen")
            saved = load_recipe(target).data
            assert (saved.packing, saved.group_by_length) == flags
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: screen_name(app) == "DatasetScreen")
        assert (app.state.recipe.data.packing, app.state.recipe.data.group_by_length) == (False, True)


@run_async
async def test_loading_a_recipe_shows_its_batching_on_the_knob_and_reads_it_back_unchanged(ui_home):
    from dataclasses import replace

    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await to_recipe(pilot)
        screen, base = app.screen, app.state.recipe
        shown = {(False, True): "length groups", (True, True): "packed bins", (True, False): "packed bins",
                 (False, False): "padded rows"}
        for (packing, grouping), word in shown.items():
            recipe = replace(base, data=replace(base.data, packing=packing, group_by_length=grouping))
            screen.load_knobs(recipe)
            await pilot.pause()
            assert screen.query_one("#knob-batching").value == word
            assert screen.read_knobs() == recipe and app.state.recipe == recipe


@run_async
async def test_recipe_presets_by_number_key_and_save_as_toml(ui_home, tmp_path):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await to_recipe(pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: app.state.recipe.model == "phi-2")
        target = tmp_path / "mine.toml"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "SaveRecipeDialog")
        app.screen.query_one("#save-path").value = str(target)
        await pilot.press("enter")
        await wait_for(pilot, lambda: target.exists())
    from tui_finetune.core.recipe_io import load_recipe

    assert load_recipe(target).model == "phi-2"


@run_async
async def test_broken_dataset_shows_file_line_problems_and_blocks_launch(ui_home):
    app = build_app(data_checker=run_data_check)  # the real subprocess
    async with app.run_test(size=SIZE) as pilot:
        await to_dataset(pilot, "tests/data/broken/malformed_json.jsonl")
        problems = str(app.screen.query_one("#data-problems").render())
        assert "tests/data/broken/malformed_json.jsonl:3: invalid JSON" in problems
        assert "Launch blocked" in str(app.screen.query_one("#data-status").render())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert screen_name(app) == "DatasetScreen"
        assert any("Launch blocked" in n.message for n in app._notifications)


@run_async
async def test_dataset_check_runs_in_a_subprocess_and_remembers_the_folder(ui_home):
    app = build_app(data_checker=run_data_check)
    async with app.run_test(size=SIZE) as pilot:
        await to_dataset(pilot, "tests/data/samples/instructions.alpaca.jsonl")
        result = app.state.data_result
        assert result["format"] == "alpaca" and result["kept"] == 240 and not result["refused"]
        assert result["example"]["segments"][-1]["trained"] is True
    assert load_preferences().last_data_dir.endswith("tests/data/samples")


@run_async
async def test_theme_toggle_is_remembered(ui_home):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.theme == "textual-light"
    assert load_preferences().theme == "textual-light"


@pytest.fixture
def sleeper():
    """A stand-in worker that ignores SIGINT (as a worker finishing its checkpoint would): stop requests
    signal it, never the test process."""
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@run_async
async def test_monitor_keys_stop_detach_and_quit(ui_home, sleeper, capsys):
    from tui_finetune.core.run_folder.info import update_run_info

    run_dir = write_run(runs_dir(), 5, "running", steps=45)
    update_run_info(run_dir, pid=sleeper.pid)
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        assert app.screen.query_one("LossChart").points > 0
        await pilot.press("s")
        await pilot.pause()
        assert (run_dir / STOP_FILE).exists() and read_run_info(run_dir).state == "stopping"
        await pilot.press("d")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        await pilot.press("q")
        await pilot.pause()
    assert app.is_running is False
    assert f"Training continues in the background: {run_dir.name}" in capsys.readouterr().err


@run_async
async def test_runs_delete_asks_first_and_resume_only_interrupted(ui_home):
    done = write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    interrupted = write_run(runs_dir(), 2, "running", steps=30)  # pid gone
    resumed: list[Path] = []
    app = build_app(resumer=lambda run_dir: resumed.append(run_dir) or 0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        await pilot.press("down", "r")  # the completed run (older, second row): not resumable
        await pilot.pause()
        assert resumed == []
        await pilot.press("x", "n")
        await pilot.pause()
        assert done.exists()
        await pilot.press("x", "y")
        await wait_for(pilot, lambda: not done.exists())
        await pilot.press("r")  # the interrupted one is the only row now
        await wait_for(pilot, lambda: screen_name(app) == "MonitorScreen")
        assert resumed == [interrupted]


@run_async
async def test_startup_offers_to_resume_an_interrupted_run(ui_home):
    interrupted = write_run(runs_dir(), 2, "running", steps=30)
    resumed: list[Path] = []
    app = build_app(resumer=lambda run_dir: resumed.append(run_dir) or 0, offer_on_start=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: screen_name(app) == "ConfirmDialog")
        assert "no checkpoint yet: this starts over" in str(app.screen.query_one("#question").render())
        await pilot.press("y")
        await wait_for(pilot, lambda: screen_name(app) == "MonitorScreen")
    assert resumed == [interrupted]


@run_async
async def test_logs_screen_shows_events_and_worker_log(ui_home):
    run_dir = write_run(runs_dir(), 2, "failed", steps=12, end="failed")
    (run_dir / "worker.log").write_text("Traceback [most recent call last]\nRuntimeError: boom\n")
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2", "l")
        await wait_for(pilot, lambda: screen_name(app) == "LogsScreen")
        text = "\n".join(str(line.text) for line in app.screen.query_one("#logs").lines)
        assert "loss spiked at step 12" in text and "RuntimeError: boom" in text
