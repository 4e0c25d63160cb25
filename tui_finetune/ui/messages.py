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
