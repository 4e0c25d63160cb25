"""The chat screen and the export dialog of a finished run (issue 12), through Textual's pilot.

The pilot tests use the real chat worker process and the real ``tui-finetune export`` subprocess on a
tiny finished run (tests/export_support.py); the snapshots use a scripted client, so the screen is
the same on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export_support import make_finished_run
from test_ui_snapshots import wait_for
from tui_finetune.core.export_spec import read_exports
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.run_folder.layout import ADAPTER_DIR
from tui_finetune.ui.messages import ChatToken
from ui_support import REPO, build_app, run_async, write_run


@pytest.fixture
def chat_home(tmp_path, monkeypatch) -> Path:
    """A home of this test's own: ui_home's fixed folder is shared with every other UI test on the machine."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(home))
    monkeypatch.setenv("TUI_FINETUNE_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    monkeypatch.chdir(REPO)
    return home


def screen_name(app) -> str:
    return type(app.screen).__name__


async def open_from_runs(pilot, key: str, screen: str) -> None:
    await pilot.press("f2")
    await wait_for(pilot, lambda: screen_name(pilot.app) == "RunsScreen" and pilot.app.screen.runs)
    await pilot.press(key)
    await wait_for(pilot, lambda: screen_name(pilot.app) == screen)


@run_async
async def test_chat_screen_streams_both_replies_from_the_worker_process(chat_home):
    run_dir = make_finished_run(chat_home, "llama")
    assert run_dir.parent == runs_dir()
    tokens: dict[int, ChatToken] = {}  # by identity: a message is seen again as it bubbles up to the app
    app = build_app()
    async with app.run_test(size=(100, 30), message_hook=lambda m: tokens.setdefault(id(m), m)
                            if isinstance(m, ChatToken) else None) as pilot:
        await open_from_runs(pilot, "c", "ChatScreen")
        chat = app.screen
        await wait_for(pilot, lambda: not chat.busy, timeout=180)  # the worker loaded the model
        assert chat.info["device"] == "cpu"
        await pilot.press(*"What is 3 + 2?", "enter")
        await wait_for(pilot, lambda: chat.replies == 1, timeout=120)
        tuned = chat.history["tuned"][-1]["content"]
        base = chat.history["base"][-1]["content"]
        assert tuned and base and tuned != base  # the adapter toggled off gives the base's own answer
        pieces = [t.text for t in tokens.values() if t.side == "tuned"]
        assert len(pieces) > 1 and "".join(pieces).strip() == tuned  # streamed piece by piece
        assert chat.client.process.poll() is None
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
    chat.client.process.wait(timeout=20)  # closing the screen ends the worker


@run_async
async def test_export_dialog_runs_the_export_and_shows_its_checks(chat_home):
    run_dir = make_finished_run(chat_home, "qwen2")
    app = build_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await open_from_runs(pilot, "e", "ExportDialog")
        dialog = app.screen
        await pilot.press("ctrl+s")  # the first target, adapter
        await wait_for(pilot, lambda: dialog.result is not None or not dialog.running, timeout=240)
        assert dialog.result is not None and dialog.result.passed
        log = "\n".join(strip.text for strip in dialog.query_one("#export-log").lines)
        assert "measuring the fine-tune" in log  # the subprocess's progress
        assert all(f"] {check.name}" in log for check in dialog.result.checks)
        assert "PeftModel.from_pretrained" in log
    assert [r.target for r in read_exports(run_dir)] == ["adapter"]


@run_async
async def test_chat_and_export_are_refused_for_a_run_without_an_adapter(chat_home):
    write_run(runs_dir(), 2, "failed", steps=12, end="failed")
    app = build_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await open_from_runs(pilot, "f2", "RunsScreen")
        for key in ("c", "e"):
            await pilot.press(key)
            await pilot.pause(0.1)
            assert screen_name(app) == "RunsScreen"
        assert any("no adapter yet" in n.message for n in app._notifications)


# ---------------------------------------------------------------- snapshots, with a scripted worker

class ScriptedChatClient:
    """ChatClient's interface with fixed replies, streamed a word at a time."""

    REPLIES = {False: "3 + 2 = 5. Ask me another sum!", True: "The answer to your question is a number."}

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def ready(self) -> dict:
        return {"type": "ready", "run": self.run_dir.name, "device": "cuda:0", "template": "the model's own"}

    def ask(self, messages, base=False, max_new_tokens=256, temperature=0.0):
        text = self.REPLIES[base]
        for word in text.split(" "):
            yield {"type": "token", "text": word + " "}
        yield {"type": "done", "text": text, "tokens": 12, "stopped": not base, "base": base}

    def close(self) -> None:
        pass


def completed_run_with_adapter() -> Path:
    run_dir = write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    (run_dir / ADAPTER_DIR).mkdir()
    (run_dir / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "demo"}))
    return run_dir


async def one_exchange(pilot) -> None:
    await open_from_runs(pilot, "c", "ChatScreen")
    chat = pilot.app.screen
    await wait_for(pilot, lambda: not chat.busy)
    await pilot.press(*"What is 3 + 2?", "enter")
    await wait_for(pilot, lambda: chat.replies == 1)
    await pilot.pause(0.1)


@run_async
async def test_the_monitor_of_a_completed_run_opens_chat_and_export(chat_home):
    run_dir = completed_run_with_adapter()
    app = build_app(chat_client=ScriptedChatClient)
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        await pilot.press("e")
        await wait_for(pilot, lambda: screen_name(app) == "ExportDialog")
        await pilot.press("escape", "c")
        await wait_for(pilot, lambda: screen_name(app) == "ChatScreen")
        await wait_for(pilot, lambda: not app.screen.busy)
        assert app.screen.info["device"] == "cuda:0"


def test_chat_screen_side_by_side(snap_compare, chat_home):
    completed_run_with_adapter()
    app = build_app(chat_client=ScriptedChatClient)
    assert snap_compare(app, terminal_size=(100, 30), run_before=one_exchange)


def test_small_terminal_chat_screen(snap_compare, chat_home):
    """At 80x24 both panes, the input and the footer's keys still show."""
    completed_run_with_adapter()
    app = build_app(chat_client=ScriptedChatClient)
    assert snap_compare(app, terminal_size=(80, 24), run_before=one_exchange)


def test_small_terminal_export_dialog(snap_compare, chat_home):
    """At 80x24 the targets, the format, the folder, the log and the keys all show."""
    completed_run_with_adapter()

    async def open_dialog(pilot):
        await open_from_runs(pilot, "e", "ExportDialog")
        await pilot.press("down", "down", "enter")  # gguf: the format becomes choosable
        await pilot.pause(0.1)
        assert pilot.app.screen.chosen_target() == "gguf"
        assert not pilot.app.screen.query_one("#export-quant").disabled

    assert snap_compare(build_app(), terminal_size=(80, 24), run_before=open_dialog)
