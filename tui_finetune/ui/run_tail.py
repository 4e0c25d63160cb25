"""Follow a run folder: read new lines of ``events.jsonl`` from an offset and fold them into a snapshot.

The monitor shows only what the folder says (docs/design.md: the folder is the truth). A ``RunTail``
reads through core's ``EventFollower`` and keeps a few bounded series (``events.jsonl`` holds every
attempt of a resumed run: a step that goes back in time starts a new attempt, and the chart drops
the earlier attempt's points from that step on, so it draws the one line the run continues); ``poll`` returns a new immutable ``MonitorSnapshot`` when
anything changed. Because each snapshot is complete, the UI may drop all but the newest one (the
message's ``can_replace``), so a flood of step events can never queue up behind the screen.
Textual-free and torch-free: the tail thread, the benchmark and the tests use it directly.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tui_finetune.core.event_text import PANEL_ONLY, EventFollower, EventLine, describe_event, worker_gone_line
from tui_finetune.core.events import CheckpointEvent, EndEvent, EvalEvent, Event, PhaseEvent, StepEvent
from tui_finetune.core.hardware import GpuInfo
from tui_finetune.core.run_folder.info import FINAL_STATES, RunError, read_run_info, read_run_recipe
from tui_finetune.core.run_folder.layout import RECIPE_FILE
from tui_finetune.core.run_folder.listing import shown_state
from tui_finetune.ui.gpu_rows import GpuRow, merge_rank_peaks, read_gpu_rows

MAX_POINTS = 2000
"""Loss and VRAM points kept; when full, every other point is dropped (a chart is only so wide)."""
MAX_LOG_LINES = 500
SAMPLE_EVERY_S = 1.0
"""NVML is asked at most once a second, however fast the tail polls."""
ATTEMPT_START_PHASES = ("download", "load")
"""The phases a worker starts with (engine/worker.py: finding the model, loading it): one read after steps
means a resumed attempt with a worker of its own."""
VramSampler = Callable[[], "tuple[float, float] | None"]
"""Returns (used MB, total MB) of the card, or None where there is no NVML."""
GpusSampler = Callable[[], Sequence[GpuInfo]]
"""Returns every NVIDIA card NVML sees (``detect_hardware().gpus``): a multi-GPU run's rows pick theirs by index."""


@dataclass(frozen=True)
class MonitorSnapshot:
    run_id: str
    model: str = ""
    state: str = "running"
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    total_epochs: float = 0.0
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    train_points: tuple[tuple[float, float], ...] = ()
    eval_points: tuple[tuple[float, float], ...] = ()
    vram_used_mb: float | None = None
    vram_total_mb: float | None = None
    vram_peak_mb: float | None = None
    vram_history: tuple[float, ...] = ()
    ram_used_mb: float | None = None
    """The worker's RSS at its last step event (CPU runs; GPU runs carry it too)."""
    ram_peak_mb: float | None = None
    """The peak RSS the current attempt's worker reported (its whole life, loading included): a resume's worker
    is a new process, so an earlier attempt's peak (a first run's model conversion) is not this attempt's."""
    attempts: int = 1
    """Workers that have run this run: a resume starts a new one."""
    ram_history: tuple[float, ...] = ()
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    micro_batch: int = 0
    grad_accum: int = 0
    devices: int = 1
    effective_batch: int = 0
    """The batch in effect, from the run's recipe.toml (an OOM's smaller micro-batch is written there, and
    ``train.devices``); the effective batch is the recipe's own product (``RecipeSpec.effective_batch``)."""
    world_size: int = 1
    """Processes the run was launched with (run.json)."""
    gpu_rows: tuple[GpuRow, ...] = ()
    """A multi-GPU run's cards, rank order (ui/gpu_rows.py); empty for one GPU and for CPU runs."""
    log_lines: tuple[EventLine, ...] = ()
    log_count: int = 0
    """Lines ever logged; the event log appends those past the count it has shown."""
    events_read: int = 0


def _append(points: list, point: object, limit: int = MAX_POINTS) -> list:
    """Append in place; past ``limit``, keep every other point (the chart's x axis stays the whole run)."""
    points.append(point)
    return points[::2] if len(points) > limit else points


@dataclass
class RunTail:
    """The reader side of one run folder."""

    run_dir: Path
    vram_sampler: VramSampler | None = None
    gpus_sampler: GpusSampler | None = None
    """Asked instead of ``vram_sampler`` for a run on several GPUs."""
    _snap: dict = field(default_factory=dict)
    _train: list = field(default_factory=list)
    _eval: list = field(default_factory=list)
    _vram: list = field(default_factory=list)
    """The card's used memory as the worker recorded it in its step events."""
    _vram_live: list = field(default_factory=list)
    """The app's own samples (NVML), shown only while the run is live."""
    _recorded: dict = field(default_factory=dict)
    _ram: list = field(default_factory=list)
    _rank_peaks: tuple[float, ...] = ()
    """Each rank's highest ``rank_vram_peak_mb`` so far."""
    _run_gpus: list = field(default_factory=list)
    """run.json's ``gpus``: the cards the launch pinned, rank order."""
    _devices: Sequence[GpuInfo] = ()
    """The app's last NVML reading of every card (multi-GPU runs, while live)."""
    _log: deque = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    _log_count: int = 0
    _events: int = 0
    _last: MonitorSnapshot | None = None
    _sampled_at: float = 0.0
    _stepped: bool = False
    """A step was read since the current attempt's worker started."""
    _ended: bool = False
    """An ``end`` event was read, or the worker's death was already logged."""
    _recipe_mtime: int | None = None

    def __post_init__(self) -> None:
        self._snap = {"run_id": self.run_dir.name, "total_epochs": 0.0}
        self._read_recipe()
        self._follower = EventFollower(self.run_dir)

    def _read_recipe(self) -> None:
        """The epochs and the batch in effect from recipe.toml, read again only when the worker rewrote it."""
        try:
            mtime = (self.run_dir / RECIPE_FILE).stat().st_mtime_ns
            if mtime == self._recipe_mtime:
                return
            self._recipe_mtime = mtime
            recipe = read_run_recipe(self.run_dir)
        except Exception:  # an unreadable recipe must not hide the events
            return
        train = recipe.train
        self._snap.update(total_epochs=0.0 if train.max_steps else train.epochs,
                          micro_batch=train.micro_batch, grad_accum=train.grad_accum, devices=recipe.device_count,
                          effective_batch=recipe.effective_batch)

    def poll(self) -> MonitorSnapshot | None:
        """Read what was appended since the last call; a new snapshot, or None when nothing changed."""
        events = self._follower.read_new()
        for event in events:
            self._fold(event)
        self._events += len(events)
        self._read_recipe()
        try:
            info = read_run_info(self.run_dir)
            self._snap.update(model=info.model, state=shown_state(info), world_size=info.world_size,
                              total_steps=self._snap.get("total_steps") or info.total_steps)
            self._run_gpus = info.gpus
        except RunError:
            pass
        if self._snap.get("state") == "interrupted" and not self._ended:  # killed: no end event will come
            self._ended = True
            self._add_line(worker_gone_line(self.run_dir))
        if self._snap.get("world_size", 1) > 1:
            self._fold_gpu_rows()
        live = self.vram_sampler is not None and self._snap.get("state") not in FINAL_STATES
        live = live and self._snap.get("world_size", 1) <= 1  # several GPUs: the rows have NVML's figures
        if live and time.monotonic() - self._sampled_at >= SAMPLE_EVERY_S:
            self._sampled_at = time.monotonic()
            sample = self.vram_sampler()  # type: ignore[misc]
            if sample is not None:
                self._snap.update(vram_used_mb=sample[0], vram_total_mb=sample[1])
                self._vram_live = _append(self._vram_live, sample[0])
        if not live:  # an ended run shows its own figures, never the card's state now
            self._snap.update(vram_used_mb=self._recorded.get("used"), vram_total_mb=self._recorded.get("total"))
        snap = MonitorSnapshot(**self._snap, train_points=tuple(self._train), eval_points=tuple(self._eval),
                               vram_history=tuple(self._vram_live if live else self._vram),
                               ram_history=tuple(self._ram), log_lines=tuple(self._log),
                               log_count=self._log_count, events_read=self._events)
        if snap == self._last:
            return None
        self._last = snap
        return snap

    def _fold_gpu_rows(self) -> None:
        """A multi-GPU run's rows: NVML's cards now while it is live and the app has NVML, else what the
        run recorded (the single-GPU rule: an ended run never shows the cards' state now)."""
        live = self.gpus_sampler is not None and self._snap.get("state") not in FINAL_STATES
        if live and time.monotonic() - self._sampled_at >= SAMPLE_EVERY_S:
            self._sampled_at = time.monotonic()
            self._devices = tuple(self.gpus_sampler())  # type: ignore[misc]
        devices = self._devices if live and self._devices else None
        self._snap["gpu_rows"] = read_gpu_rows(self._run_gpus, self._rank_peaks, devices,
                                               self._recorded.get("used"), self._recorded.get("total"))

    def _fold(self, event: Event) -> None:
        s = self._snap
        if isinstance(event, StepEvent):
            s.update(step=event.step, total_steps=event.total_steps or s.get("total_steps", 0), epoch=event.epoch,
                     loss=event.loss, lr=event.lr, tokens_per_s=event.tokens_per_s, eta_s=event.eta_s)
            if self._train and self._train[-1][0] >= event.step:  # a resumed attempt: drop what it redoes
                self._train = [p for p in self._train if p[0] < event.step]
                self._eval = [p for p in self._eval if p[0] < event.step]
            self._stepped = True
            if event.loss is not None:
                self._train = _append(self._train, (event.step, event.loss))
            if event.vram_peak_mb is not None:
                s["vram_peak_mb"] = max(s.get("vram_peak_mb") or 0.0, event.vram_peak_mb)
            self._rank_peaks = merge_rank_peaks(self._rank_peaks, event.rank_vram_peak_mb)
            used = event.nvml_used_mb if event.nvml_used_mb is not None else event.vram_reserved_mb
            if used is not None:
                self._recorded.update(used=used, total=event.nvml_total_mb or self._recorded.get("total"))
                self._vram = _append(self._vram, used)
            if event.rss_mb is not None:
                peak = max(s.get("ram_peak_mb") or 0.0, event.rss_peak_mb or 0.0, event.rss_mb)
                s.update(ram_used_mb=event.rss_mb, ram_peak_mb=peak)
                self._ram = _append(self._ram, event.rss_mb)
            return
        if isinstance(event, EvalEvent) and event.eval_loss is not None:
            self._eval.append((event.step, event.eval_loss))
        elif isinstance(event, CheckpointEvent):
            s.update(checkpoint_step=event.step, checkpoint_time=event.time)
        elif isinstance(event, PhaseEvent):
            s["phase"] = event.phase
            self._ended = False  # a new attempt (a resume) is under way
            if event.phase in ATTEMPT_START_PHASES and self._stepped:  # a resumed worker: its own peak from here
                s.update(attempts=s.get("attempts", 1) + 1, ram_peak_mb=None)
                self._stepped = False
        elif isinstance(event, EndEvent):
            self._ended = True
        line = None if isinstance(event, PANEL_ONLY) else describe_event(event)
        if line is not None:
            self._add_line(line)

    def _add_line(self, line: EventLine) -> None:
        self._log.append(line)
        self._log_count += 1


def checkpoint_age(snapshot: MonitorSnapshot, now: float | None = None) -> str:
    """``step 200, 3m 05s ago``; the clock is passed in so screenshots stay the same."""
    from tui_finetune.ui.durations import format_duration

    if snapshot.checkpoint_step is None:
        return "none yet"
    age = (time.time() if now is None else now) - (snapshot.checkpoint_time or 0.0)
    return f"step {snapshot.checkpoint_step}, {format_duration(max(age, 0))} ago"
