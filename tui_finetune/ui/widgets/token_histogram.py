"""Token lengths of the dataset as horizontal bars, with the sequence-length cutoff marked."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text
from textual.widgets import Static

LABEL_CELLS = 13
"""``{low:>6}-{high:<6}``: the bucket's label before its bar."""
MAX_BAR_CELLS = 30
MIN_BAR_CELLS = 4


class TokenHistogram(Static):
    DEFAULT_CSS = """
    TokenHistogram { height: auto; }
    """

    def show(self, lengths: dict | None, seq_len: int) -> None:
        self.update(FittedHistogram(lengths, seq_len))


@dataclass(frozen=True)
class FittedHistogram:
    """The histogram drawn to the width it is given: at 80 columns the dataset screen's right pane is
    narrower than 30 bar cells plus the label and the count, and a wrapped count reads as a bucket."""

    lengths: dict | None
    seq_len: int

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render_histogram(self.lengths, self.seq_len, bar_cells_for(self.lengths, options.max_width))


def bar_cells_for(lengths: dict | None, width: int) -> int:
    """The longest bar that leaves room for its label and its count on one line of ``width`` cells."""
    counts = [b[2] for b in (lengths or {}).get("histogram", [])] or [0]
    room = width - LABEL_CELLS - 1 - len(str(max(counts)))
    return max(MIN_BAR_CELLS, min(MAX_BAR_CELLS, room))


def render_histogram(lengths: dict | None, seq_len: int, width: int = MAX_BAR_CELLS) -> Text:
    if not lengths:
        return Text("no token lengths (no usable rows)", style="dim")
    rows = [b for b in lengths["histogram"] if b[2]] or lengths["histogram"][:1]
    peak = max(b[2] for b in rows) or 1
    text = Text()
    for low, high, count in rows:
        over = low >= seq_len
        text.append(f"{low:>6}-{high:<6}", style="red" if over else "")
        text.append("█" * max(1, round(count / peak * width)) if count else "", style="red" if over else "cyan")
        text.append(f" {count}\n")
    over = lengths["over"]
    text.append(f"cutoff {seq_len} tokens: ", style="bold")
    text.append(f"{over} of {lengths['count']} examples longer (truncated)" if over else "every example fits",
                style="yellow" if over else "green")
    text.append(f" · min {lengths['min']} · mean {lengths['mean']:.0f} · max {lengths['max']}")
    return text
