"""On CUDA GPUs: the torchrun worker against the plain worker, and two GPUs against one (issue 16).

The model is the catalog's Phi-2 architecture with random weights (nothing downloads), trained with
QLoRA as a hobbyist's run would be. One GPU: torchrun with ``--nproc-per-node 1`` must train like the
plain worker. Two or more GPUs: 2 ranks x micro-batch 4 must match 1 GPU x micro-batch 4 x accumulation 2
within 1%, and train faster (the issue asks for 1.7x tokens/s; the figure is printed for
docs/verification/). Skipped without CUDA; the two-GPU test without a second GPU.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_runs import REPO, events_of, start, tiny_recipe, wait_for_end  # noqa: E402
from tui_finetune.core.events import StepEvent  # noqa: E402
from tui_finetune.core.run_folder.control import prepare_recipe  # noqa: E402
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe  # noqa: E402
from test_engine_gpu import phi2  # noqa: E402,F401 - the fixture builds Phi-2 with random weights

SAMPLES = REPO / "tests" / "data" / "samples" / "instructions.alpaca.jsonl"
STEPS = 20


def _recipe(model, devices: int = 1, micro: int = 4, accum: int = 2):
    return tiny_recipe(model, method="qlora", lora={"r": 16, "alpha": 32}, data={"seq_len": 512, "eval_split": 0.05},
                       train={"max_steps": STEPS, "micro_batch": micro, "grad_accum": accum, "learning_rate": 2e-4,
                              "optimizer": "adamw_8bit", "precision": "auto", "gradient_checkpointing": True,
                              "logging_steps": 1, "devices": devices},
                       quant={"compute_dtype": "auto"}, checkpoint={"every_steps": 10, "every_minutes": 0.0})


def _losses(run_dir) -> list[float]:
    return [s.loss for s in events_of(run_dir, StepEvent)]


def _tokens_per_s(run_dir) -> float:
    return statistics.median(s.tokens_per_s for s in events_of(run_dir, StepEvent)[3:] if s.tokens_per_s)


def test_torchrun_with_one_process_trains_like_the_plain_worker(phi2, tmp_path):  # noqa: F811
    plain = start(_recipe(phi2), SAMPLES, tmp_path / "plain")
    assert wait_for_end(plain, timeout=300) == "completed", (plain / "worker.log").read_text()[-3000:]

    run_dir = create_run(prepare_recipe(_recipe(phi2)), SAMPLES, tmp_path / "torchrun" / "runs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUI_FINETUNE_HOME": str(tmp_path / "torchrun"),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "-m", "tui_finetune.engine.worker", str(run_dir)], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert read_run_info(run_dir).state == "completed"
    got, expected = _losses(run_dir), _losses(plain)
    worst = max(abs(a - b) / b for a, b in zip(got, expected))
    print(f"\ntorchrun nproc 1: {[round(x, 4) for x in got]}\nplain worker:     {[round(x, 4) for x in expected]}\n"
          f"largest relative difference: {worst:.4%}")
    assert len(got) == len(expected) == STEPS and worst < 0.01


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_like_one_with_the_same_effective_batch_and_faster(phi2, tmp_path):  # noqa: F811
    one = start(_recipe(phi2, devices=1, micro=4, accum=2), SAMPLES, tmp_path / "one")
    assert wait_for_end(one, timeout=400) == "completed", (one / "worker.log").read_text()[-3000:]
    two = start(_recipe(phi2, devices=2, micro=4, accum=1), SAMPLES, tmp_path / "two")
    assert wait_for_end(two, timeout=400) == "completed", (two / "worker.log").read_text()[-3000:]

    info = read_run_info(two)
    assert (info.world_size, read_run_recipe(two).effective_batch, len(info.rank_pids)) == (2, 8, 2)
    steps = events_of(two, StepEvent)
    assert all(s.rank_vram_peak_mb and len(s.rank_vram_peak_mb) == 2 and min(s.rank_vram_peak_mb) > 0 for s in steps)
    got, expected = _losses(two), _losses(one)
    worst = max(abs(a - b) / b for a, b in zip(got, expected))
    speedup = _tokens_per_s(two) / _tokens_per_s(one)
    print(f"\n2 GPUs: {[round(x, 4) for x in got]}\n1 GPU:  {[round(x, 4) for x in expected]}\n"
          f"largest relative difference: {worst:.4%}; tokens/s {_tokens_per_s(two):,.0f} vs {_tokens_per_s(one):,.0f} "
          f"= {speedup:.2f}x")
    assert len(got) == len(expected) == STEPS and worst < 0.01
    assert speedup >= 1.7, f"2 GPUs trained only {speedup:.2f}x as fast as 1"
