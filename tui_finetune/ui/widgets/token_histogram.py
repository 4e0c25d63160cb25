"""Token lengths of the dataset as horizontal bars, with the sequence-length cutoff marked."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class TokenHistogram(Static):
    DEFAULT_CSS = """
    TokenHistogram { height: auto; }
    """

    def show(self, lengths: dict | None, seq_len: int) -> None:
        self.update(render_histogram(lengths, seq_len))


def render_histogram(lengths: dict | None, seq_len: int, width: int = 30) -> Text:
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
