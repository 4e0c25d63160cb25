"""One row per GPU of a multi-GPU run for the monitor's VRAM panel: the card, its memory used now, and
that rank's peak.

Where each figure comes from (docs/design.md, Several GPUs): the cards from run.json's ``gpus`` (which
cards the launch pinned, rank order), each rank's peak from the step events' ``rank_vram_peak_mb``, and
the memory used from NVML while the run is live: the app reads it (``detect_hardware().gpus``), never
torch. Once the run has ended a card's state now says nothing about the run, so the rows show what the
run recorded instead: each card's size at launch, and rank 0's last NVML figures (the step events carry
no other rank's). ``read_gpu_rows`` is a plain function of those lists, so the tests pass cards they
build. Textual-free and torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rich.text import Text

from tui_finetune.core.hardware import GpuInfo

MIB = 2**20
NAME_PREFIXES = ("NVIDIA ", "GeForce ")
"""Dropped from a card's name: every card here is NVIDIA's, and the panel is 36 cells wide at 80 columns."""
LABEL_WIDTH = 14
SMALLEST_NOTE = "* smallest card: planned for it"
"""Auto-fit and the fit-check plan every rank for the least free memory of any (engine/distributed.py)."""


@dataclass(frozen=True)
class GpuRow:
    """One rank's card: figures in MiB, None where nothing says."""

    rank: int
    index: int | None
    """NVML's index of the card (as nvidia-smi shows it); None where the launch couldn't tell."""
    name: str = ""
    used_mb: float | None = None
    total_mb: float | None = None
    peak_mb: float | None = None
    """The most torch reserved on this rank (its step events' peak, the number the planner predicts)."""
    smallest: bool = False
    """The smallest card of a set of different sizes: what the run was planned for."""

    @property
    def label(self) -> str:
        """``0 RTX 3090``: NVML's index and the short name; ``rank 1`` where the card is unknown."""
        if self.index is None:
            return f"rank {self.rank}"
        name = self.name
        for prefix in NAME_PREFIXES:
            name = name.removeprefix(prefix)
        return f"{self.index} {name}".strip()


def merge_rank_peaks(peaks: Sequence[float], new: Sequence[float] | None) -> tuple[float, ...]:
    """Each rank's highest peak so far: ``new`` (one step event's) folded in; a list of another length
    (a resume on another number of GPUs) starts again, its ranks being other cards."""
    if not new:
        return tuple(peaks)
    if len(new) != len(peaks):
        return tuple(float(p) for p in new)
    return tuple(max(old, float(p)) for old, p in zip(peaks, new))


def read_gpu_rows(run_gpus: Sequence[Mapping[str, Any]], rank_peaks: Sequence[float],
                  devices: Sequence[GpuInfo] | None, recorded_used_mb: float | None = None,
                  recorded_total_mb: float | None = None) -> tuple[GpuRow, ...]:
    """The rows for a run on ``max(len(run_gpus), len(rank_peaks))`` ranks.

    ``run_gpus``: run.json's cards; ``rank_peaks``: the ranks' peaks from the step events; ``devices``:
    NVML's cards now (a live run), or None for an ended run, whose rows show rank 0's last recorded
    ``recorded_used_mb`` / ``recorded_total_mb`` and each card's size at launch."""
    now = {gpu.index: gpu for gpu in devices or ()}
    rows = []
    for rank in range(max(len(run_gpus), len(rank_peaks))):
        card = run_gpus[rank] if rank < len(run_gpus) else {}
        index = card.get("index")
        device = now.get(index) if devices is not None and index is not None else None
        if device is not None:
            used, total = device.used_bytes / MIB, device.total_bytes / MIB
        elif devices is None and rank == 0:  # ended: what the run recorded, never the card now
            used, total = recorded_used_mb, recorded_total_mb or card.get("total_mb")
        else:
            used, total = None, card.get("total_mb")
        rows.append(GpuRow(rank=rank, index=index, name=str(card.get("name", "")), used_mb=used, total_mb=total,
                           peak_mb=rank_peaks[rank] if rank < len(rank_peaks) else None))
    return _mark_smallest(rows)


def _mark_smallest(rows: list[GpuRow]) -> tuple[GpuRow, ...]:
    """Mark the smallest card where the cards differ in size (twins have no smallest)."""
    totals = [row.total_mb for row in rows]
    if len(rows) < 2 or None in totals or max(totals) - min(totals) < 256:  # type: ignore[type-var,operator]
        return tuple(rows)
    smallest = min(rows, key=lambda row: (row.total_mb, row.rank))
    return tuple(replace(row, smallest=row is smallest) for row in rows)


def render_gpu_rows(rows: Sequence[GpuRow]) -> Text:
    """The table, 33 cells wide (the panel has 36 at 80 columns), GiB as the border title says::

        GPU            used/card   peak
        0 RTX 4090     10.1/24.0   18.2
        1 RTX 3060 *    9.9/12.0    9.8
        * smallest card: planned for it
    """
    text = Text()
    text.append(f"{'GPU':<{LABEL_WIDTH}}{'used':>5}/{'card':<5}  {'peak':>5}", style="bold")
    for row in rows:
        label = row.label[:LABEL_WIDTH - 3] + (" *" if row.smallest else "")
        text.append(f"\n{label:<{LABEL_WIDTH}}{_gib(row.used_mb):>5}/{_gib(row.total_mb):<5}  ")
        text.append(f"{_gib(row.peak_mb):>5}", style="magenta")
    if any(row.smallest for row in rows):
        text.append(f"\n{SMALLEST_NOTE}", style="dim")
    return text


def _gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"
