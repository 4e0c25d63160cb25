"""The allocator setting our GPU processes start with (core/gpu_allocator.py): expandable segments on native
Linux, never on Windows or WSL2, and never over a setting the user made."""

from __future__ import annotations

import os
import subprocess

import pytest

from tui_finetune.core import chat_client, gpu_allocator
from tui_finetune.core.gpu_allocator import EXPANDABLE_SEGMENTS, allocator_env, apply_here, is_wsl
from tui_finetune.core.hardware import HardwareReport
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.run_folder import control
from tui_finetune.core.run_folder.info import create_run

LINUX = "6.8.0-49-generic"
WSL2 = "5.15.167.4-microsoft-standard-WSL2"


def test_native_linux_gets_expandable_segments_and_keeps_the_rest_of_the_environment():
    env = allocator_env({"PATH": "/bin"}, system="linux", kernel_release=LINUX)
    assert env == {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS}


def test_windows_macos_and_wsl2_keep_pytorchs_default():
    assert is_wsl(WSL2, {}) and not is_wsl(LINUX, {})
    assert is_wsl(LINUX, {"WSL_DISTRO_NAME": "Ubuntu"})  # WSL on a kernel the user built
    for system, release in (("win32", "10"), ("darwin", "23.1.0"), ("linux", WSL2)):
        assert allocator_env({"PATH": "/bin"}, system=system, kernel_release=release) == {"PATH": "/bin"}
    wsl_env = {"PATH": "/bin", "WSL_INTEROP": "/run/WSL/1_interop"}
    assert allocator_env(wsl_env, system="linux", kernel_release=LINUX) == wsl_env


def test_a_setting_the_user_made_wins_under_either_name():
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        user = {name: "expandable_segments:False"}
        assert allocator_env(user, system="linux", kernel_release=LINUX) == user
    # an empty value is no setting, and is dropped: torch reads PYTORCH_ALLOC_CONF first, so an empty one
    # could shadow ours
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = allocator_env({name: " "}, system="linux", kernel_release=LINUX)
        assert env == {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS}


def test_the_training_worker_is_started_with_the_allocator_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_allocator, "expandable_segments_safe", lambda *a: True)
    started: list[dict] = []

    class FakeProcess:  # records what the launcher would start, starts nothing
        pid = 4242

        def __init__(self, command, **kwargs):
            started.append(kwargs["env"])

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    run_dir = create_run(RecipeSpec(model="m", method="lora"), data, tmp_path / "runs")
    assert control.start_worker_detached(run_dir, report=HardwareReport(gpus=[])) == 4242
    assert started[0]["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS

    monkeypatch.setattr(gpu_allocator, "expandable_segments_safe", lambda *a: False)  # e.g. WSL2
    control.start_worker_detached(run_dir, report=HardwareReport(gpus=[]))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in started[1]


@pytest.fixture
def native_linux(monkeypatch):
    monkeypatch.setattr(gpu_allocator, "expandable_segments_safe", lambda *a: True)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")


def test_the_chat_worker_is_started_with_the_allocator_setting(tmp_path, monkeypatch, native_linux):
    started: list[dict] = []

    def fake_popen(command, **kwargs):
        started.append(kwargs["env"])
        raise OSError("not started")  # the client's constructor ends here

    monkeypatch.setattr(chat_client.subprocess, "Popen", fake_popen)
    with pytest.raises(OSError):
        chat_client.ChatClient(tmp_path)
    assert started[0]["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS and "PYTORCH_ALLOC_CONF" not in started[0]


def test_the_cli_chat_sets_it_in_its_own_process_before_torch_starts(monkeypatch, native_linux):
    apply_here()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS and "PYTORCH_ALLOC_CONF" not in os.environ
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    apply_here()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"  # the user's stays


def test_a_benchmark_row_records_the_setting_its_process_ran_with():
    assert gpu_allocator.allocator_in_use({"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS}) == \
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert gpu_allocator.allocator_in_use({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}) == \
        "PYTORCH_ALLOC_CONF=backend:cudaMallocAsync"
    assert gpu_allocator.allocator_in_use({"PYTORCH_ALLOC_CONF": ""}) is None  # PyTorch's default


def test_the_doctor_says_which_setting_training_and_chat_will_get(monkeypatch):
    words = gpu_allocator.describe_allocator
    assert words({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}) == "yours: PYTORCH_ALLOC_CONF=backend:cudaMallocAsync"
    monkeypatch.setattr(gpu_allocator, "expandable_segments_safe", lambda **kw: True)
    assert words({}).startswith("expandable segments") and EXPANDABLE_SEGMENTS in words({})
    monkeypatch.setattr(gpu_allocator, "expandable_segments_safe", lambda **kw: False)
    assert words({}).startswith("PyTorch's default")
