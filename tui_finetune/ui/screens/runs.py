"""All runs with their state, from the run folders (``core.run_folder.listing.list_runs``).

Enter opens a run's monitor (live when it is running, history otherwise); ``r`` resumes an
interrupted run, ``x`` deletes one after a yes/no dialog, ``l`` shows its logs; ``c`` chats with a
completed run and ``e`` exports it (screens/chat.py, screens/export_dialog.py).
"""

from __future__ import annotations

import shutil

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static

from tui_finetune.core.event_text import resume_wording, state_colour
from tui_finetune.core.run_folder.listing import RunSummary, list_runs
from tui_finetune.core.run_folder.resume import resume_step
from tui_finetune.ui.widgets.app_footer import AppFooter


class RunsScreen(Screen):
    BINDINGS = [Binding("enter", "open", "Open", show=True), Binding("r", "resume", "Resume"),
                Binding("x", "delete", "Delete"), Binding("l", "logs", "Logs"),
                Binding("c", "chat", "Chat"), Binding("e", "export", "Export"),
                Binding("n", "new", "New fine-tune")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("[b]Runs[/b]", id="runs-title")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="runs-detail")
        yield AppFooter(narrow_hides=("toggle_theme",))  # ctrl+t still works

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("run", "state", "step", "loss", "model")  # the model last: 80 columns cut it, not these
        self.runs: list[RunSummary] = []
        self.refresh_runs()
        self.set_interval(2.0, self.refresh_runs)

    def on_screen_resume(self) -> None:
        self.refresh_runs()

    def refresh_runs(self) -> None:
        table = self.query_one(DataTable)
        runs = list(reversed(list_runs()))  # newest first
        rows = [(r.run_id, r.model, r.state, r.step, r.total_steps, r.last_loss) for r in runs]
        if rows == [(r.run_id, r.model, r.state, r.step, r.total_steps, r.last_loss) for r in self.runs]:
            return
        cursor = table.cursor_row
        self.runs = runs
        table.clear()
        for r in runs:
            step = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
            loss = f"{r.last_loss:.4f}" if r.last_loss is not None else "-"
            table.add_row(r.run_id, Text(r.state, style=state_colour(r.state)), step, loss, r.model,
                          key=str(r.run_dir))
        if runs:
            table.move_cursor(row=min(cursor, len(runs) - 1))
        title = f"[b]Runs[/b] ({len(runs)})" if runs else "[b]Runs[/b]: none yet. Press n to start a fine-tune."
        self.query_one("#runs-title", Static).update(title)
        self.show_detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_detail()

    def show_detail(self) -> None:
        run = self.current()
        detail = self.query_one("#runs-detail", Static)
        if run is None:
            detail.update("")
            return
        hint = {"running": "Enter: live view", "completed": "Enter: history · c: chat · e: export",
                "failed": "l: logs"}.get(run.state, "")
        if run.state == "interrupted":
            hint = f"r: resume ({resume_wording(resume_step(run.run_dir))})"
        detail.update(f"{run.message or run.state} [dim]{hint}[/dim]")

    def current(self) -> RunSummary | None:
        table = self.query_one(DataTable)
        if not self.runs or table.cursor_row < 0 or table.cursor_row >= len(self.runs):
            return None
        return self.runs[table.cursor_row]

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        run = self.current()
        if run is not None:
            self.app.open_monitor(run.run_dir)  # type: ignore[attr-defined]

    def action_resume(self) -> None:
        run = self.current()
        if run is None:
            return
        if run.state != "interrupted":
            self.notify(f"Only an interrupted run can be resumed; this one is {run.state}.", severity="warning")
            return
        self.app.resume_and_open(run.run_dir)  # type: ignore[attr-defined]

    def action_delete(self) -> None:
        from tui_finetune.ui.screens.dialogs import ConfirmDialog

        run = self.current()
        if run is None:
            return
        if run.state in ("running", "stopping"):
            self.notify("This run is still training: stop it first (open it, then s).", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                shutil.rmtree(run.run_dir, ignore_errors=True)
                self.notify(f"Deleted {run.run_id}")
                self.refresh_runs()

        self.app.push_screen(ConfirmDialog(f"Delete run [b]{run.run_id}[/b] and its checkpoints? "
                                           "This can't be undone.", yes="Delete", no="Keep"), answered)

    def action_logs(self) -> None:
        from tui_finetune.ui.screens.logs import LogsScreen

        run = self.current()
        if run is not None:
            self.app.push_screen(LogsScreen(run.run_dir))

    def action_chat(self) -> None:
        from tui_finetune.ui.screens.chat import open_chat

        run = self.current()
        if run is not None:
            open_chat(self.app, run.run_dir)

    def action_export(self) -> None:
        from tui_finetune.ui.screens.chat import open_export

        run = self.current()
        if run is not None:
            open_export(self.app, run.run_dir)

    def action_new(self) -> None:
        self.app.new_finetune()  # type: ignore[attr-defined]
