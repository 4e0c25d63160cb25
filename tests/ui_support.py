"""Fixed data for the UI tests: a fake GPU report, fixed run folders, an app built for tests.

Everything here is deterministic (no clock, no GPU, no real user folders), so the snapshot tests
render the same screen on every machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tui_finetune.core.events import (
    CheckpointEvent, EndEvent, EvalEvent, EventLog, PhaseEvent, StepEvent, WarningEvent)
from tui_finetune.core.hardware import GpuInfo, GpuProcess, HardwareReport
from tui_finetune.core.preferences import Preferences
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.run_folder.info import create_run, update_run_info
from tui_finetune.ui.app import AppContext, make_app

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
T0 = 1_790_000_000.0
"""A fixed 'now' for run folders and the app's clock."""


def fake_report() -> HardwareReport:
    gpu = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 3 * GIB, 9 * GIB, (8, 6),
                  processes=(GpuProcess(4242, int(2.5 * GIB), "game.exe"),))
    return HardwareReport(gpus=[gpu], driver_version="550.54", cuda_driver_version="12.4",
                          warnings=["Other programs hold 2.5 GB of GPU 0's memory (game.exe (pid 4242)): close "
                                    "games, browsers or other AI tools to leave more room for training."])


def no_gpu_report() -> HardwareReport:
    return HardwareReport(problem="No NVIDIA GPU found: training will run on the CPU and only the demo model is "
                                  "practical (the NVIDIA driver is not installed, or its NVML library is missing).")


def in_process_checker(path: str, spec, model: str) -> dict:
    """The data check without the subprocess, for snapshots (the flow tests use the real one)."""
    from tui_finetune.data.check_json import check

    return check(path, spec, model)


def ui_context(**changes) -> AppContext:
    ctx = AppContext(hardware=fake_report(), clock=lambda: T0 + 600, vram_sampler=None, gpus_sampler=None,
                     data_checker=in_process_checker, poll_interval=0.05, offer_on_start=False)
    for key, value in changes.items():
        setattr(ctx, key, value)
    return ctx


def build_app(preferences: Preferences | None = None, **changes):
    return make_app(ui_context(**changes), preferences or Preferences())


def write_run(base: Path, minute: int, state: str, steps: int, total: int = 60, end: str | None = None,
              alive: bool = False) -> Path:
    """A run folder of the demo recipe with ``steps`` step events, fixed times and losses."""
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.toml")
    run_dir = create_run(recipe, REPO / "recipes" / "demo-cpu.jsonl", base, now=datetime(2026, 11, 20, 9, minute))
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(PhaseEvent(phase="load", message="loading the demo model on CPU", time=T0))
        log.emit(PhaseEvent(phase="train", message=f"{total} steps", time=T0 + 5))
        for step in range(1, steps + 1):
            loss = 3.0 * 0.97**step + 0.4 + 0.05 * ((step * 7) % 5) / 5
            log.emit(StepEvent(step=step, total_steps=total, epoch=step / total, loss=loss, lr=5e-4 * (1 - step / total),
                               grad_norm=1.0, tokens_per_s=850.0 + step, eta_s=(total - step) * 6.0,
                               elapsed_s=step * 6.0, vram_reserved_mb=2000.0 + 10 * (step % 7),
                               vram_peak_mb=2600.0 + step, nvml_used_mb=5200.0 + 15 * (step % 9),
                               nvml_total_mb=12288.0, time=T0 + 5 + step * 6))
            if step % 20 == 0:
                log.emit(EvalEvent(step=step, eval_loss=loss + 0.1, time=T0 + 6 + step * 6))
                log.emit(CheckpointEvent(step=step, path=str(run_dir / f"checkpoints/step-{step:06d}"),
                                         time=T0 + 7 + step * 6))
        if state == "failed":
            log.emit(WarningEvent(message="loss spiked at step 12", advice="lower the learning rate", time=T0 + 80))
        if end:
            log.emit(EndEvent(state=end, message=f"run {end}", time=T0 + 400))
    update_run_info(run_dir, state=state, pid=os.getpid() if alive else None, total_steps=total, created_at=T0,
                    message={"completed": "adapter saved", "failed": "CUDA out of memory"}.get(state, ""))
    return run_dir


TWO_CARDS = [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_mb": 24564.0},
             {"index": 1, "name": "NVIDIA GeForce RTX 3060", "total_mb": 12288.0}]
"""run.json's ``gpus`` of a 2-GPU run: rank 0 on the 24 GB card, rank 1 on the 12 GB one."""


def rank_peaks_at(step: int) -> list[float]:
    """Both ranks' ``rank_vram_peak_mb`` at ``step``: at step 30, 9.1 GiB on rank 0 and 8.8 GiB on rank 1."""
    return [9000.0 + 10 * step, 8800.0 + 6 * step]


def write_two_gpu_run(base: Path, steps: int = 30, total: int = 30, state: str = "completed") -> Path:
    """A run folder of a run on two GPUs (run.json ``world_size`` 2 and its cards, ``train.devices = 2``)
    whose step events carry both ranks' peaks, as the worker writes them (rank 0's NVML figures alone)."""
    from dataclasses import replace

    recipe = load_recipe(REPO / "recipes" / "demo-cpu.toml")
    recipe = replace(recipe, train=replace(recipe.train, devices=2))
    run_dir = create_run(recipe, REPO / "recipes" / "demo-cpu.jsonl", base, now=datetime(2026, 11, 20, 9, 30))
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(PhaseEvent(phase="load", message="loading the demo model on 2 GPUs", time=T0))
        log.emit(PhaseEvent(phase="train", message=f"{total} steps", time=T0 + 5))
        for step in range(1, steps + 1):
            peaks = rank_peaks_at(step)
            log.emit(StepEvent(step=step, total_steps=total, epoch=step / total, loss=3.0 * 0.95**step + 0.5,
                               lr=5e-4, grad_norm=1.0, tokens_per_s=3400.0, eta_s=(total - step) * 2.0,
                               elapsed_s=step * 2.0, vram_reserved_mb=peaks[0] - 200, vram_peak_mb=peaks[0],
                               nvml_used_mb=peaks[0] + 600, nvml_total_mb=24564.0, rss_mb=3000.0,
                               rank_vram_peak_mb=peaks, time=T0 + 5 + step * 2))
        if state in ("completed", "failed", "interrupted"):
            log.emit(EndEvent(state=state, message=f"run {state}", time=T0 + 100))
    update_run_info(run_dir, state=state, total_steps=total, created_at=T0, world_size=2, gpus=TWO_CARDS,
                    pid=os.getpid() if state == "running" else None, device="NVIDIA GeForce RTX 4090 x 2")
    return run_dir


SHOWN_HOME = Path("/tmp/tui-finetune-ui-test-home")
"""The home the launch screen's snapshots show: each test's real home is its own temporary folder, whose
name changes from run to run, so ``show_fixed_runs_folder`` puts this fixed name on screen instead."""


def share_demo_tokenizers(cache: Path, tmp_path_factory) -> Path:
    """A cache whose ``tokenizers`` folder is shared by this test run's tests: the demo's tokenizer, read from
    its package's GGUF when a data check first needs it (about 20 s), is converted once a run, not once a test."""
    shared = tmp_path_factory.getbasetemp() / "demo-tokenizers"
    shared.mkdir(exist_ok=True)
    cache.mkdir(parents=True)
    (cache / "tokenizers").symlink_to(shared, target_is_directory=True)
    return cache


@pytest.fixture
def ui_home(tmp_path, tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """An empty TUI_FINETUNE_HOME of this test's own, no converted demo model or HF cache, and the repository as the working folder.

    The home is under pytest's ``tmp_path``, which no other pytest process shares: two test runs at once (two
    worktrees, CI next to a developer) never read each other's preferences. It is removed afterwards."""
    import shutil

    home = tmp_path / "home"
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(home))
    monkeypatch.setenv("TUI_FINETUNE_CACHE", str(share_demo_tokenizers(tmp_path / "cache", tmp_path_factory)))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    monkeypatch.chdir(REPO)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def show_fixed_runs_folder(ui_home, monkeypatch) -> Path:
    """The launch screen names the runs folder: show ``SHOWN_HOME``'s, so its snapshot is the same in every run."""
    from tui_finetune.ui.screens import launch

    monkeypatch.setattr(launch, "runs_dir", lambda: SHOWN_HOME / "runs")
    return ui_home


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_async(fn):
    """Run an ``async def`` test with asyncio.run (no pytest-asyncio needed); fixtures still apply."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
