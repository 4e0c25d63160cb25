"""A horizontal memory bar: coloured segments against a total, with a legend underneath.

The hardware screen (used by others / free), the recipe screen (the planner's parts against the
card) and the monitor (used / this run's peak) all draw memory the same way, so one widget does it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

PART_STYLES = ("magenta", "cyan", "blue", "yellow", "bright_magenta", "bright_cyan", "bright_blue", "white")


@dataclass(frozen=True)
class Segment:
    label: str
    gib: float
    style: str


def render_bar(segments: list[Segment], total_gib: float, width: int, legend: bool = True) -> Text:
    """Segments scaled to ``width`` cells against ``total_gib``; what runs past the total is drawn red."""
    scale = max(total_gib, sum(s.gib for s in segments), 1e-9)
    text = Text()
    used_cells = 0
    for seg in segments:
        cells = round(seg.gib / scale * width)
        cells = min(cells, width - used_cells)
        text.append("█" * cells, style=seg.style)
        used_cells += cells
    limit = round(total_gib / scale * width)
    if used_cells < limit:
        text.append("░" * (limit - used_cells), style="dim")
    elif used_cells > limit:  # the over-the-card part: mark where the card ends
        text.stylize("red", limit, used_cells)
    text.append(" " * max(0, width - max(limit, used_cells)))
    if legend:
        text.append("\n")
        for seg in segments:
            text.append("■ ", style=seg.style)
            text.append(f"{seg.label} {seg.gib:.1f}  ")
        text.append(f"of {total_gib:.1f} GiB", style="bold")
    return text


class VramBar(Static):
    """Call ``show(segments, total_gib)``; the bar redraws to the widget's width."""

    DEFAULT_CSS = """
    VramBar { height: auto; min-height: 2; width: 1fr; }
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._segments: list[Segment] = []
        self._total = 0.0
        self._legend = True

    def show(self, segments: list[Segment], total_gib: float, legend: bool = True) -> None:
        self._segments, self._total, self._legend = list(segments), total_gib, legend
        self.refresh(layout=True)

    def render(self) -> Text:
        if self._total <= 0 and not self._segments:
            return Text("no memory figures yet", style="dim")
        return render_bar(self._segments, self._total, max(10, self.size.width), self._legend)
