"""Find the NVIDIA GPUs, their memory and their driver, through NVML (the nvidia-ml-py package).

NVML is the library behind ``nvidia-smi``: it answers in milliseconds and never creates a CUDA
context, so the wizard can ask before torch is even imported, and it sees memory held by other
programs (a game, a browser, another AI tool), which torch can't. This module is plain Python:
it must not import torch or textual.

Nothing here raises. A machine without a driver, a library or a GPU gets a ``HardwareReport``
whose ``problem`` says so in plain words, because a hobbyist's first run must never be a traceback.
NVML counts GPUs in PCI bus order, which can differ from CUDA's order and ignores
``CUDA_VISIBLE_DEVICES``: use ``index`` for display, not as a torch device number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from tui_finetune.core.recipe_machine import MachineFacts

GIB = 2**30
BF16_MIN_CAPABILITY = (8, 0)
"""Ampere (RTX 30-series) and newer have bf16; older cards train in fp16."""
QLORA_MIN_CAPABILITY = (6, 0)
"""bitsandbytes' README (0.50): NVIDIA SM60+ minimum for its 4-bit and 8-bit kernels."""
QLORA_FAST_CAPABILITY = (7, 0)
"""Below this a card has no tensor cores: fp16 matmuls (and so QLoRA) crawl. bitsandbytes recommends 7.5+."""
MIN_CUDA_DRIVER = (12, 0)
"""Current PyTorch CUDA builds are CUDA 12.x or newer; an older driver can't run them at all."""
OTHER_PROCESS_WARN_BYTES = 500 * 2**20
"""Above this, memory held by other programs visibly shrinks what fits on a hobby card."""
NO_GPU = "No NVIDIA GPU found: training will run on the CPU and only the demo model is practical"


@dataclass(frozen=True)
class GpuProcess:
    """A program using the GPU; ``used_bytes`` is None where NVML can't tell (Windows WDDM)."""

    pid: int
    used_bytes: int | None
    name: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    """NVML's index (PCI bus order), as nvidia-smi shows it."""
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]
    processes: tuple[GpuProcess, ...] = ()
    """Other programs on this GPU (our own process is left out)."""

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= BF16_MIN_CAPABILITY

    @property
    def supports_qlora(self) -> bool:
        """Whether bitsandbytes' 4-bit kernels run on this card at all."""
        return self.compute_capability >= QLORA_MIN_CAPABILITY

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def other_pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.processes)

    @property
    def other_process_bytes(self) -> int:
        """Memory other programs hold, summed over those whose usage NVML reports."""
        return sum(p.used_bytes or 0 for p in self.processes)

    @property
    def other_process_bytes_known(self) -> bool:
        return all(p.used_bytes is not None for p in self.processes)

    @property
    def capability_text(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


@dataclass(frozen=True)
class HardwareReport:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    """The newest CUDA the driver supports, e.g. "13.0" (what nvidia-smi shows top right)."""
    problem: str | None = None
    """Why there is no usable GPU, in plain words; None when at least one GPU was found."""
    warnings: list[str] = field(default_factory=list)


def detect_hardware(nvml: ModuleType | Any = None) -> HardwareReport:
    """Ask NVML about every NVIDIA GPU. ``nvml`` lets tests pass a fake module instead of pynvml."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return HardwareReport(problem=f"{NO_GPU} (the nvidia-ml-py package is missing: pip install nvidia-ml-py).")
    error = getattr(nvml, "NVMLError", OSError)
    try:
        nvml.nvmlInit()
    except (error, OSError) as exc:
        return HardwareReport(problem=f"{NO_GPU} ({_explain_init_failure(nvml, exc)}).")
    try:
        return _read_all(nvml, error)
    except Exception as exc:  # a broken driver must not become a traceback in the doctor or the wizard
        return HardwareReport(problem=f"{NO_GPU} (reading the GPUs failed: {exc}).")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def best_gpu(report: HardwareReport) -> GpuInfo | None:
    """The GPU to train on: most memory, then newest architecture, then lowest index."""
    if not report.gpus:
        return None
    return max(report.gpus, key=lambda g: (g.total_bytes, g.compute_capability, -g.index))


def machine_facts(report: HardwareReport, bitsandbytes_ok: bool | None = None) -> MachineFacts:
    """Facts for ``check_recipe_fits_machine`` about the best GPU (or the CPU when there is none).

    ``bitsandbytes_ok`` is what the caller learned by importing bitsandbytes (core can't: it pulls
    in torch); when None, only the card's compute capability decides.
    """
    gpu = best_gpu(report)
    if gpu is None:
        return MachineFacts(has_cuda=False, supports_bf16=False, bitsandbytes_ok=False, device_name="CPU")
    bnb = gpu.supports_qlora if bitsandbytes_ok is None else (bitsandbytes_ok and gpu.supports_qlora)
    return MachineFacts(has_cuda=True, supports_bf16=gpu.supports_bf16, bitsandbytes_ok=bnb, device_name=gpu.name)


def a_card_of(gb: float) -> str:
    """``a 6 GB card``, ``an 8 GB card``, ``an 11 GB card``: the article as the number is spoken."""
    spoken_vowel = f"{gb:g}".startswith("8") or f"{gb:g}".split(".")[0] in ("11", "18")
    return f"{'an' if spoken_vowel else 'a'} {gb:g} GB card"


def format_gb(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.1f} GB"


# ---------------------------------------------------------------- reading NVML

def _read_all(nvml: Any, error: type[BaseException]) -> HardwareReport:
    def ask(fn: Callable[..., Any], *args: Any) -> Any:
        """One optional NVML question: None where the driver doesn't support it."""
        try:
            return fn(*args)
        except error:
            return None

    driver = _text(ask(nvml.nvmlSystemGetDriverVersion))
    cuda = _cuda_version_text(ask(nvml.nvmlSystemGetCudaDriverVersion))
    gpus: list[GpuInfo] = []
    warnings: list[str] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            gpus.append(_read_gpu(nvml, index, ask))
        except error as exc:
            warnings.append(f"GPU {index} could not be read ({exc}): it is left out.")
    warnings += _driver_warnings(driver, cuda) + [w for gpu in gpus for w in _gpu_warnings(gpu)]
    problem = None if gpus else f"{NO_GPU} (the driver is installed but reports no usable GPU)."
    return HardwareReport(gpus=gpus, driver_version=driver, cuda_driver_version=cuda, problem=problem,
                          warnings=warnings)


def _read_gpu(nvml: Any, index: int, ask: Callable[..., Any]) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(index=index, name=_text(nvml.nvmlDeviceGetName(handle)) or f"GPU {index}",
                   total_bytes=int(memory.total), used_bytes=int(memory.used), free_bytes=int(memory.free),
                   compute_capability=(int(major), int(minor)), processes=_read_processes(nvml, handle, ask))


def _read_processes(nvml: Any, handle: Any, ask: Callable[..., Any]) -> tuple[GpuProcess, ...]:
    """Compute and graphics programs, one entry per pid (a game can be both), our own pid left out."""
    by_pid: dict[int, int | None] = {}
    for fn in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in ask(fn, handle) or []:
            pid, used = int(proc.pid), getattr(proc, "usedGpuMemory", None)
            if pid == os.getpid():
                continue
            if pid not in by_pid or (used is not None and used > (by_pid[pid] or 0)):
                by_pid[pid] = None if used is None else int(used)
    get_name = getattr(nvml, "nvmlSystemGetProcessName", None)
    return tuple(GpuProcess(pid=pid, used_bytes=used, name=_process_name(ask(get_name, pid)) if get_name else None)
                 for pid, used in sorted(by_pid.items()))


def _explain_init_failure(nvml: Any, exc: BaseException) -> str:
    reasons = (
        ("NVMLError_LibraryNotFound", "the NVIDIA driver is not installed, or its NVML library is missing"),
        ("NVMLError_DriverNotLoaded", "the NVIDIA driver is installed but not running: restart, then try nvidia-smi"),
        ("NVMLError_NoPermission", "no permission to talk to the NVIDIA driver"),
    )
    for name, reason in reasons:
        cls = getattr(nvml, name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return reason
    if isinstance(exc, OSError):
        return f"the NVIDIA driver library could not be loaded: {exc}"
    return f"the NVIDIA driver did not answer: {exc}"


# ---------------------------------------------------------------- plain-words warnings

def _driver_warnings(driver: str | None, cuda: str | None) -> list[str]:
    version = version_tuple(cuda)
    if version is None or version >= MIN_CUDA_DRIVER:
        return []
    return [f"The NVIDIA driver ({driver or 'unknown version'}) supports CUDA {cuda} at most; PyTorch needs "
            f"CUDA {MIN_CUDA_DRIVER[0]}.{MIN_CUDA_DRIVER[1]} or newer for the GPU, bf16 and the QLoRA kernels: "
            "install the latest Game Ready or Studio driver from nvidia.com."]


def _gpu_warnings(gpu: GpuInfo) -> list[str]:
    label = f"GPU {gpu.index} ({gpu.name}, compute capability {gpu.capability_text})"
    warnings = []
    if not gpu.supports_qlora:
        warnings.append(f"{label} is too old for bitsandbytes (6.0 or newer needed): QLoRA and 8-bit optimizers "
                        "won't run on it; use method = 'lora' with optimizer = 'adamw_torch'.")
    elif gpu.compute_capability < QLORA_FAST_CAPABILITY:
        warnings.append(f"{label} has no tensor cores: QLoRA runs but slowly (bitsandbytes recommends 7.5 or "
                        "newer, an RTX 20-series or later).")
    held = gpu.other_process_bytes if gpu.other_process_bytes_known else max(gpu.other_process_bytes, gpu.used_bytes)
    if gpu.processes and held > OTHER_PROCESS_WARN_BYTES:
        who = ", ".join(f"{p.name} (pid {p.pid})" if p.name else f"pid {p.pid}" for p in gpu.processes[:5])
        amount = format_gb(held) if gpu.other_process_bytes_known else f"up to {format_gb(held)}"
        warnings.append(f"Other programs hold {amount} of GPU {gpu.index}'s memory ({who}): close games, "
                        "browsers or other AI tools to leave more room for training.")
    return warnings


# ---------------------------------------------------------------- small converters

def _text(value: Any) -> str | None:
    """NVML strings: old pynvml returns bytes, nvidia-ml-py returns str."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip() or None


def _process_name(value: Any) -> str | None:
    """``/usr/bin/python3`` or ``C:\\Games\\game.exe`` -> the file name alone."""
    text = _text(value)
    return text.replace("\\", "/").rsplit("/", 1)[-1] if text else None


def _cuda_version_text(value: Any) -> str | None:
    """NVML's 13000 -> "13.0", 12080 -> "12.8"."""
    if not isinstance(value, int) or value <= 0:
        return None
    return f"{value // 1000}.{value % 1000 // 10}"


def version_tuple(text: str | None) -> tuple[int, int] | None:
    """"12.8" -> (12, 8), for comparing CUDA versions; None when unknown."""
    try:
        major, minor = (text or "").split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def machine_ram_bytes() -> int | None:
    """The machine's physical RAM (POSIX sysconf); None where it can't be read (Windows)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
