"""PyTorch's CUDA allocator setting for the processes that put a model on the GPU (the training worker and
its torchrun ranks, the chat worker, the CLI's ``chat``): expandable segments, where they are safe.

Why: our batches change shape from one micro-batch to the next (length groups of real data, the compiled
backend's graph for each shape), and PyTorch's default caching allocator keeps blocks cut for one shape that
the next cannot reuse, so the memory it reserves grows past what the tensors need. Measured on Gemma-2B
QLoRA with real-length rows on the compiled backend: the reserve fell from 2.96-3.00 GiB to 2.71 at the same
tensors (docs/verification/speed.md section 16). Expandable segments grow one mapping in place instead
(``cuMemMap``), so the reserve stays near the tensors; Unsloth sets the same for its users.

Where not: Windows has no support for it (PyTorch warns and ignores it), and under WSL2 the driver's
virtual-memory calls fail on some cards (``cuMemSetAccess`` returns an unknown error at the first
allocation), so there we leave the default. A setting the user made (``PYTORCH_ALLOC_CONF``, or
``PYTORCH_CUDA_ALLOC_CONF``, which every torch we support reads) is always kept, so
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False`` turns ours off.

PyTorch reads the setting once, when CUDA starts in a process: so it goes into a child's environment at
launch (``allocator_env``), or into this process's before anything imports torch (``apply_here``).
Plain Python: no torch.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

ALLOCATOR_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
"""The variable we set: every torch we support reads it."""
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", ALLOCATOR_VARIABLE)
"""Where PyTorch reads its allocator settings (the first is the name since torch 2.9, read before the second)."""
EXPANDABLE_SEGMENTS = "expandable_segments:True"
WSL_VARIABLES = ("WSL_DISTRO_NAME", "WSL_INTEROP")
"""Set by WSL in every process it starts, whatever kernel the user built."""


def is_wsl(kernel_release: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Whether this Linux is WSL: its kernel release names Microsoft (``5.15.153.1-microsoft-standard-WSL2``)
    or WSL's own variables are set (a custom kernel)."""
    release = platform.uname().release if kernel_release is None else kernel_release
    env = os.environ if env is None else env
    return "microsoft" in release.lower() or any(name in env for name in WSL_VARIABLES)


def expandable_segments_safe(system: str | None = None, kernel_release: str | None = None,
                             env: Mapping[str, str] | None = None) -> bool:
    """Native Linux only: not Windows, macOS, or WSL (see the module docstring)."""
    system = sys.platform if system is None else system
    return system.startswith("linux") and not is_wsl(kernel_release, env)


def user_setting(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The allocator variable the user set, and its value (an empty one is no setting)."""
    for name in ALLOCATOR_VARIABLES:
        if env.get(name, "").strip():
            return name, env[name]
    return None


def allocator_in_use(env: Mapping[str, str] | None = None) -> str | None:
    """``NAME=value`` of the allocator setting a process runs with (ours or the user's), or None: the default."""
    found = user_setting(os.environ if env is None else env)
    return "=".join(found) if found else None


def describe_allocator(env: Mapping[str, str] | None = None) -> str:
    """What our training and chat processes will run with here, in words (``tui-finetune doctor``)."""
    env = os.environ if env is None else env
    if yours := allocator_in_use(env):
        return f"yours: {yours}"
    if expandable_segments_safe(env=env):
        return f"expandable segments, set for training and chat ({ALLOCATOR_VARIABLE}={EXPANDABLE_SEGMENTS})"
    return "PyTorch's default (expandable segments are not used on Windows, macOS or WSL)"


def allocator_env(env: Mapping[str, str], system: str | None = None,
                  kernel_release: str | None = None) -> dict[str, str]:
    """``env`` for a GPU child: with expandable segments where they are safe and the user set nothing."""
    child = dict(env)
    if user_setting(child) is not None or not expandable_segments_safe(system, kernel_release, child):
        return child
    for name in ALLOCATOR_VARIABLES:  # an empty one could shadow ours (torch reads the first name first)
        child.pop(name, None)
    child[ALLOCATOR_VARIABLE] = EXPANDABLE_SEGMENTS
    return child


def apply_here() -> None:
    """Give this process the setting a child would get; call before anything imports torch (the CLI's chat)."""
    wanted = allocator_env(os.environ)
    for name in ALLOCATOR_VARIABLES:  # allocator_env may have dropped an empty one
        os.environ.pop(name, None)
    os.environ.update(wanted)
