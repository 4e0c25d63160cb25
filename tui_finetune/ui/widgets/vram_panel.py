"""The monitor's VRAM panel: the card's total and used memory, this run's peak, and a sparkline over time.

Figures come from the run's step events (the worker samples NVML and torch) or, where the app has
NVML, from its own sampler; on the CPU there are none and the panel says so.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from tui_finetune.ui.run_tail import MonitorSnapshot
from tui_finetune.ui.widgets.vram_bar import Segment, VramBar


class VramPanel(Vertical):
    DEFAULT_CSS = """
    VramPanel { height: auto; border: round $primary; padding: 0 1; }
    VramPanel Sparkline { height: 2; margin-top: 1; }
    """

    def compose(self) -> ComposeResult:
        self.border_title = "VRAM"
        yield Static("no GPU figures (CPU run, or no step yet)", id="vram-caption")
        yield VramBar(id="vram-bar")
        yield Sparkline([], id="vram-spark")

    def show(self, snap: MonitorSnapshot) -> None:
        caption = self.query_one("#vram-caption", Static)
        if snap.vram_total_mb is None and snap.vram_used_mb is None and snap.vram_peak_mb is None:
            return
        total = (snap.vram_total_mb or 0) / 1024
        used = (snap.vram_used_mb or 0) / 1024
        peak = (snap.vram_peak_mb or 0) / 1024
        caption.update(f"card {total:.1f} GiB · used {used:.1f} GiB · this run's peak {peak:.1f} GiB")
        self.query_one(VramBar).show([Segment("used", used, "cyan"),
                                      Segment("peak above now", max(peak - used, 0), "magenta")],
                                     total or max(used, peak), legend=False)
        self.query_one(Sparkline).data = list(snap.vram_history[-120:])
