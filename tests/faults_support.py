"""Helpers for the fault-injection tests: runs with test hooks, traces, kills, adapters.

The worker reads two test hooks from its environment (engine/faults.py): ``TUI_FINETUNE_FAULT``
injects a death, an ENOSPC or an OOM at a named point, and ``TUI_FINETUNE_TRACE`` makes it append
what each optimizer step trained on (sample ids, exact loss) to a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine_runs import tiny_recipe
from tui_finetune.core.events import read_events
from tui_finetune.core.run_folder.control import launch_run, resume_run
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder.listing import pid_alive

TRAIN_ROWS = 16
STEPS_PER_EPOCH = 4
"""20 rows, 4 held out; micro-batch 2 x accumulation 2 = 4 rows a step, so 4 steps an epoch."""


def fault_recipe(model: Path, max_steps: int = 24, **sections):
    train = {"micro_batch": 2, "grad_accum": 2, "max_steps": max_steps, **sections.pop("train", {})}
    checkpoint = {"every_steps": 1, "every_minutes": 0.0, "keep_last": 2, **sections.pop("checkpoint", {})}
    return tiny_recipe(model, train=train, checkpoint=checkpoint, **sections)


def hook_env(home: Path, fault: str = "", trace: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "TUI_FINETUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf")}
    env.pop("TUI_FINETUNE_FAULT", None)
    env.pop("TUI_FINETUNE_TRACE", None)
    if fault:
        env["TUI_FINETUNE_FAULT"] = fault
    if trace:
        env["TUI_FINETUNE_TRACE"] = str(trace)
    return env


def launch(recipe, data: Path, home: Path, fault: str = "", trace: Path | None = None) -> Path:
    return launch_run(recipe, data, base=home / "runs", env=hook_env(home, fault, trace))


def relaunch(run_dir: Path, home: Path, fault: str = "", trace: Path | None = None) -> int:
    return resume_run(run_dir, hook_env(home, fault, trace))


def wait_dead(run_dir: Path, timeout: float = 120.0) -> str:
    """Wait until the worker process is gone; return run.json's state as written (not as shown)."""
    deadline = time.time() + timeout
    while pid_alive(read_run_info(run_dir).pid):
        if time.time() > deadline:
            raise AssertionError(f"worker still alive after {timeout}s: {(run_dir / 'worker.log').read_text()[-3000:]}")
        time.sleep(0.05)
    return read_run_info(run_dir).state


def read_trace(path: Path) -> dict[int, dict]:
    """The trace's last record of each step: the lineage the finished run actually kept."""
    out: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out


def events_since(run_dir: Path, offset: int) -> tuple[list, int]:
    return read_events(run_dir / "events.jsonl", offset)


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    x, y = adapter_tensors(a), adapter_tensors(b)
    assert sorted(x) == sorted(y) and x
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"adapter tensors differ: {different[:5]}"


def assert_kill_resume_matches(recipe, data: Path, reference: tuple[Path, dict[int, dict]], tmp_path: Path,
                               steps: int, kill_at: int = 3) -> None:
    """The run killed right after its step-``kill_at`` checkpoint and resumed trains every step on the
    reference run's rows (or bins, or groups), to its very losses and adapter."""
    from tui_finetune.core.run_folder.resume import find_resume_checkpoint

    ref_dir, ref_records = reference
    home, trace = tmp_path / "home", tmp_path / "trace.jsonl"
    run_dir = launch(recipe, data, home, fault=f"exit:after-save@{kill_at}", trace=trace)
    assert wait_dead(run_dir) == "running"  # killed
    checkpoint = f"step-{kill_at:06d}"
    assert find_resume_checkpoint(run_dir / "checkpoints").path.name == checkpoint
    relaunch(run_dir, home, trace=trace)
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]
    assert read_run_info(run_dir).resumed_from == checkpoint
    records = read_trace(trace)
    assert sorted(records) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert records[step]["ids"] == ref_records[step]["ids"], f"step {step} trained on other rows"
        assert records[step]["loss"] == ref_records[step]["loss"], f"step {step}: another loss"
        assert records[step]["micro_batches"] == ref_records[step]["micro_batches"]
    assert_same_adapter(run_dir, ref_dir)


def reference_run(recipe, data: Path, root: Path) -> tuple[Path, dict[int, dict]]:
    """The run of ``recipe`` uninterrupted, in ``root``: its folder and its trace (what kill/resume runs match)."""
    run_dir = launch(recipe, data, root / "home", trace=root / "trace.jsonl")
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]
    return run_dir, read_trace(root / "trace.jsonl")
