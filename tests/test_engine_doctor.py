"""The doctor runs for real on this machine; its verdict logic is also checked for GPU machines."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
from rich.console import Console

from tui_finetune.core.gpu_allocator import describe_allocator
from tui_finetune.core.hardware import GIB, GpuInfo, HardwareReport, detect_hardware
from tui_finetune.cli.doctor import render_doctor_report
from tui_finetune.engine import doctor
from tui_finetune.engine.doctor import (BitsandbytesStatus, TorchStatus, _disk_warnings, _torch_warnings,
                                        check_kernels, collect_doctor_report, decide_verdict)

HAS_GPU = bool(detect_hardware().gpus)
SECTIONS = ("GPUs", "Driver", "Software", "bitsandbytes", "Faster kernels", "Folders", "Verdict")


def _render(report) -> str:
    console = Console(record=True, width=240, color_system=None)
    console.print(render_doctor_report(report))
    return console.export_text()


@pytest.fixture
def cpu_report(monkeypatch, tmp_path):
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path))
    return collect_doctor_report(), tmp_path


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only verdict")
def test_doctor_on_this_cpu_machine_reports_every_section_and_the_cpu_verdict(cpu_report):
    report, home = cpu_report
    assert report.hardware.gpus == [] and report.hardware.problem.startswith("No NVIDIA GPU found")
    assert report.torch.cuda_build is None and report.torch.cuda_available is False
    assert report.bitsandbytes.imports and not report.bitsandbytes.four_bit_ok
    assert "needs an NVIDIA GPU" in report.bitsandbytes.message
    assert not report.kernels.compiled_ok and "needs an NVIDIA GPU" in report.kernels.compiled
    assert report.verdict.startswith("No GPU: run the CPU demo")
    text = _render(report)
    for section in SECTIONS:
        assert section in text
    assert str(home / "runs") in text and "No GPU: run the CPU demo" in text


def test_doctor_lists_versions_folders_and_free_disk(cpu_report):
    report, home = cpu_report
    import torch

    assert report.torch.version == torch.__version__ and report.torch.error is None
    for name in ("transformers", "peft", "datasets", "textual"):  # None where it is missing (a bare GPU image)
        assert report.packages[name] == _installed_version(name)
    assert report.packages["transformers"], "the engine's own dependency is installed wherever this test runs"
    assert report.folders["runs"] == home / "runs" and report.folders["settings"] == home / "config"
    assert not (home / "runs").exists(), "the doctor must not create folders"
    assert report.disk_free_bytes["runs"] and report.disk_free_bytes["runs"] > 0
    assert sys.version.split()[0] in report.python
    assert report.allocator == describe_allocator() and report.allocator in _render(report)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_doctor_command_exits_zero_as_a_subprocess(tmp_path):
    env = {**os.environ, "TUI_FINETUNE_HOME": str(tmp_path), "COLUMNS": "240"}
    result = subprocess.run([sys.executable, "-m", "tui_finetune.cli", "doctor"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for section in SECTIONS:
        assert section in result.stdout
    assert str(tmp_path / "runs") in result.stdout


def _gpu_report(capability=(8, 6), total_gb=12, cuda="12.8") -> HardwareReport:
    gpu = GpuInfo(index=0, name="NVIDIA GeForce RTX 3060", total_bytes=total_gb * GIB, used_bytes=GIB // 2,
                  free_bytes=total_gb * GIB - GIB // 2, compute_capability=capability)
    return HardwareReport(gpus=[gpu], driver_version="570.86", cuda_driver_version=cuda)


CUDA_TORCH = TorchStatus(version="2.13.0+cu128", cuda_build="12.8", cuda_available=True)
BNB_OK = BitsandbytesStatus("0.50.2", imports=True, four_bit_ok=True, message="works")


def test_verdict_for_a_ready_gpu_names_card_memory_and_precision():
    assert decide_verdict(_gpu_report(), CUDA_TORCH, BNB_OK) == "Ready for QLoRA on NVIDIA GeForce RTX 3060 (12 GB, bf16)"
    turing = decide_verdict(_gpu_report(capability=(7, 5), total_gb=8), CUDA_TORCH, BNB_OK)
    assert turing.endswith("(8 GB, fp16)")


@pytest.mark.parametrize("torch_status, bnb, expected", [
    (TorchStatus(version=None, error="ModuleNotFoundError: No module named 'torch'"), BNB_OK, "Install PyTorch"),
    (TorchStatus(version="2.13.0+cpu"), BNB_OK, "CPU build"),
    (TorchStatus(version="2.13.0+cu130", cuda_build="13.0"), BNB_OK, "update the NVIDIA driver"),
    (CUDA_TORCH, BitsandbytesStatus("0.50.2", message="fails to import: OSError"), "LoRA only"),
])
def test_verdict_names_the_most_blocking_problem_first(torch_status, bnb, expected):
    verdict = decide_verdict(_gpu_report(), torch_status, bnb)
    assert expected in verdict and not verdict.startswith("Ready")


def test_verdict_for_a_card_too_old_for_bitsandbytes():
    assert "too old" in decide_verdict(_gpu_report(capability=(5, 2)), CUDA_TORCH, BNB_OK)


def test_torch_built_for_a_newer_cuda_than_the_driver_is_warned_about():
    newer = TorchStatus(version="2.13.0+cu130", cuda_build="13.0", cuda_available=False)
    [warning] = _torch_warnings(_gpu_report(cuda="12.8"), newer)
    assert "CUDA 13.0" in warning and "12.8" in warning
    assert _torch_warnings(_gpu_report(cuda="13.0"), CUDA_TORCH) == []


def test_low_disk_is_warned_about_only_below_the_threshold():
    assert len(_disk_warnings({"runs": 5 * GIB, "model cache": 500 * GIB, "x": None})) == 1


def test_the_compiled_backend_is_reported_with_why_not_and_what_to_install(monkeypatch):
    """Triton missing (Windows: the package to install), or installed and failing to compile (a Triton made
    for another torch): each is a line saying training uses the PyTorch path, with the compiler's reason."""
    from tui_finetune.engine import kernel_support

    monkeypatch.setattr(kernel_support, "cuda_capability", lambda: (8, 6))
    monkeypatch.setattr(kernel_support, "module_installed", lambda name: name != "triton")
    with monkeypatch.context() as windows:  # only this check runs as on Windows
        windows.setattr(kernel_support.sys, "platform", "win32")
        missing = check_kernels(CUDA_TORCH)
    assert not missing.compiled_ok and "triton-windows" in missing.compiled
    assert missing.compiled.endswith("training uses the PyTorch path")

    class BackendCompilerFailed(Exception):  # what dynamo wraps the compiler's own error in
        inner_exception = ImportError("cannot import name 'triton_key' from 'triton.compiler.compiler'")

    def fail():
        raise BackendCompilerFailed("backend='inductor' raised:")

    monkeypatch.setattr(kernel_support, "module_installed", lambda name: True)
    monkeypatch.setattr(doctor, "_compile_a_small_function_on_the_gpu", fail)
    failing = check_kernels(CUDA_TORCH)
    assert not failing.compiled_ok and "torch.compile failed on the GPU" in failing.compiled
    assert "ImportError: cannot import name 'triton_key'" in failing.compiled

    monkeypatch.setattr(doctor, "_compile_a_small_function_on_the_gpu", lambda: None)
    assert check_kernels(CUDA_TORCH).compiled_ok


def test_the_kernels_check_never_raises_and_unsloth_is_said_usable_only_where_triton_is(monkeypatch):
    from tui_finetune.engine import kernel_support

    def busy():
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(kernel_support, "cuda_capability", busy)
    monkeypatch.setattr(doctor, "_dist_version", lambda name: "2026.10.9" if name == "unsloth" else None)
    queried = check_kernels(CUDA_TORCH)
    assert not queried.compiled_ok and "couldn't be queried (RuntimeError: CUDA error" in queried.compiled
    assert queried.unsloth.startswith("2026.10.9 installed, but not usable here")
    assert "needs an NVIDIA GPU" in check_kernels(TorchStatus(version="2.13.0+cpu")).unsloth
    monkeypatch.setattr(kernel_support, "cuda_capability", lambda: (8, 9))
    monkeypatch.setattr(kernel_support, "module_installed", lambda name: True)
    monkeypatch.setattr(doctor, "_compile_a_small_function_on_the_gpu", lambda: None)
    assert check_kernels(CUDA_TORCH).unsloth == "2026.10.9 installed: auto uses its kernels for the models it supports"

    def fail():
        raise RuntimeError("triton: no kernel image is available for execution on the device")

    monkeypatch.setattr(doctor, "_compile_a_small_function_on_the_gpu", fail)  # Triton there, but broken
    assert check_kernels(CUDA_TORCH).unsloth.startswith("2026.10.9 installed, but not usable here: its kernels "
                                                        "need the same Triton, and torch.compile failed")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_on_a_gpu_with_triton_the_doctor_compiles_for_real(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the check sets it; teardown takes it back
    import torch

    kernels = check_kernels(TorchStatus(version=torch.__version__, cuda_build=torch.version.cuda, cuda_available=True))
    assert kernels.compiled_ok, kernels.compiled
