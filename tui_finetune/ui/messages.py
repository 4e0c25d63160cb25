"""Typed messages that workers post back to screens (``post_message`` is the only thread-safe call).

Small dataclasses, as in toolong's ``messages.py``. ``RunUpdated`` carries a complete snapshot, so it
``can_replace`` an older one still queued: a flood of step events merges instead of lagging the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.message import Message

from tui_finetune.core.hardware import HardwareReport
from tui_finetune.ui.run_tail import MonitorSnapshot


@dataclass
class HardwareDetected(Message):
    report: HardwareReport


@dataclass
class DataChecked(Message):
    """The JSON object of ``python -m tui_finetune.data.check_json`` (or an ``error`` key)."""

    path: str
    result: dict[str, Any]


@dataclass
class RunUpdated(Message):
    run_dir: Path
    snapshot: MonitorSnapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunUpdated) and message.run_dir == self.run_dir


# ---------------------------------------------------------------- chat and export (screens/chat.py, export_dialog.py)

@dataclass
class ChatReady(Message):
    """The chat worker loaded the model: its ``ready`` event (run, device, template)."""

    info: dict[str, Any]


@dataclass
class ChatToken(Message):
    """One streamed piece of a reply; never merged, since every piece is part of the text."""

    side: str
    """``tuned`` or ``base``."""
    text: str


@dataclass
class ChatDone(Message):
    """A reply ended: its ``done`` event (text, tokens, stopped) or an ``error`` event."""

    side: str
    event: dict[str, Any]


@dataclass
class ChatFailed(Message):
    """The chat worker could not start, or died; the message says why."""

    message: str


@dataclass
class ExportLine(Message):
    """One progress line of the export subprocess."""

    text: str


@dataclass
class ExportEnded(Message):
    """The export subprocess exited; ``output`` is what it printed on stdout (the error, if it failed)."""

    returncode: int
    output: str
    started_at: float
