"""GPU detection against a fake NVML that answers like pynvml, so every case runs on a CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from tui_finetune.core import paths
from tui_finetune.core.hardware import GIB, detect_hardware, machine_facts
from tui_finetune.core.recipe_machine import MachineFacts

MIB = 2**20


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


@dataclass
class FakeCard:
    name: str | bytes
    total_gb: float
    used_gb: float = 0.4
    capability: tuple[int, int] = (8, 6)
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    """(pid, usedGpuMemory) as NVML lists them; None is how Windows WDDM reports usage."""
    graphics: list[tuple[int, int | None]] = field(default_factory=list)


class FakeNVML:
    """The subset of pynvml that core.hardware calls, with counters to check init/shutdown pairing."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_NotSupported = NVMLError_NotSupported

    def __init__(self, cards, driver="580.65.06", cuda=13000, init_error=None, process_names=None):
        self.cards, self.driver, self.cuda, self.init_error = cards, driver, cuda, init_error
        self.process_names = process_names or {}
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.cards[index]

    def nvmlDeviceGetName(self, card):
        return card.name

    def nvmlDeviceGetMemoryInfo(self, card):
        total, used = int(card.total_gb * GIB), int(card.used_gb * GIB)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, card):
        return card.capability

    def nvmlDeviceGetComputeRunningProcesses(self, card):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in card.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, card):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in card.graphics]

    def nvmlSystemGetProcessName(self, pid):
        if pid not in self.process_names:
            raise NVMLError_NotSupported("Not Supported")
        return self.process_names[pid]


def test_two_gpus_are_reported_with_memory_capability_and_driver():
    nvml = FakeNVML([FakeCard("NVIDIA GeForce RTX 3060", 12, used_gb=0.5),
                     FakeCard("NVIDIA GeForce RTX 2070", 8, capability=(7, 5))], cuda=12080)
    report = detect_hardware(nvml)
    assert report.problem is None and report.warnings == []
    assert report.driver_version == "580.65.06" and report.cuda_driver_version == "12.8"
    first, second = report.gpus
    assert (first.index, first.name, first.compute_capability) == (0, "NVIDIA GeForce RTX 3060", (8, 6))
    assert first.total_bytes == 12 * GIB and first.used_bytes == int(0.5 * GIB)
    assert first.free_bytes == first.total_bytes - first.used_bytes
    assert first.supports_bf16 and not second.supports_bf16 and second.supports_qlora
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_machine_facts_describe_the_gpu_with_the_most_memory():
    report = detect_hardware(FakeNVML([FakeCard("NVIDIA GeForce RTX 2060", 6, capability=(7, 5)),
                                       FakeCard("NVIDIA GeForce RTX 4090", 24, capability=(8, 9))]))
    facts = machine_facts(report)
    assert facts == MachineFacts(has_cuda=True, supports_bf16=True, bitsandbytes_ok=True,
                                 device_name="NVIDIA GeForce RTX 4090")
    assert machine_facts(report, bitsandbytes_ok=False).bitsandbytes_ok is False


@pytest.mark.parametrize("error, reason", [
    (NVMLError_LibraryNotFound("NVML Shared Library Not Found"), "not installed"),
    (NVMLError_DriverNotLoaded("Driver Not Loaded"), "not running"),
    (OSError("libnvidia-ml.so.1: cannot open shared object file"), "could not be loaded"),
])
def test_no_driver_is_explained_in_plain_words_without_raising(error, reason):
    nvml = FakeNVML([], init_error=error)
    report = detect_hardware(nvml)
    assert report.gpus == []
    assert report.problem.startswith("No NVIDIA GPU found: training will run on the CPU")
    assert reason in report.problem
    assert nvml.shutdowns == 0, "nvmlShutdown must not be called when nvmlInit failed"
    assert machine_facts(report) == MachineFacts(has_cuda=False, supports_bf16=False, bitsandbytes_ok=False)


def test_zero_gpus_is_a_problem_and_nvml_is_still_shut_down():
    nvml = FakeNVML([])
    report = detect_hardware(nvml)
    assert report.gpus == [] and "No NVIDIA GPU found" in report.problem
    assert report.driver_version == "580.65.06"
    assert nvml.shutdowns == 1


def test_a_failing_query_mid_way_still_shuts_nvml_down_and_reports_a_problem():
    nvml = FakeNVML([FakeCard("NVIDIA GeForce RTX 3060", 12)])
    nvml.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(NVMLError("Unknown Error"))
    report = detect_hardware(nvml)
    assert "Unknown Error" in report.problem and nvml.shutdowns == 1


def test_one_unreadable_gpu_is_left_out_with_a_warning():
    nvml = FakeNVML([FakeCard("NVIDIA GeForce RTX 3060", 12), FakeCard("NVIDIA GeForce RTX 3070", 8)])
    original = nvml.nvmlDeviceGetMemoryInfo

    def memory_info(card):
        if card.name.endswith("3070"):
            raise NVMLError("GPU is lost")
        return original(card)

    nvml.nvmlDeviceGetMemoryInfo = memory_info
    report = detect_hardware(nvml)
    assert [g.name for g in report.gpus] == ["NVIDIA GeForce RTX 3060"] and report.problem is None
    assert any("GPU 1 could not be read (GPU is lost)" in w for w in report.warnings)


def test_other_programs_holding_vram_are_summed_per_pid_and_named():
    card = FakeCard("NVIDIA GeForce RTX 3060", 12, used_gb=2.0,
                    compute=[(4242, 900 * MIB)], graphics=[(4242, 900 * MIB), (77, 300 * MIB), (os.getpid(), 5 * GIB)])
    report = detect_hardware(FakeNVML([card], process_names={4242: "C:\\Games\\game.exe"}))
    gpu = report.gpus[0]
    assert gpu.other_pids == (77, 4242), "duplicates merged and our own process left out"
    assert gpu.other_process_bytes == 1200 * MIB
    [warning] = report.warnings
    assert "1.2 GB" in warning and "game.exe (pid 4242)" in warning and "pid 77" in warning


def test_small_background_usage_is_not_a_warning():
    card = FakeCard("NVIDIA GeForce RTX 3060", 12, graphics=[(10, 200 * MIB)])
    report = detect_hardware(FakeNVML([card]))
    assert report.gpus[0].other_process_bytes == 200 * MIB and report.warnings == []


def test_unreported_process_memory_falls_back_to_the_cards_used_memory():
    card = FakeCard("NVIDIA GeForce RTX 3060", 12, used_gb=3.0, graphics=[(500, None), (501, None)])
    report = detect_hardware(FakeNVML([card]))
    gpu = report.gpus[0]
    assert gpu.other_process_bytes == 0 and not gpu.other_process_bytes_known
    [warning] = report.warnings
    assert "up to 3.0 GB" in warning and "pid 500" in warning


def test_old_cards_lose_bf16_and_get_a_warning_about_bitsandbytes():
    nvml = FakeNVML([FakeCard("NVIDIA GeForce GTX 1080", 8, capability=(6, 1)),
                     FakeCard("NVIDIA GeForce GTX 980", 4, capability=(5, 2))])
    report = detect_hardware(nvml)
    pascal, maxwell = report.gpus
    assert not pascal.supports_bf16 and pascal.supports_qlora and not maxwell.supports_qlora
    assert any("GTX 1080" in w and "slowly" in w for w in report.warnings)
    assert any("GTX 980" in w and "too old for bitsandbytes" in w for w in report.warnings)
    facts = machine_facts(report)
    assert facts.device_name == "NVIDIA GeForce GTX 1080" and facts.supports_bf16 is False


def test_a_lone_too_old_card_is_not_fit_for_qlora():
    report = detect_hardware(FakeNVML([FakeCard("Tesla K80", 12, capability=(3, 7))]))
    assert machine_facts(report).bitsandbytes_ok is False


@pytest.mark.parametrize("cuda, warned", [(11080, True), (11040, True), (12000, False), (13000, False)])
def test_old_driver_is_warned_about(cuda, warned):
    report = detect_hardware(FakeNVML([FakeCard("NVIDIA GeForce RTX 3060", 12)], driver="470.82", cuda=cuda))
    driver_warnings = [w for w in report.warnings if "driver" in w]
    assert bool(driver_warnings) is warned
    if warned:
        assert "470.82" in driver_warnings[0] and "nvidia.com" in driver_warnings[0]


def test_bytes_from_old_pynvml_are_decoded_like_str():
    as_bytes = detect_hardware(FakeNVML([FakeCard(b"NVIDIA GeForce RTX 3060", 12)], driver=b"535.54.03"))
    as_str = detect_hardware(FakeNVML([FakeCard("NVIDIA GeForce RTX 3060", 12)], driver="535.54.03"))
    assert as_bytes == as_str
    assert as_bytes.gpus[0].name == "NVIDIA GeForce RTX 3060" and as_bytes.driver_version == "535.54.03"


def test_missing_cuda_version_query_leaves_it_unknown():
    nvml = FakeNVML([FakeCard("NVIDIA GeForce RTX 3060", 12)])
    nvml.nvmlSystemGetCudaDriverVersion = lambda: (_ for _ in ()).throw(NVMLError_NotSupported("Not Supported"))
    report = detect_hardware(nvml)
    assert report.cuda_driver_version is None and report.problem is None and len(report.gpus) == 1


def test_real_pynvml_on_this_machine_never_raises():
    report = detect_hardware()
    assert report.gpus or report.problem.startswith("No NVIDIA GPU found")


def test_core_imports_neither_torch_nor_textual_nor_pynvml_at_import():
    code = ("import sys, tui_finetune.core, tui_finetune.core.hardware, tui_finetune.core.paths; "
            "print([m for m in ('torch', 'textual', 'pynvml') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_paths_follow_tui_finetune_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path))
    assert paths.data_home() == tmp_path
    assert paths.runs_dir() == tmp_path / "runs"
    assert paths.config_dir() == tmp_path / "config"


def test_paths_default_to_the_platform_folders(monkeypatch):
    monkeypatch.delenv("TUI_FINETUNE_HOME", raising=False)
    assert paths.runs_dir().parent.name == "tui-finetune" and paths.runs_dir().name == "runs"
    assert "tui-finetune" in paths.config_dir().parts


def test_hf_cache_is_resolved_like_huggingface_hub(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert paths.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert paths.hf_cache_dir() == tmp_path / "cache"
