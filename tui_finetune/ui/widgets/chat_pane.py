"""One side of a chat (the fine-tune or the base): the turns so far, with the reply streaming in.

A scrolling column of Statics, one per turn; tokens are appended to the last reply's Static, so a
streamed reply redraws one widget, not the whole conversation. Text is shown as plain text (a model
may write square brackets), and the pane keeps no conversation state: the chat screen does.
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static


class ChatPane(VerticalScroll):
    DEFAULT_CSS = """
    ChatPane { border: round $secondary; padding: 0 1; height: 1fr; }
    ChatPane > .chat-user { color: $text-muted; margin-top: 1; }
    ChatPane > .chat-reply { color: $text; }
    ChatPane > .chat-note { color: $warning; }
    """

    def __init__(self, title: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = title
        self.reply = ""
        self._reply_static: Static | None = None

    def add_user(self, text: str) -> None:
        self.mount(Static(Text("you: " + text), classes="chat-user"))
        self.scroll_end(animate=False)

    def start_reply(self) -> None:
        self.reply = ""
        self._reply_static = Static(Text("…"), classes="chat-reply")
        self.mount(self._reply_static)
        self.scroll_end(animate=False)

    def append(self, piece: str) -> None:
        if self._reply_static is None:
            self.start_reply()
        self.reply += piece
        assert self._reply_static is not None
        self._reply_static.update(Text(self.reply.lstrip()))
        self.scroll_end(animate=False)

    def finish(self, text: str, note: str = "") -> None:
        """The final reply text (the worker's, stripped) and a note such as "cut at 256 tokens"."""
        if self._reply_static is None:
            self.start_reply()
        assert self._reply_static is not None
        self.reply = text
        self._reply_static.update(Text(text or "(empty reply)"))
        if note:
            self.mount(Static(Text(note), classes="chat-note"))
        self._reply_static = None
        self.scroll_end(animate=False)

    def clear_turns(self) -> None:
        self.remove_children()
        self.reply, self._reply_static = "", None
