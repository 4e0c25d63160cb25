"""The live view of one run: loss chart, VRAM panel, progress, and the event log.

A thread worker tails ``RUN_DIR/events.jsonl`` (``RunTail``) and posts a complete snapshot whenever
something changed; ``RunUpdated.can_replace`` merges a backlog, so 1000 step events a second cost
one redraw per poll. The screen holds no state the folder doesn't: reattaching replays the file.
Keys: ``s`` stops and saves, ``d`` detaches (training continues), ``q`` quits the app (training continues).
Once the run has ended, the footer offers neither stop nor "training continues", and once it completed,
``c`` chats with it and ``e`` exports it: ``check_action`` decides.
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Header, RichLog, Static
from textual.worker import get_current_worker

from tui_finetune.core.event_text import state_colour
from tui_finetune.core.run_folder.control import request_stop
from tui_finetune.core.run_folder.info import FINAL_STATES
from tui_finetune.ui.messages import RunUpdated
from tui_finetune.ui.run_tail import MonitorSnapshot, RunTail
from tui_finetune.ui.widgets.app_footer import AppFooter
from tui_finetune.ui.widgets.loss_chart import LossChart
from tui_finetune.ui.widgets.run_stats import RunStats
from tui_finetune.ui.widgets.vram_panel import VramPanel

class MonitorScreen(Screen):
    BINDINGS = [Binding("s", "stop", "Stop & save"), Binding("d,escape", "detach", "Detach"),
                Binding("q", "quit_live", "Quit (training continues)"),
                Binding("c", "chat", "Chat"), Binding("e", "export", "Export")]
    LIVE_ONLY = ("stop", "quit_live")
    COMPLETED_ONLY = ("chat", "export")
    VERTICAL_BREAKPOINTS = [(0, "-short"), (28, "-tall")]
    """Under 28 rows (80x24) the sparkline and the epoch bar give way, so the checkpoint line stays."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.snapshot: MonitorSnapshot | None = None
        self.updates = 0
        self._log_shown = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[b]{self.run_dir.name}[/b]", id="run-title")
        with Horizontal(id="monitor-top"):
            yield LossChart(id="loss-chart")
            with Vertical(id="monitor-side"):
                yield VramPanel(id="vram-panel")
                yield RunStats(id="run-stats")
        # min_width: RichLog renders at least 78 cells, wider than the pane at 80 columns (2 cells hidden, a scrollbar row)
        yield RichLog(id="event-log", markup=True, wrap=True, max_lines=1000, min_width=1)
        yield AppFooter(narrow_hides=("toggle_theme",))  # ctrl+t still works

    def on_mount(self) -> None:
        self.query_one("#event-log", RichLog).border_title = "events"
        self.tail()

    @work(thread=True, exclusive=True, group="tail")
    def tail(self) -> None:
        ctx = self.app.context  # type: ignore[attr-defined]
        reader = RunTail(self.run_dir, vram_sampler=ctx.vram_sampler, gpus_sampler=ctx.gpus_sampler)
        worker = get_current_worker()
        while not worker.is_cancelled:
            snap = reader.poll()
            if snap is not None:
                self.post_message(RunUpdated(self.run_dir, snap))
            time.sleep(ctx.poll_interval if not snap or snap.state not in FINAL_STATES else ctx.poll_interval * 4)

    @property
    def live(self) -> bool:
        return self.snapshot is None or self.snapshot.state not in FINAL_STATES

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.COMPLETED_ONLY:
            return self.snapshot is not None and self.snapshot.state == "completed"
        return self.live or action not in self.LIVE_ONLY

    def on_run_updated(self, message: RunUpdated) -> None:
        snap = message.snapshot
        changed = self.snapshot is None or self.snapshot.state != snap.state
        self.snapshot = snap
        if changed:  # stop/quit go once the run ends; chat and export come once it completed
            self.refresh_bindings()
        self.updates += 1
        style = state_colour(snap.state)
        phase = f" · phase {snap.phase}" if snap.phase else ""
        self.query_one("#run-title", Static).update(
            f"[{style} b]{snap.state}[/]{phase} · [b]{snap.run_id}[/b] · {snap.model}")
        self.query_one(LossChart).update_points(snap.train_points, snap.eval_points)
        self.query_one(VramPanel).show(snap)
        self.query_one(RunStats).show(snap, self.app.context.clock())  # type: ignore[attr-defined]
        log = self.query_one("#event-log", RichLog)
        new = snap.log_count - self._log_shown
        for line in snap.log_lines[-new:] if 0 < new else ():
            log.write(line.to_text())
        self._log_shown = snap.log_count

    def action_chat(self) -> None:
        from tui_finetune.ui.screens.chat import open_chat

        open_chat(self.app, self.run_dir)

    def action_export(self) -> None:
        from tui_finetune.ui.screens.chat import open_export

        open_export(self.app, self.run_dir)

    def action_stop(self) -> None:
        info = request_stop(self.run_dir)
        self.notify(f"Stop requested: the worker saves a checkpoint and exits ({info.state}).")

    async def action_quit_live(self) -> None:
        await self.app.action_quit()

    def action_detach(self) -> None:
        self.app.show_runs()  # type: ignore[attr-defined]
