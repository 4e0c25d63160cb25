"""What this machine can run beyond plain PyTorch: the kernel packages installed, the card's compute
capability, and Triton, which the compiled, Liger and Unsloth backends need.

engine/backends.py decides with these and the doctor (engine/doctor.py) reports them, so the reason a run
gives for training on the PyTorch path and the line the doctor prints are the same sentence. Callers look the
functions up on this module (``kernel_support.module_installed``), so a test can stand in for a GPU box.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

import torch

TRITON_MIN_CAPABILITY = (7, 0)
"""Triton needs a Volta or newer card; GTX 10xx cards are 6.1."""


def module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def why_no_triton(has_cuda: bool) -> str | None:
    """Why Triton's kernels can't run here, with what to do where there is something to do; None when they can."""
    capability = cuda_capability() if has_cuda else None  # the CPU path never starts CUDA
    if capability is None:
        return "needs an NVIDIA GPU"
    if capability < TRITON_MIN_CAPABILITY:
        return f"needs compute capability 7.0 or newer for Triton (this card is {capability[0]}.{capability[1]})"
    if not module_installed("triton"):
        if sys.platform == "win32":
            return f"Triton is not installed (on Windows: pip install {triton_windows_requirement()})"
        return "Triton is not installed"
    return None


def triton_windows_requirement() -> str:
    """The triton-windows release for this torch, as a pip requirement. torch's own metadata names the Triton
    it was built with (``triton==3.7.1; platform_system == "Linux"``, Windows wheels included), and
    triton-windows follows Triton's minor versions; one made for another torch fails when it compiles."""
    try:
        requirements = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        found = re.match(r"triton\s*==\s*(\d+)\.(\d+)", requirement)
        if found:
            major, minor = int(found[1]), int(found[2])
            return f'"triton-windows>={major}.{minor},<{major}.{minor + 1}"'
    return "triton-windows"
