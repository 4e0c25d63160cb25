"""PyTorch's CUDA allocator setting for the processes we start on a GPU (the training worker and its
torchrun ranks, the chat worker): expandable segments, where they are safe.

Why: our batches change shape from one micro-batch to the next (length groups of real data, the
compiled backend's graphs for each shape), and PyTorch's default caching allocator keeps a block cut for
one shape that the next cannot reuse. The memory it reserves then grows past what the tensors need:
on Gemma-2B QLoRA with real-length rows the compiled backend reserved 3.00 GiB for a 2.61 GiB peak of
tensors, 7.5% above the universal path's 2.79 at the same allocated peak (docs/verification/speed.md
section 16). That reserve is what a gaming card runs out of hours into a run. Expandable segments grow
one mapping in place instead (``cuMemMap``), so the reserve stays near the tensors; Unsloth sets the same
for its users.

Where not: Windows has no support for it (PyTorch warns and ignores it), and under WSL2 the driver's
virtual-memory calls fail on some cards (``cuMemSetAccess`` returns an unknown error at the first
allocation), so there we leave the default. A setting the user made (``PYTORCH_ALLOC_CONF``, or
``PYTORCH_CUDA_ALLOC_CONF``, which every torch we support reads) is always kept, so
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False`` turns ours off.

The setting goes into the child's environment, not into ``os.environ`` inside it: PyTorch reads it once,
when CUDA starts, and the launcher is the one place that runs before any torch. Plain Python: no torch.
"""

from __future__ import annotations

import platform
import sys
from typing import Mapping

ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""Where PyTorch reads its allocator settings (the first is the name since torch 2.9, the second every
version's)."""
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def is_wsl(kernel_release: str | None = None) -> bool:
    """Whether this Linux is WSL (its kernel release names Microsoft, e.g. ``5.15.153.1-microsoft-standard-WSL2``)."""
    release = platform.uname().release if kernel_release is None else kernel_release
    return "microsoft" in release.lower()


def expandable_segments_safe(system: str | None = None, kernel_release: str | None = None) -> bool:
    """Native Linux only: not Windows, macOS, or WSL (see the module docstring)."""
    system = sys.platform if system is None else system
    return system.startswith("linux") and not is_wsl(kernel_release)


def allocator_env(env: Mapping[str, str], system: str | None = None,
                  kernel_release: str | None = None) -> dict[str, str]:
    """``env`` for a GPU child: with expandable segments where they are safe and the user set nothing."""
    child = dict(env)
    if any(child.get(name, "").strip() for name in ALLOCATOR_VARIABLES):
        return child
    if expandable_segments_safe(system, kernel_release):
        child["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return child
