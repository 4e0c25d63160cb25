"""``tui-finetune doctor``: everything that decides whether training will work here, on one screen.

Most failed first runs are set-up problems: a CPU build of torch next to a good GPU, a driver too
old for torch's CUDA, bitsandbytes that installs but can't load its library, a full disk. The
doctor checks each one for real (it imports the libraries and quantizes a small tensor on the GPU)
and ends with one verdict line that says what to do next. No check may raise: each failure
becomes a line of the report. It lives in engine because it imports torch and bitsandbytes;
``tui-finetune doctor`` (cli/doctor.py) renders the report.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tui_finetune.core import paths
from tui_finetune.core.events import first_line
from tui_finetune.core.gpu_allocator import describe_allocator
from tui_finetune.core.hardware import (HardwareReport, best_gpu, detect_hardware, format_gb,
                                        version_tuple)

PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "huggingface-hub", "textual",
            "bitsandbytes", "nvidia-ml-py")
LOW_DISK_BYTES = 20 * 2**30
"""A 7B base model is about 15 GB in the Hub cache, and every checkpoint adds to the runs folder."""


@dataclass(frozen=True)
class TorchStatus:
    version: str | None
    """None when torch can't be imported; ``error`` then says why."""
    cuda_build: str | None = None
    """``torch.version.cuda``: the CUDA this torch was built for, None for a CPU build."""
    cuda_available: bool = False
    error: str | None = None


@dataclass(frozen=True)
class BitsandbytesStatus:
    version: str | None
    """The installed distribution's version, None when not installed."""
    imports: bool = False
    four_bit_ok: bool = False
    """A small tensor was quantized to 4-bit on the GPU and back: QLoRA can run here."""
    message: str = ""


@dataclass(frozen=True)
class KernelsStatus:
    """The faster backends ``memory.backend = "auto"`` can use here (engine/backends.py)."""

    compiled_ok: bool = False
    """A small function compiled by torch.compile with Triton on the GPU gave eager's result."""
    compiled: str = ""
    unsloth: str = ""


@dataclass(frozen=True)
class DoctorReport:
    hardware: HardwareReport
    python: str
    os: str
    torch: TorchStatus
    packages: dict[str, str | None]
    """Distribution name -> installed version, None when missing."""
    bitsandbytes: BitsandbytesStatus
    kernels: KernelsStatus
    folders: dict[str, Path]
    """What each app folder holds -> where it is."""
    disk_free_bytes: dict[str, int | None]
    """Free space on the drive of the runs folder and of the model cache."""
    warnings: list[str] = field(default_factory=list)
    verdict: str = ""
    allocator: str = ""
    """The CUDA allocator setting our GPU processes start with (core/gpu_allocator.py), in words."""


def collect_doctor_report() -> DoctorReport:
    """Run every check once. Takes a few seconds with a GPU (torch initialises CUDA, Inductor compiles once)."""
    hardware = detect_hardware()
    torch_status = check_torch()
    bnb = check_bitsandbytes(torch_status, hardware)
    folders = {"data": paths.data_home(), "runs": paths.runs_dir(), "settings": paths.config_dir(),
               "model cache": paths.hf_cache_dir()}
    disk = {name: _free_bytes(folders[name]) for name in ("runs", "model cache")}
    warnings = list(hardware.warnings) + _torch_warnings(hardware, torch_status) + _disk_warnings(disk)
    return DoctorReport(
        hardware=hardware, python=f"{platform.python_version()} ({sys.executable})",
        os=f"{platform.system()} {platform.release()} ({platform.machine()})", torch=torch_status,
        packages={name: _dist_version(name) for name in PACKAGES}, bitsandbytes=bnb,
        kernels=check_kernels(torch_status), folders=folders,
        disk_free_bytes=disk, warnings=warnings, verdict=decide_verdict(hardware, torch_status, bnb),
        allocator=describe_allocator())


def check_torch() -> TorchStatus:
    try:
        import torch

        return TorchStatus(version=torch.__version__, cuda_build=torch.version.cuda,
                           cuda_available=bool(torch.cuda.is_available()))
    except Exception as exc:
        return TorchStatus(version=None, error=_one_line(exc))


def check_bitsandbytes(torch_status: TorchStatus, hardware: HardwareReport) -> BitsandbytesStatus:
    """Installed? Imports? Then, on a usable GPU, a real 4-bit round trip: importing alone proves little."""
    version = _dist_version("bitsandbytes")
    if version is None:
        return BitsandbytesStatus(None, message="not installed: QLoRA and 8-bit optimizers need it "
                                                "(pip install bitsandbytes)")
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:
        return BitsandbytesStatus(version, message=f"{version} is installed but fails to import: {_one_line(exc)}")
    gpu = best_gpu(hardware)
    if gpu is None or not torch_status.cuda_available:
        return BitsandbytesStatus(version, imports=True, message=f"{version} is installed and imports, but QLoRA "
                                  "needs an NVIDIA GPU that PyTorch can use")
    if not gpu.supports_qlora:
        return BitsandbytesStatus(version, imports=True, message=f"{version} imports, but {gpu.name} is too old "
                                  f"for its 4-bit kernels (compute capability {gpu.capability_text})")
    try:
        import torch

        weights = torch.randn(64, 64, device="cuda", dtype=torch.float16)
        packed, state = bnb.functional.quantize_4bit(weights, quant_type="nf4")
        error = (bnb.functional.dequantize_4bit(packed, state) - weights).abs().mean().item()
        if not error < 0.1:
            raise RuntimeError(f"4-bit round trip is off by {error:.3f} on average")
    except Exception as exc:
        return BitsandbytesStatus(version, imports=True, message=f"{version} imports, but 4-bit quantization on "
                                  f"the GPU failed: {_one_line(exc)}")
    return BitsandbytesStatus(version, imports=True, four_bit_ok=True,
                              message=f"{version}: 4-bit quantization works on the GPU")


def check_kernels(torch_status: TorchStatus) -> KernelsStatus:
    """Can ``auto`` train on the compiled backend (engine/backends.py ``AUTO_ORDER``) or on Unsloth? For the
    compiled one, a real compile on the GPU: a Triton that installs but wasn't made for this torch
    (triton-windows is pinned per torch release) fails only when it compiles. Unsloth is only looked up,
    never imported: importing it patches transformers for the whole process."""
    if not torch_status.cuda_available:
        missing: str | None = "needs an NVIDIA GPU that PyTorch can use"
    else:
        try:  # reading the card's capability starts CUDA, which can fail (a card another process holds)
            from tui_finetune.engine.kernel_support import why_no_triton

            missing = why_no_triton(has_cuda=True)
        except Exception as exc:  # noqa: BLE001 - no check may raise
            missing = f"the card couldn't be queried ({_one_line(exc)})"
    unsloth = _unsloth_line(missing)
    if missing:
        return KernelsStatus(compiled=f"not available: {missing}; training uses the PyTorch path", unsloth=unsloth)
    try:
        _compile_a_small_function_on_the_gpu()
    except Exception as exc:  # noqa: BLE001 - any failure means: auto won't use it; the reason is the report
        from tui_finetune.engine.regional_compile import compiler_error

        why = f"torch.compile failed on the GPU ({_one_line(compiler_error(exc))})"
        return KernelsStatus(compiled=f"Triton is installed, but {why}: training uses the PyTorch path",
                             unsloth=_unsloth_line(f"its kernels need the same Triton, and {why}"))
    return KernelsStatus(compiled_ok=True, unsloth=unsloth,
                         compiled="works (torch.compile with Triton on the GPU): auto compiles each decoder layer")


def _unsloth_line(no_triton: str | None) -> str:
    version = _dist_version("unsloth")
    if not version:
        return "not installed (optional: pip install 'tui-finetune[unsloth]')"
    if no_triton:
        return f"{version} installed, but not usable here: {no_triton}"
    return f"{version} installed: auto uses its kernels for the models it supports"


def _compile_a_small_function_on_the_gpu() -> None:
    """With dynamo's ``suppress_errors`` off: on (the user's TORCHDYNAMO_SUPPRESS_ERRORS, or a process where
    the compiled backend loaded), a failing compiler would run eager and pass for one that works."""
    import torch

    from tui_finetune.core.paths import inductor_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))  # where the backend puts it

    def fused(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x) * x + 1.0

    x = torch.randn(64, 64, device="cuda")
    with torch._dynamo.config.patch(suppress_errors=False), contextlib.redirect_stderr(io.StringIO()):
        compiled = torch.compile(fused, backend="inductor")(x)
    if not torch.allclose(compiled, fused(x), atol=1e-4):
        raise RuntimeError("the compiled function's result differs from eager's")


def decide_verdict(hardware: HardwareReport, torch_status: TorchStatus, bnb: BitsandbytesStatus) -> str:
    """The one line that says what to do next, most blocking problem first."""
    gpu = best_gpu(hardware)
    if gpu is None:
        return "No GPU: run the CPU demo (LoRA on the demo model; QLoRA and real models need an NVIDIA GPU)"
    driver_cuda = hardware.cuda_driver_version or "your driver's version"
    if torch_status.version is None:
        return (f"Install PyTorch to train on the {gpu.name}: pick the CUDA {driver_cuda} build (or older) "
                "at pytorch.org")
    if torch_status.cuda_build is None:
        return (f"This PyTorch is a CPU build, so the {gpu.name} sits idle: install a CUDA build for CUDA "
                f"{driver_cuda} or older from pytorch.org")
    if not torch_status.cuda_available:
        return (f"PyTorch (built for CUDA {torch_status.cuda_build}) can't reach the {gpu.name}: update the NVIDIA "
                f"driver (it supports CUDA {driver_cuda}) and restart")
    spec = f"{gpu.total_gb:.0f} GB, {'bf16' if gpu.supports_bf16 else 'fp16'}"
    if not gpu.supports_qlora:
        return f"LoRA only on {gpu.name} ({spec}): the card is too old for bitsandbytes' 4-bit QLoRA"
    if not bnb.four_bit_ok:
        return f"LoRA only on {gpu.name} ({spec}) until bitsandbytes works: {bnb.message}"
    return f"Ready for QLoRA on {gpu.name} ({spec})"


# ---------------------------------------------------------------- checks' helpers

def _torch_warnings(hardware: HardwareReport, torch_status: TorchStatus) -> list[str]:
    built, driver = version_tuple(torch_status.cuda_build), version_tuple(hardware.cuda_driver_version)
    if built and driver and built > driver and (built[0] > driver[0] or not torch_status.cuda_available):
        return [f"PyTorch was built for CUDA {torch_status.cuda_build} but the driver supports CUDA "
                f"{hardware.cuda_driver_version} at most: update the driver, or install a torch build for "
                f"CUDA {hardware.cuda_driver_version} or older."]
    return []


def _disk_warnings(disk: dict[str, int | None]) -> list[str]:
    return [f"Only {format_gb(free)} free on the drive of the {name} folder: base models take 1-15 GB each "
            "and checkpoints add more. Free some space or set TUI_FINETUNE_HOME / HF_HOME to a bigger drive."
            for name, free in disk.items() if free is not None and free < LOW_DISK_BYTES]


def _free_bytes(path: Path) -> int | None:
    """Free space on the drive that holds ``path``, which may not exist yet (a first run creates it)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _one_line(exc: BaseException) -> str:
    """``TypeName: first line`` of an import or probe failure (core/events.first_line cuts the line)."""
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
