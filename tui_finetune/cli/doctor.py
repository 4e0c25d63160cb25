"""``tui-finetune doctor``: the doctor's report (engine/doctor.py probes) as one grid on the terminal."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tui_finetune.core.hardware import GpuInfo, format_gb
from tui_finetune.engine.doctor import DoctorReport, collect_doctor_report


def run_doctor_command(args: argparse.Namespace | None = None) -> int:
    """Print the report. Exits 0 even on a CPU machine: the doctor informs, the verdict says what to do."""
    console = Console()
    with console.status("Checking GPUs, PyTorch, bitsandbytes and Triton..."):
        report = collect_doctor_report()
    console.print(render_doctor_report(report))
    return 0


def render_doctor_report(report: DoctorReport) -> Table:
    """One grid, one titled section after another, plain enough to paste into a bug report."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    def section(title: str, rows: list[tuple[str, str]], style: str = "") -> None:
        grid.add_row(Text(title, style="bold underline"), "")
        for key, value in rows:
            grid.add_row(Text(key), Text(value, style=style))
        grid.add_row("", "")

    hw = report.hardware
    gpu_rows = [(f"GPU {g.index}", _describe_gpu(g)) for g in hw.gpus] or [("none", hw.problem or "")]
    section("GPUs", gpu_rows)
    section("Driver", [("NVIDIA driver", hw.driver_version or "not found"),
                       ("CUDA (driver)", hw.cuda_driver_version or "unknown")])
    torch = report.torch
    torch_line = (f"{torch.version}, CUDA build {torch.cuda_build or 'none (CPU build)'}, "
                  f"GPU usable: {'yes' if torch.cuda_available else 'no'}" if torch.version
                  else f"not working: {torch.error}")
    packages = [(name, version or "not installed") for name, version in report.packages.items()
                if name not in ("torch", "bitsandbytes")]
    section("Software", [("Python", report.python), ("OS", report.os), ("torch", torch_line), *packages,
                         ("CUDA allocator", report.allocator)])
    section("bitsandbytes", [("status", report.bitsandbytes.message)])
    section("Faster kernels", [("compiled", report.kernels.compiled), ("Unsloth", report.kernels.unsloth)])
    folders = [(name, str(path)) for name, path in report.folders.items()]
    disk = [(f"free ({name})", format_gb(free) if free is not None else "unknown")
            for name, free in report.disk_free_bytes.items()]
    section("Folders", folders + disk)
    if report.warnings:
        section("Warnings", [("!", w) for w in report.warnings], style="yellow")
    grid.add_row(Text("Verdict", style="bold"), Text(report.verdict, style="bold green"))
    return grid


def _describe_gpu(gpu: GpuInfo) -> str:
    text = (f"{gpu.name}: {format_gb(gpu.total_bytes)} total, {format_gb(gpu.free_bytes)} free; "
            f"compute capability {gpu.capability_text}; bf16 {'yes' if gpu.supports_bf16 else 'no'}")
    if gpu.processes:
        held = format_gb(gpu.other_process_bytes) if gpu.other_process_bytes_known else "unknown memory"
        text += f"; other programs: {len(gpu.processes)} holding {held}"
    return text
