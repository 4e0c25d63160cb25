"""Chat with a finished run: the fine-tune and its base side by side, streamed from a worker process.

The model lives in ``engine/chat_worker.py``, started through ``core.chat_client.ChatClient``, so
this process never imports torch. The worker loads the model once; the base's answer is the same
model with the adapter switched off, so comparing costs time, not memory. Ctrl+B cycles between
both sides, the fine-tune only and the base only (one at a time is faster on a slow card). Each
side keeps its own conversation, as the model saw it. Replies are greedy, so they are repeatable.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Header, Input, Static

from tui_finetune.core.chat_client import ChatClientError
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder.layout import ADAPTER_DIR
from tui_finetune.core.run_folder.listing import shown_state
from tui_finetune.ui.messages import ChatDone, ChatFailed, ChatReady, ChatToken
from tui_finetune.ui.widgets.app_footer import AppFooter
from tui_finetune.ui.widgets.chat_pane import ChatPane

SIDES = {"tuned": "fine-tune", "base": "base (adapter off)"}
MODES = (("tuned", "base"), ("tuned",), ("base",))
"""What Ctrl+B cycles through: side by side, the fine-tune only, the base only."""
MAX_NEW_TOKENS = 256


def after_training_problem(run_dir: Path) -> str:
    """Why this run can't be chatted with or exported yet, or "" when it can."""
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        state = shown_state(read_run_info(run_dir))
        return (f"{run_dir.name} has no adapter yet ({state}): chat and export need a completed run"
                + ("; resume it with r first" if state == "interrupted" else ""))
    return ""


def open_chat(app: Any, run_dir: Path) -> None:
    """The Runs and Monitor screens' ``c``: the chat screen, or a notice saying what's missing."""
    problem = after_training_problem(run_dir)
    if problem:
        app.notify(problem, severity="warning")
        return
    app.push_screen(ChatScreen(run_dir))


def open_export(app: Any, run_dir: Path) -> None:
    """The Runs, Monitor and Chat screens' ``e``: the export dialog, or a notice saying what's missing."""
    from tui_finetune.ui.screens.export_dialog import ExportDialog

    problem = after_training_problem(run_dir)
    if problem:
        app.notify(problem, severity="warning")
        return
    app.push_screen(ExportDialog(run_dir))


class ChatScreen(Screen):
    BINDINGS = [Binding("escape", "close", "Back"), Binding("ctrl+b", "cycle_sides", "Both/tuned/base"),
                Binding("ctrl+l", "clear", "Clear"),
                Binding("ctrl+e", "export", "Export", priority=True)]  # over the input's ctrl+e (end of line)

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.mode = 0
        self.history: dict[str, list[dict[str, str]]] = {side: [] for side in SIDES}
        self.client: Any = None
        self.info: dict[str, Any] = {}
        self.busy = True
        """True while the model loads or a reply streams: the input waits."""
        self.replies = 0
        self.asking: tuple[str, ...] = MODES[0]
        self._stop_asked = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[b]chat[/b] · {self.run_dir.name} · loading the model…", id="chat-title")
        with Horizontal(id="chat-panes"):
            for side, title in SIDES.items():
                yield ChatPane(title, id=f"chat-{side}")
        yield Input(placeholder="loading the model…", id="chat-input", disabled=True)
        yield AppFooter()

    def on_mount(self) -> None:
        self.show_mode()
        self.start_client()

    # ------------------------------------------------------------ worker side (threads)

    @work(thread=True, exclusive=True, group="chat")
    def start_client(self) -> None:
        factory = self.app.context.chat_client  # type: ignore[attr-defined]
        try:
            self.client = factory(self.run_dir)
            if self._stop_asked.is_set():  # the screen closed while the worker started
                self.client.close()
                return
            self.post_message(ChatReady(self.client.ready()))
        except (ChatClientError, OSError) as err:
            self.post_message(ChatFailed(str(err)))

    @work(thread=True, exclusive=True, group="chat")
    def ask(self, sides: tuple[str, ...]) -> None:
        """Each side in turn on the one worker: the fine-tune, then the same model with the adapter off."""
        for side in sides:
            try:
                for event in self.client.ask(self.history[side], base=side == "base", max_new_tokens=MAX_NEW_TOKENS):
                    if event.get("type") == "token":
                        self.post_message(ChatToken(side, event.get("text", "")))
                    elif event.get("type") in ("done", "error"):
                        self.post_message(ChatDone(side, event))
            except ChatClientError as err:
                self.post_message(ChatFailed(str(err)))
                return

    # ------------------------------------------------------------ UI side

    def on_chat_ready(self, message: ChatReady) -> None:
        self.info = message.info
        self.query_one("#chat-title", Static).update(
            f"[b]{self.run_dir.name}[/b] · {message.info.get('device', '?')} · "
            f"template: {message.info.get('template', '?')}")
        self.set_busy(False)

    def on_chat_failed(self, message: ChatFailed) -> None:
        self.query_one("#chat-title", Static).update(f"[b]chat[/b] · {self.run_dir.name} · [red]failed[/red]")
        self.notify(f"Chat stopped: {message.message}", severity="error", timeout=15)
        self.query_one("#chat-input", Input).placeholder = "the chat worker stopped: Escape to go back"

    def on_chat_token(self, message: ChatToken) -> None:
        self.query_one(f"#chat-{message.side}", ChatPane).append(message.text)

    def on_chat_done(self, message: ChatDone) -> None:
        pane = self.query_one(f"#chat-{message.side}", ChatPane)
        event = message.event
        if event.get("type") == "error":
            pane.finish(pane.reply.strip(), note=event.get("message", "generation failed"))
        else:
            text = event.get("text", "")
            self.history[message.side].append({"role": "assistant", "content": text})
            note = "" if event.get("stopped") else f"cut at {MAX_NEW_TOKENS} tokens (no end token)"
            pane.finish(text, note)
        if message.side == self.asking[-1]:
            self.replies += 1
            self.set_busy(False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.busy:
            return
        event.input.value = ""
        sides = MODES[self.mode]
        for side in sides:
            self.history[side].append({"role": "user", "content": text})
            pane = self.query_one(f"#chat-{side}", ChatPane)
            pane.add_user(text)
            pane.start_reply()
        self.asking = sides
        self.set_busy(True)
        self.ask(sides)

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        box = self.query_one("#chat-input", Input)
        box.disabled = busy
        box.placeholder = "…" if busy else "type a message, Enter sends"
        if not busy:
            box.focus()

    def show_mode(self) -> None:
        shown = MODES[self.mode]
        for side in SIDES:
            self.query_one(f"#chat-{side}", ChatPane).display = side in shown

    def action_cycle_sides(self) -> None:
        if self.busy and self.info:
            self.notify("Wait for the reply to finish.", severity="warning")
            return
        self.mode = (self.mode + 1) % len(MODES)
        self.show_mode()
        self.notify("Answering with: " + " and ".join(SIDES[s] for s in MODES[self.mode]))

    def action_clear(self) -> None:
        if self.busy:
            return
        self.history = {side: [] for side in SIDES}
        for pane in self.query(ChatPane):
            pane.clear_turns()

    def action_export(self) -> None:
        open_export(self.app, self.run_dir)

    def action_close(self) -> None:
        self.app.pop_screen()

    def on_unmount(self) -> None:
        """Stop the worker in the background: it ends at end of input once the current reply is done."""
        self._stop_asked.set()
        client = self.client
        if client is not None:
            threading.Thread(target=client.close, daemon=True, name="chat-close").start()
