"""Before writing an export: is there room on the disk and in RAM? Say what is needed, and where.

The numbers are deliberately simple and a little generous: an export that starts must finish, and
a refusal names how much is needed, how much is free, and what to do about it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tui_finetune.core.export_spec import ExportError, ExportSpec

GIB = 1024 ** 3
BYTES_PER_PARAM = {"adapter": 0.0, "merged": 2.0, "f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 2.0 + 0.6}
"""File bytes per parameter: merged in 16-bit, GGUF f16, Q8_0 (34-byte blocks of 32); q4_k_m keeps
the f16 file it quantizes from next to the result until it is done."""


@dataclass
class Needs:
    disk_bytes: int
    ram_bytes: int


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def free_ram_bytes() -> int:
    """Memory available to a new allocation: MemAvailable on Linux, else physical free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # Windows: no sysconf; don't refuse on a guess
        return 1 << 62


def estimate_needs(spec: ExportSpec, params: int, adapter_bytes: int, stored_bytes_per_param: float) -> Needs:
    """Disk for the written files, RAM for the largest moment (a merged model plus its converted copy)."""
    if spec.target == "adapter":
        return Needs(disk_bytes=adapter_bytes * 2 + (64 << 20), ram_bytes=int(params * stored_bytes_per_param) + GIB // 2)
    model = int(params * stored_bytes_per_param)
    if spec.target == "merged":
        file_bytes = int(params * max(BYTES_PER_PARAM["merged"], stored_bytes_per_param))
        return Needs(disk_bytes=int(file_bytes * 1.05), ram_bytes=int(model * 1.3) + GIB // 2)
    file_bytes = int(params * BYTES_PER_PARAM[spec.quant])
    return Needs(disk_bytes=int(file_bytes * 1.05), ram_bytes=int(model * 1.3 + params * 2) + GIB // 2)


FP32_CHECK_MARGIN = 1.15
"""An fp32 model in RAM: 4 bytes a parameter plus the buffers and the measured replies (a measured 15.3
GiB peak RSS for a 2.5B merged export whose check ran in fp32)."""


def check_bytes_per_param(params: int, stored_bytes_per_param: float) -> int:
    """fp32 checks when the RAM has room for an fp32 copy of the model, else the stored 16-bit dtype:
    the checks then still run, with the bf16/f16 tolerances, rather than refusing a 7B export on 32 GB."""
    fp32_needs = int(params * 4 * FP32_CHECK_MARGIN) + GIB // 2
    return 4 if stored_bytes_per_param >= 4 or free_ram_bytes() >= fp32_needs else int(stored_bytes_per_param)


def check_room(spec: ExportSpec, needs: Needs, out_dir: Path) -> None:
    """Refuse before writing anything when the disk or the RAM is too small; the message has the fix."""
    disk = free_disk_bytes(out_dir)
    if disk < needs.disk_bytes:
        raise ExportError(f"export --to {spec.target} needs {needs.disk_bytes / GIB:.1f} GiB free on the disk of "
                          f"{out_dir}, and {disk / GIB:.1f} GiB is free: free some space, or pass --out DIR "
                          "on a disk with room")
    ram = free_ram_bytes()
    if ram < needs.ram_bytes:
        raise ExportError(f"export --to {spec.target} needs about {needs.ram_bytes / GIB:.1f} GiB of free RAM "
                          f"(the merged model is built in memory, never from 4-bit weights), and "
                          f"{ram / GIB:.1f} GiB is available: close other programs, or export on a machine "
                          "with more memory (the adapter export needs almost none)")
