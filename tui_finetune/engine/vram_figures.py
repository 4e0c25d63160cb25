"""VRAM figures for step events: what torch holds in this process, and what the whole card uses.

torch's reserved/peak numbers are what the planner predicts; NVML's used/total is what the user sees
in nvidia-smi (other programs and the CUDA context included). Both are cheap enough to read every
logged step. On the CPU every figure is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

MB = 1024 * 1024


@dataclass
class VramFigures:
    reserved_mb: float | None = None
    peak_mb: float | None = None
    nvml_used_mb: float | None = None
    nvml_total_mb: float | None = None


@lru_cache(maxsize=1)
def _nvml_handle() -> Any:
    """The NVML handle of the card torch uses, or None where NVML is missing or broken. Found by its UUID:
    torch's device number counts only the visible cards (a run pinned to NVML's GPU 1 calls it cuda:0)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
        except Exception:  # noqa: BLE001 - an older driver or torch without the UUID: the index, as before
            return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - NVML is optional: no figures is better than no training
        return None


def read_vram() -> VramFigures:
    if not torch.cuda.is_available():
        return VramFigures()
    figures = VramFigures(reserved_mb=torch.cuda.memory_reserved() / MB,
                          peak_mb=torch.cuda.max_memory_reserved() / MB)
    handle = _nvml_handle()
    if handle is not None:
        try:
            import pynvml

            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            figures.nvml_used_mb, figures.nvml_total_mb = info.used / MB, info.total / MB
        except Exception:  # noqa: BLE001
            pass
    return figures


def phase_peak_gib() -> float | None:
    """The most VRAM torch reserved since the last ``reset_phase_peak``, in GiB; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_reserved() / 1024**3, 3)


def reset_phase_peak() -> None:
    """Start a new phase's peak: the step events' peak and ``phase_peak_gib`` count from here."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
