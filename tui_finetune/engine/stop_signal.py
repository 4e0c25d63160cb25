"""How a worker is asked to stop: SIGINT, SIGTERM, SIGHUP (SIGBREAK on Windows) or a STOP file in the run
folder (what ``core/run_folder/control.request_stop`` writes for the CLI and the UI). The worker polls it at
phase boundaries and every step, so a stop ends in a sealed checkpoint rather than a killed process."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui_finetune.core.run_folder.layout import STOP_FILE


class StopRequested(Exception):
    """A stop arrived before training began: nothing to checkpoint yet."""


@dataclass
class StopSignal:
    """Set by SIGINT/SIGTERM, or seen as a STOP file; polled at phase boundaries and every step."""

    run_dir: Path
    signalled: bool = False
    signals: list[int] = field(default_factory=list)

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.signalled = True
            self.signals.append(signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        if hasattr(signal, "SIGHUP"):  # a closed terminal, where the worker still has one
            signal.signal(signal.SIGHUP, handler)
        if hasattr(signal, "SIGBREAK"):  # pragma: no cover - Windows console close / Ctrl+Break
            signal.signal(signal.SIGBREAK, handler)

    def __call__(self) -> bool:
        return self.signalled or (self.run_dir / STOP_FILE).exists()

    def check(self) -> None:
        if self():
            raise StopRequested()
