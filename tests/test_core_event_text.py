"""One wording and one colour table for events and states, shared by ``tui-finetune logs`` and the monitor."""

from __future__ import annotations

import os

from rich.console import Console

from tui_finetune.cli import runs as cli_runs
from tui_finetune.core.event_text import EventFollower, describe_event, state_colour
from tui_finetune.core.events import EndEvent, EventLog, StepEvent, WarningEvent
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.run_folder.info import update_run_info
from ui_support import ui_home, write_run  # noqa: F401 - ui_home is a fixture


def test_bracketed_text_in_a_message_is_shown_as_written():
    line = describe_event(WarningEvent(message="install it: pip install 'tui-finetune[unsloth]'",
                                       advice="see [b]the README[/b]"))
    text = line.to_text()
    assert "pip install 'tui-finetune[unsloth]'" in text.plain and "[b]the README[/b]" in text.plain
    assert text.plain == line.plain()


def test_the_cli_prints_the_same_words_as_the_tui_log(monkeypatch):
    console = Console(record=True, width=200, color_system=None)
    monkeypatch.setattr(cli_runs, "console", console)
    event = EndEvent(state="completed", message="adapter saved")
    cli_runs.print_event(event)
    assert console.export_text().strip() == describe_event(event).plain() == "run completed adapter saved"
    assert state_colour("completed") in describe_event(event).style


def test_the_follower_reads_only_what_was_appended_and_sees_the_worker_go(ui_home):
    run_dir = write_run(runs_dir(), 1, "running", steps=3)
    follower = EventFollower(run_dir)
    assert [e.step for e in follower.read_new() if isinstance(e, StepEvent)] == [1, 2, 3]
    assert follower.read_new() == []
    assert EventFollower.from_end(run_dir).read_new() == []
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(StepEvent(step=4, total_steps=60, epoch=0.1, loss=1.0))
    assert [e.step for e in follower.read_new()] == [4]
    assert follower.worker_gone()
    update_run_info(run_dir, pid=os.getpid())
    assert not follower.worker_gone()
