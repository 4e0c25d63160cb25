"""The monitor's memory panel: the card's total and used memory, this run's peak, and a sparkline over time.

Figures come from the run's step events (the worker samples NVML and torch) or, while the run is live
and the app has NVML, from its own sampler. A CPU run has no card: the panel shows the worker's RAM
(its RSS, from the step events) against the machine's RAM instead; on a multi-process CPU run that is rank
0's (the events carry no other rank's RAM). A run on several GPUs shows one row per card instead of the
bar (ui/gpu_rows.py): NVML's used and total while it is live, and each rank's peak.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from tui_finetune.core.hardware import machine_ram_bytes
from tui_finetune.ui.gpu_rows import render_gpu_rows
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
        if snap.gpu_rows:
            self.show_gpus(snap)
            return
        if snap.vram_total_mb is None and snap.vram_used_mb is None and snap.vram_peak_mb is None:
            if snap.ram_used_mb is not None:
                self.show_ram(snap)
            return
        total = (snap.vram_total_mb or 0) / 1024
        used = (snap.vram_used_mb or 0) / 1024
        peak = (snap.vram_peak_mb or 0) / 1024
        caption.update(f"card {total:.1f} GiB · used {used:.1f} GiB · this run's peak {peak:.1f} GiB")
        self.query_one(VramBar).show([Segment("used", used, "cyan"),
                                      Segment("peak above now", max(peak - used, 0), "magenta")],
                                     total or max(used, peak), legend=False)
        self.query_one(Sparkline).data = list(snap.vram_history[-120:])

    def show_gpus(self, snap: MonitorSnapshot) -> None:
        """A run on several GPUs: a row per card in place of the one card's bar and sparkline."""
        self.border_title = f"VRAM (GiB) · {len(snap.gpu_rows)} GPUs"
        self.query_one("#vram-caption", Static).update(render_gpu_rows(snap.gpu_rows))
        self.query_one(VramBar).display = False
        self.query_one(Sparkline).display = False

    def show_ram(self, snap: MonitorSnapshot) -> None:
        """A CPU run: the worker's RSS now and at its peak, against the machine's RAM."""
        self.border_title = "RAM (CPU run)" if snap.world_size <= 1 else f"RAM (CPU run, {snap.world_size} processes)"
        used = (snap.ram_used_mb or 0) / 1024
        peak = max(snap.ram_peak_mb or 0, snap.ram_used_mb or 0) / 1024
        machine = (machine_ram_bytes() or 0) / 2**30
        of = f" of {machine:.1f} GiB" if machine else ""
        which = "peak" if snap.attempts == 1 else "this attempt's peak"  # each attempt is a worker of its own
        whose = "worker" if snap.world_size <= 1 else "rank 0"  # the step events carry rank 0's RSS alone
        self.query_one("#vram-caption", Static).update(f"{whose} RAM {used:.1f} GiB · {which} {peak:.1f} GiB{of}")
        self.query_one(VramBar).show([Segment("used", used, "cyan"),
                                      Segment("peak above now", max(peak - used, 0), "magenta")],
                                     machine or peak, legend=False)
        self.query_one(Sparkline).data = list(snap.ram_history[-120:])
