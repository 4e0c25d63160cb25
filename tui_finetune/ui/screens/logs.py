"""A run's logs: its event log in words, then the tail of the worker's own output (``worker.log``)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Header, RichLog

from tui_finetune.core.event_text import PANEL_ONLY, describe_event
from tui_finetune.core.events import read_events
from tui_finetune.core.run_folder.layout import EVENTS_FILE, WORKER_LOG
from tui_finetune.ui.widgets.app_footer import AppFooter

WORKER_LOG_LINES = 200


class LogsScreen(Screen):
    BINDINGS = [Binding("escape,q,l", "close", "Back")]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="logs", markup=True, wrap=True, min_width=1)  # not 78 cells: the pane is narrower at 80 columns
        yield AppFooter()

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        log.border_title = f"logs of {self.run_dir.name}"
        events, _ = read_events(self.run_dir / EVENTS_FILE)
        log.write("[b]events[/b]")
        for event in events:
            line = None if isinstance(event, PANEL_ONLY) else describe_event(event)
            if line is not None:
                log.write(line.to_text())
        log.write(f"\n[b]{WORKER_LOG}[/b] (last {WORKER_LOG_LINES} lines)")
        try:
            lines = (self.run_dir / WORKER_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = ["(no worker log yet)"]
        for line in lines[-WORKER_LOG_LINES:]:
            log.write(Text(line))

    def action_close(self) -> None:
        self.app.pop_screen()
