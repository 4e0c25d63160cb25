"""Every screen at 100x30 and at 80x24 (the smallest usable size) with fixed data: fake GPU, fixed run
folders, a fixed clock.

Create or refresh the baselines with ``pytest tests/test_ui_snapshots.py --snapshot-update`` and look
at the report before committing them.
"""

from __future__ import annotations

import time

import pytest

from tui_finetune.core.preferences import Preferences
from tui_finetune.core.paths import runs_dir
from ui_support import (  # noqa: F401 - fixtures
    build_app, no_gpu_report, show_fixed_runs_folder, ui_home, write_run, write_two_gpu_run)

SIZE = (100, 30)
SIZES = {"100x30": (100, 30), "80x24": (80, 24)}


@pytest.fixture(params=list(SIZES.values()), ids=list(SIZES))
def size(request) -> tuple[int, int]:
    """Each snapshot at both sizes: every screen must stay usable at 80x24."""
    return request.param


async def wait_for(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the screen never reached the expected state")
        await pilot.pause(0.05)
    await pilot.pause()


async def to_recipe(pilot, demo: bool = False) -> None:
    await pilot.press("ctrl+n")
    await pilot.pause()
    if demo:
        pilot.app.screen.choose("demo")
    else:
        await pilot.press("enter")
    await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "RecipeScreen")


async def to_dataset(pilot, path: str = "tests/data/samples/instructions.messages.jsonl") -> None:
    await to_recipe(pilot, demo=True)
    await pilot.press("ctrl+n")
    await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "DatasetScreen")
    pilot.app.screen.query_one("#data-path").cursor_blink = False  # the focused field's cursor, steady: no blink in the snapshot
    pilot.app.screen.check(path)
    # the demo's tokenizer is read from its package's GGUF by the first check of a test run (20-40 s on 2 busy cores)
    await wait_for(pilot, lambda: pilot.app.state.data_result is not None, timeout=180)


def test_hardware_screen(snap_compare, ui_home, size):
    assert snap_compare(build_app(), terminal_size=size)


def test_hardware_screen_without_gpu(snap_compare, ui_home, size):
    assert snap_compare(build_app(hardware=no_gpu_report()), terminal_size=size)


def test_model_screen(snap_compare, ui_home, size):
    assert snap_compare(build_app(), terminal_size=size, press=["ctrl+n", "down"])


def test_recipe_screen(snap_compare, ui_home, size):
    assert snap_compare(build_app(), terminal_size=size, run_before=to_recipe)


def test_recipe_screen_wont_fit_is_red_with_advice(snap_compare, ui_home, size):
    async def too_long(pilot):
        await to_recipe(pilot)
        pilot.app.screen.query_one("#knob-seq").value = "16384"
        await wait_for(pilot, lambda: pilot.app.state.plan.fit == "won't fit")

    assert snap_compare(build_app(), terminal_size=size, run_before=too_long)


def test_dataset_screen(snap_compare, ui_home, size):
    prefs = Preferences(last_data_dir="tests/data/samples")
    assert snap_compare(build_app(prefs), terminal_size=size, run_before=to_dataset)


def test_dataset_screen_broken_file(snap_compare, ui_home, size):
    async def broken(pilot):
        await to_dataset(pilot, "tests/data/broken/malformed_json.jsonl")

    prefs = Preferences(last_data_dir="tests/data/broken")
    assert snap_compare(build_app(prefs), terminal_size=size, run_before=broken)


def test_launch_screen(snap_compare, show_fixed_runs_folder, size):
    async def launch(pilot):
        await to_dataset(pilot)
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "LaunchScreen")

    prefs = Preferences(last_data_dir="tests/data/samples")
    assert snap_compare(build_app(prefs), terminal_size=size, run_before=launch)


def test_monitor_screen(snap_compare, ui_home, size):
    run_dir = write_run(runs_dir(), 5, "running", steps=45, alive=True)

    async def monitor(pilot):
        pilot.app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "updates", 0) > 0)
        await pilot.pause(0.2)

    assert snap_compare(build_app(), terminal_size=size, run_before=monitor)


def test_monitor_screen_of_a_finished_two_gpu_run(snap_compare, ui_home, size):
    """A row per card with what the run recorded (not the cards now), rank 1's card marked smallest."""
    run_dir = write_two_gpu_run(runs_dir())

    async def monitor(pilot):
        pilot.app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(pilot.app.screen, "updates", 0) > 0)
        await pilot.pause(0.2)

    assert snap_compare(build_app(), terminal_size=size, run_before=monitor)


def test_runs_screen(snap_compare, ui_home, size):
    write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    write_run(runs_dir(), 2, "failed", steps=12, end="failed")
    write_run(runs_dir(), 3, "running", steps=30)  # its pid is gone: shown as interrupted
    write_run(runs_dir(), 4, "running", steps=45, alive=True)

    async def runs(pilot):
        await pilot.press("f2")
        await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "RunsScreen")

    assert snap_compare(build_app(), terminal_size=size, run_before=runs)


def test_delete_confirmation_dialog(snap_compare, ui_home, size):
    write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    assert snap_compare(build_app(), terminal_size=size, press=["f2", "_", "x"])


def test_logs_screen(snap_compare, ui_home, size):
    write_run(runs_dir(), 2, "failed", steps=12, end="failed")
    assert snap_compare(build_app(), terminal_size=size, press=["f2", "_", "l"])


def test_light_theme_recipe(snap_compare, ui_home, size):
    prefs = Preferences(theme="textual-light")
    assert snap_compare(build_app(prefs), terminal_size=size, run_before=to_recipe)
