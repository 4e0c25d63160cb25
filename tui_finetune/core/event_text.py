"""Events in words, and following a run folder: one wording and one colour table for the CLI and the TUI.

``describe_event`` turns an event of ``events.jsonl`` into an :class:`EventLine`: a short tag
(``warning``, ``checkpoint``, the phase name), the colour to show the tag in, the message as plain
text, and the advice if any. Messages are text, never markup: a message that contains ``[unsloth]``
shows as written. ``EventLine.to_text`` makes the Rich ``Text`` that both ``tui-finetune logs`` and
the monitor's event log print, so the two read the same.

``EventFollower`` reads what a worker appended to a run folder's ``events.jsonl`` since the last
read, and says when the worker is gone; the CLI's ``logs -f`` and the TUI's run tail both use it.
No torch, no textual; Rich is imported only to build a ``Text``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tui_finetune.core.events import (
    CheckpointEvent, EndEvent, ErrorEvent, EvalEvent, Event, PhaseEvent, ProgressEvent, SampleEvent, StepEvent,
    WarningEvent, read_events)
from tui_finetune.core.run_folder.info import RunError, read_run_info
from tui_finetune.core.run_folder.layout import EVENTS_FILE, WORKER_LOG
from tui_finetune.core.run_folder.listing import pid_alive
from tui_finetune.core.run_folder.resume import resume_step

if TYPE_CHECKING:
    from rich.text import Text

STATE_COLOURS = {"running": "green", "stopping": "yellow", "completed": "blue", "failed": "red",
                 "interrupted": "yellow"}
"""A run state's colour, wherever a state is shown (``runs``, the Runs screen, the monitor's title)."""
PANEL_ONLY = (StepEvent, ProgressEvent)
"""Events the monitor shows in its panels (chart, progress) rather than as event-log lines."""
SAMPLE_CHARS = 200


def state_colour(state: str) -> str:
    return STATE_COLOURS.get(state, "")


@dataclass(frozen=True)
class EventLine:
    """One event in words: ``tag`` in ``style``, then ``text``, then ``advice`` on a line of its own."""

    tag: str
    text: str = ""
    style: str = ""
    advice: str = ""

    def plain(self) -> str:
        line = f"{self.tag} {self.text}".rstrip()
        return line + (f"\n  → {self.advice}" if self.advice else "")

    def to_text(self) -> Text:
        """The line as Rich ``Text``: only the tag and the advice arrow are styled, nothing is parsed."""
        from rich.text import Text

        line = Text(self.tag, style=self.style or "bold")
        if self.text:
            line.append(" " + self.text)
        if self.advice:
            line.append(f"\n  → {self.advice}", style=self.style)
        return line


def describe_event(event: Event) -> EventLine | None:
    """The words for one event; None for an event type this version doesn't know."""
    if isinstance(event, StepEvent):
        return EventLine("step", step_text(event))
    if isinstance(event, PhaseEvent):
        return EventLine(event.phase, event.message, "bold")
    if isinstance(event, ProgressEvent):
        total = f"/{event.total:.0f}" if event.total else ""
        return EventLine(event.phase, f"{event.done:.0f}{total} {event.unit} {event.message}".rstrip(), "dim")
    if isinstance(event, EvalEvent):
        loss = "-" if event.eval_loss is None else f"{event.eval_loss:.4f}"
        return EventLine("eval", f"at step {event.step}: loss {loss}", "cyan")
    if isinstance(event, CheckpointEvent):
        return EventLine("checkpoint", f"step {event.step}: {Path(event.path).name}", "green")
    if isinstance(event, SampleEvent):
        return EventLine("sample", f"({event.label}): {event.text[:SAMPLE_CHARS]!r}", "magenta")
    if isinstance(event, WarningEvent):
        return EventLine("warning", event.message, "yellow", event.advice)
    if isinstance(event, ErrorEvent):
        return EventLine("error", event.message, "bold red", event.advice)
    if isinstance(event, EndEvent):
        return EventLine(f"run {event.state}", event.message, f"bold {state_colour(event.state)}".strip())
    return None


def resume_wording(step: int | None) -> str:
    """What a resume will do, for every prompt and toast that offers one (CLI and TUI)."""
    if step is None:
        return "no checkpoint yet: this starts over from step 0"
    return f"resumes from the checkpoint at step {step}"


def worker_gone_line(run_dir: Path) -> EventLine:
    """The worker died without writing its ``end`` event (killed, or a crash that took Python with it)."""
    return EventLine("worker gone", f"the worker exited without a final state (killed or crashed): see "
                     f"{Path(run_dir) / WORKER_LOG}", "bold red",
                     f"resume it ('tui-finetune resume {Path(run_dir).name}', or r on the Runs list): it "
                     f"{resume_wording(resume_step(Path(run_dir)))}")


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def step_text(e: StepEvent) -> str:
    """``step 12/40  epoch 0.30  loss 1.2345  lr 1.00e-03 ...``: everything a step event carries."""
    parts = [f"{e.step}/{e.total_steps}", f"epoch {e.epoch:.2f}",
             f"loss {e.loss:.4f}" if e.loss is not None else "loss -"]
    if e.lr is not None:
        parts.append(f"lr {e.lr:.2e}")
    if e.grad_norm is not None:
        parts.append(f"grad-norm {e.grad_norm:.3f}")
    if e.tokens_per_s:
        parts.append(f"{e.tokens_per_s:.0f} tok/s")
    if e.eta_s is not None:
        parts.append(f"ETA {int(e.eta_s // 60)}m{int(e.eta_s % 60):02d}s")
    if e.vram_reserved_mb is not None:
        parts.append(f"VRAM {_gb(e.vram_reserved_mb)}/{_gb(e.vram_peak_mb)} GB reserved/peak")
    if e.nvml_used_mb is not None:
        parts.append(f"card {_gb(e.nvml_used_mb)}/{_gb(e.nvml_total_mb)} GB")
    if e.rss_mb is not None:
        parts.append(f"RAM {_gb(e.rss_mb)} GB")
    return "  ".join(parts)


@dataclass
class EventFollower:
    """The reader side of one run folder's ``events.jsonl``: new events since the last read."""

    run_dir: Path
    offset: int = 0

    @classmethod
    def from_end(cls, run_dir: Path) -> EventFollower:
        """Skip what is already there (a resumed run's follower shows only the new attempt)."""
        path = Path(run_dir) / EVENTS_FILE
        return cls(Path(run_dir), path.stat().st_size if path.exists() else 0)

    def read_new(self) -> list[Event]:
        events, self.offset = read_events(self.run_dir / EVENTS_FILE, self.offset)
        return events

    def worker_gone(self) -> bool:
        """True when no worker process runs for this folder (it ended, crashed or was never started)."""
        try:
            return not pid_alive(read_run_info(self.run_dir).pid)
        except RunError:
            return True
