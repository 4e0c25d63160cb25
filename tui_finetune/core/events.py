"""The event schema of ``events.jsonl``: what a training worker tells the world, one JSON object a line.

The worker appends; the UI and the CLI tail the file. Nothing else carries live state, so the file
must be readable by anyone without importing torch, must survive a crash in the middle of a write
(the reader skips a torn last line), and must stay readable when a newer worker adds fields (the
reader ignores keys it does not know, and keeps unknown event types as ``UnknownEvent``).

Every line has ``type`` (one of the names below) and ``time`` (Unix seconds). The types:

- ``phase``: the worker entered a phase (``PHASES``): download, load, quantize, tokenize, sample (a
  generation before training), fit (the run's own training step on its longest batch, with its measured
  peak), train, save (the adapter, first of all after training), eval (the final evaluation, when the
  last step had none), sample (after training), done. A failed sample or evaluation is a warning.
- ``progress``: progress within a phase (bytes downloaded, rows tokenized); ``total`` may be 0 if unknown.
- ``step``: one logged optimizer step: loss, lr, grad-norm, tokens/s, epoch, step of total, ETA and VRAM
  (torch reserved and peak on this process, NVML used and total for the whole card; None on the CPU).
  With several GPUs the loss is the mean over the ranks, tokens/s counts all of them, and
  ``rank_vram_peak_mb`` has every rank's peak.
- ``eval``: an evaluation on the validation split.
- ``checkpoint``: a checkpoint became complete (its marker exists).
- ``sample``: a generation on a held-out prompt, ``label`` before or after training.
- ``warning`` / ``error``: something went wrong; ``advice`` says what to change.
- ``end``: the worker is exiting; ``state`` is the run's final state (completed, failed, interrupted).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator

PHASES = ("download", "load", "quantize", "tokenize", "sample", "fit", "train", "save", "eval", "done")


@dataclass
class Event:
    """Base of every event; ``time`` is filled in when the event is made."""

    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)


@dataclass
class PhaseEvent(Event):
    type: ClassVar[str] = "phase"
    phase: str
    message: str = ""


@dataclass
class ProgressEvent(Event):
    type: ClassVar[str] = "progress"
    phase: str
    done: float
    total: float = 0.0
    unit: str = ""
    message: str = ""


@dataclass
class StepEvent(Event):
    type: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    vram_reserved_mb: float | None = None
    """torch.cuda.memory_reserved of the worker: what the caching allocator holds now."""
    vram_peak_mb: float | None = None
    """torch.cuda.max_memory_reserved since the run started: the number the planner predicts."""
    nvml_used_mb: float | None = None
    """Used memory of the whole card per NVML (other programs and the CUDA context included)."""
    nvml_total_mb: float | None = None
    rss_mb: float | None = None
    """The worker's resident memory (RSS): what a CPU run uses of the machine's RAM."""
    rss_peak_mb: float | None = None
    """The worker's highest RSS so far (since the process started)."""
    rank_vram_peak_mb: list[float] | None = None
    """A multi-GPU run's ``vram_peak_mb`` of every rank, rank 0 first (the other figures are rank 0's)."""


@dataclass
class EvalEvent(Event):
    type: ClassVar[str] = "eval"
    step: int
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointEvent(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass
class SampleEvent(Event):
    type: ClassVar[str] = "sample"
    label: str
    prompt: str
    text: str


@dataclass
class WarningEvent(Event):
    type: ClassVar[str] = "warning"
    message: str
    advice: str = ""


@dataclass
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    message: str
    advice: str = ""
    kind: str = ""
    """A short machine-readable cause: oom, gated, data, recipe, crash."""


@dataclass
class EndEvent(Event):
    type: ClassVar[str] = "end"
    state: str
    message: str = ""


@dataclass
class UnknownEvent(Event):
    """A line of a type this version does not know: kept, so a reader never crashes on a newer file."""

    type: ClassVar[str] = "unknown"
    raw: dict[str, Any] = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in (
    PhaseEvent, ProgressEvent, StepEvent, EvalEvent, CheckpointEvent, SampleEvent,
    WarningEvent, ErrorEvent, EndEvent)}


class EventDecodeError(ValueError):
    """A line that is not a JSON object with a ``type``."""


def encode_event(event: Event) -> str:
    """One line of JSON (no newline), ``type`` first so the file reads well with ``tail``."""
    if isinstance(event, UnknownEvent):
        return json.dumps(event.raw, ensure_ascii=False, allow_nan=False)
    body = {"type": event.type, **asdict(event)}
    return json.dumps(body, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # a numpy or torch scalar that slipped through
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def decode_event(line: str) -> Event:
    """Parse one line back into its dataclass; unknown keys are dropped, unknown types kept raw."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise EventDecodeError(f"not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise EventDecodeError("not a JSON object with a 'type'")
    cls = EVENT_TYPES.get(data["type"])
    if cls is None:
        return UnknownEvent(raw=data, time=float(data.get("time", 0.0)))
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as err:
        raise EventDecodeError(f"{data['type']} event: {err}") from None


class EventLog:
    """Append-only writer of ``events.jsonl``: one write and flush per event, so a tail sees it at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def emit(self, event: Event) -> None:
        self._file.write(encode_event(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path, offset: int = 0) -> tuple[list[Event], int]:
    """Events from byte ``offset`` on, and the offset to continue from.

    A last line without its newline is still being written: it is left for the next call. Lines that
    do not decode are skipped, so one bad line never hides the rest.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    events: list[Event] = []
    end = chunk.rfind(b"\n") + 1
    for raw in chunk[:end].splitlines():
        if not raw.strip():
            continue
        try:
            events.append(decode_event(raw.decode("utf-8", errors="replace")))
        except EventDecodeError:
            continue
    return events, offset + end


def iter_events(path: str | Path) -> Iterator[Event]:
    """All complete events in a file, oldest first."""
    events, _ = read_events(path)
    yield from events


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, cut to ``limit`` characters (its type's name when it has no message): what
    an event, run.json or a fallback reason quotes of an exception, so no event carries a traceback."""
    text = str(err)
    return text.splitlines()[0][:limit] if text.strip() else type(err).__name__
