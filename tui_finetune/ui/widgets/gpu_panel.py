"""One GPU as the hardware screen shows it: name, memory bar (others / free), bf16 and driver."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from tui_finetune.core.hardware import GIB, GpuInfo, HardwareReport
from tui_finetune.ui.widgets.vram_bar import Segment, VramBar


class GpuPanel(Vertical):
    DEFAULT_CSS = """
    GpuPanel { height: auto; border: round $primary; padding: 0 1; margin-bottom: 1; }
    GpuPanel > .gpu-facts { height: auto; }
    """

    def __init__(self, gpu: GpuInfo, report: HardwareReport) -> None:
        super().__init__()
        self.gpu, self.report = gpu, report
        self.border_title = f"GPU {gpu.index}: {gpu.name}"

    def compose(self) -> ComposeResult:
        gpu = self.gpu
        facts = Text()
        facts.append(f"{gpu.total_bytes / GIB:.1f} GiB", style="bold")
        facts.append(f" · compute {gpu.capability_text} · ")
        facts.append("bf16 yes" if gpu.supports_bf16 else "bf16 no (fp16 instead)",
                     style="green" if gpu.supports_bf16 else "yellow")
        facts.append(f" · driver {self.report.driver_version or '?'} (CUDA {self.report.cuda_driver_version or '?'})")
        yield Static(facts, classes="gpu-facts")
        yield VramBar(id=f"gpu-bar-{gpu.index}")

    def on_mount(self) -> None:
        gpu = self.gpu
        others = (gpu.other_process_bytes if gpu.other_process_bytes_known else gpu.used_bytes) / GIB
        self.query_one(VramBar).show([Segment("used by others", others, "red"),
                                      Segment("free", gpu.free_bytes / GIB, "green")], gpu.total_bytes / GIB)
