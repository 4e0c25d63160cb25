"""benchmarks/profile_step.py (issue #14 item 2): the bucket arithmetic on a hand-made GPU trace, the observer
hook leaving memory_speed's step unchanged, and a CPU smoke of two stacks whose buckets must add up to the
step and name real work (GEMMs, LoRA, attention, loss, recompute, optimizer)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import profile_hooks, profile_trace, stacks  # noqa: E402
from benchmarks.memory_speed import parse_case  # noqa: E402
from benchmarks.profile_trace import BUCKETS, Span, classify  # noqa: E402

MAIN, AUTOGRAD, STREAM, STREAM2 = 1, 2, 7, 8


def _cpu(name: str, start: float, end: float, tid: int = MAIN, dims: list | None = None, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start, "pid": 100, "tid": tid,
            "args": {"Input Dims": dims} if dims else {}}


def _launch(corr: int, start: float, tid: int = MAIN, name: str = "cudaLaunchKernel") -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": start, "dur": 2, "pid": 100, "tid": tid,
            "args": {"correlation": corr}}


def _gpu(corr: int, name: str, start: float, end: float, stream: int = STREAM, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start, "pid": 0, "tid": stream,
            "args": {"correlation": corr}}


def gpu_trace() -> dict:
    """One 1000 us step: what each bucket must get is worked out in the test below."""
    note = "user_annotation"
    events = [
        _cpu(profile_trace.STEP_RANGE, 0, 1000, cat=note),
        _cpu("aten::linear", 10, 29, dims=[[4, 128, 64], [64, 64]]),
        _cpu("aten::mm", 15, 28, dims=[[512, 64], [64, 64]]), _launch(1, 20),
        _gpu(1, "sm90_xmma_gemm_bf16bf16_bf16f32", 100, 200),                        # base GEMM, forward
        _cpu("aten::mm", 30, 33, dims=[[512, 64], [64, 16]]), _launch(2, 30.5),
        _gpu(2, "nvjet_tst_128x64_64x4", 200, 250),                                 # LoRA GEMM (rank 16)
        _cpu("bitsandbytes::dequantize_4bit", 33.5, 40), _launch(3, 34),
        _gpu(3, "kDequantizeBlockwise<bf16, 512, 64>", 250, 300),                   # NF4 dequantize
        _cpu(profile_trace.LOSS_RANGE, 41, 44.5, cat=note), _launch(4, 42),
        _gpu(4, "vectorized_elementwise_kernel", 300, 320),                         # inside the loss range
        _launch(11, 45, name="cudaStreamSynchronize") | {"dur": 285},               # waits 45-330: the GPU drains
        _cpu("autograd::engine::evaluate_function: MmBackward0", 380, 500, tid=AUTOGRAD),
        _cpu("aten::mm", 390, 410, tid=AUTOGRAD, dims=[[64, 512], [512, 64]]), _launch(5, 400, tid=AUTOGRAD),
        _gpu(5, "sm90_xmma_gemm_bf16bf16_bf16f32", 420, 500),                       # base GEMM, backward
        _cpu("autograd::engine::evaluate_function: ReluBackward0", 501, 600, tid=AUTOGRAD),
        _cpu(profile_trace.RECOMPUTE_RANGE, 502, 560, tid=AUTOGRAD, cat=note),
        _cpu("aten::_scaled_dot_product_efficient_attention", 505, 520, tid=AUTOGRAD), _launch(6, 506, tid=AUTOGRAD),
        _gpu(6, "fmha_cutlassF_bf16_aligned_64x64", 600, 700),                      # attention, recompute
        _launch(7, 520),
        _gpu(7, "vectorized_elementwise_kernel", 650, 750, stream=STREAM2),          # overlaps the attention
        _cpu("Optimizer.step#PagedAdamW8bit.step", 800, 900, cat=note), _launch(8, 801),
        _gpu(8, "kOptimizer32bit2State", 810, 850), _launch(9, 840, name="cudaMemcpyAsync"),
        _gpu(9, "Memcpy DtoD (Device -> Device)", 850, 860, cat="gpu_memcpy"),      # a copy, but the optimizer's
        _launch(10, 901, name="cudaMemcpyAsync"),
        _gpu(10, "Memcpy DtoH (Device -> Pageable)", 910, 930, cat="gpu_memcpy"),   # a copy, forward
        _launch(12, 902, name="cudaDeviceSynchronize") | {"dur": 93},               # the closing synchronize
        _gpu(13, "outside_the_step", 1200, 1300),                                   # not in a recorded step
    ]
    return {"traceEvents": events}


def test_gpu_trace_is_cut_into_buckets_and_phases_that_add_up_to_the_step():
    result = profile_trace.analyse(gpu_trace(), rank=16, vocab=32000)
    ms = {k: round(v * 1000, 6) for k, v in result["buckets_ms"].items()}  # back to microseconds
    assert result["device"] == "cuda" and result["steps"] == 1 and result["step_ms"] == [1.0]
    assert ms == {"gemm_base": 180, "gemm_lora": 50, "dequant": 50, "loss": 20,
                  "attention": 75, "other": 75,  # 650-700 ran on two streams: shared
                  "optimizer": 50, "copies": 20,
                  "sync": 100,   # 320-420: the GPU drained while cudaStreamSynchronize waited
                  "gaps": 210,   # 500-600 (recompute's launch), 750-810 and 860-910: nothing synced
                  "edges": 170}  # 0-100 before the first kernel, 930-1000 after the last
    assert sum(ms.values()) == pytest.approx(1000)
    phases = {k: round(v * 1000, 6) for k, v in result["phases_ms"].items()}
    assert phases == {"forward": 100 + 50 + 50 + 20 + 75 + 20 + 50, "recompute": 75 + 100,
                      "backward": 80 + 100, "optimizer": 50 + 60, "none": 170}
    assert result["sync_calls_per_step"] == 2
    top = {(op["name"], op["bucket"]): op for op in result["top_ops"]}
    assert "outside_the_step" not in {name for name, _ in top}
    assert top[("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm_base")]["calls_per_step"] == 2
    assert top[("vectorized_elementwise_kernel", "loss")]["launched_by"] == "(outside ops)"
    assert result["top_ops"][0]["name"] == "sm90_xmma_gemm_bf16bf16_bf16f32"  # 180 us, the most


def test_matmuls_are_told_apart_by_their_shapes():
    def gemm(dims: list) -> list[Span]:
        return [Span("aten::mm", "cpu_op", 0, 1, dims=dims)]

    assert classify("nvjet_tst", gemm([[512, 2048], [2048, 2048]]), 16, 256000) == "gemm_base"
    assert classify("nvjet_tst", gemm([[512, 2048], [2048, 16]]), 16, 256000) == "gemm_lora"
    assert classify("nvjet_tst", gemm([[512, 2048], [2048, 16]]), 8, 256000) == "gemm_base"  # another rank
    assert classify("nvjet_tst", gemm([[512, 2048], [2048, 256000]]), 16, 256000) == "loss"  # the lm_head
    assert classify("aten::mm", gemm([[16], [2048, 4]]), 16, 256000) == "gemm_base"  # a vector's size is no rank
    backward = [Span("autograd::engine::evaluate_function: NllLossBackward0", "cpu_op", 0, 9)]
    assert classify("elementwise_kernel", backward, 16, 256000) == "loss"
    step = [Span("Optimizer.step#AdamW.step", "user_annotation", 0, 9), *gemm([[512, 16], [16, 64]])]
    assert classify("nvjet_tst", step, 16, 256000) == "optimizer"
    assert classify("elementwise_kernel", [], 16, 256000) == "other"


def test_a_trace_without_a_recorded_step_is_refused():
    with pytest.raises(ValueError, match="profile::step"):
        profile_trace.analyse({"traceEvents": [_gpu(1, "gemm", 0, 1)]}, rank=16, vocab=512)


def test_the_observer_records_the_chosen_steps_and_changes_no_loss(monkeypatch, tmp_path):
    """The profiled step is the benchmark's: the same losses with the observer as without, and the trace holds
    exactly the recorded steps, with the recompute and loss ranges inside them."""
    monkeypatch.setenv("TUIFT_BENCH_SCRATCH", str(tmp_path))
    case = parse_case(f"{stacks.SMOKE_MODEL}:lora:64:2")
    plain = stacks.run_one(case, "ours:universal", 4, [], smoke=True)
    from tui_finetune.engine import memory_techniques

    original = memory_techniques.chunked_causal_lm_loss
    observer = profile_hooks.ProfilingObserver(2, 2, tmp_path / "trace.json")
    try:
        watched = stacks.run_one(case, "ours:universal", 4, [], smoke=True, observer=observer)
    finally:
        observer.restore()
    assert watched["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert len(observer.step_seconds) == 4 and observer.tagged_layers >= 2
    names = [e["name"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]]
    assert names.count(profile_trace.STEP_RANGE) == 2
    assert profile_trace.RECOMPUTE_RANGE in names and profile_trace.LOSS_RANGE in names
    assert "memory_techniques.chunked_causal_lm_loss" in observer.loss_tagged
    assert memory_techniques.chunked_causal_lm_loss is original  # restore() put the engine back


def test_smoke_profiles_two_stacks_on_the_cpu_into_buckets_that_add_up(tmp_path):
    env = {**os.environ, "TUIFT_BENCH_SCRATCH": str(tmp_path / "scratch")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile_step", "--smoke", "--out", str(tmp_path / "out"),
                           "--tag", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "profile-smoke.json").read_text())
    rows = {row["stack"]: row for row in payload["rows"]}
    assert set(rows) == {"ours:universal", "baseline"}, payload["rows"]
    for row in rows.values():
        assert "error" not in row, row
        p = row["profile"]
        assert p["device"] == "cpu" and p["steps"] == 2 and len(p["step_seconds"]) == 4
        assert set(p["buckets_ms"]) == set(BUCKETS) and all(v >= 0 for v in p["buckets_ms"].values())
        step = sum(p["step_ms"]) / 2
        assert sum(p["buckets_ms"].values()) == pytest.approx(step, rel=0.01)
        # the trace's step ranges against the loop's own clock around the same steps
        assert step == pytest.approx(1000 * sum(p["step_seconds"][2:]) / 2, rel=0.05)
        for bucket in ("gemm_base", "gemm_lora", "attention", "loss", "optimizer", "other"):
            assert p["buckets_ms"][bucket] > 0, (row["stack"], bucket)
        assert p["buckets_ms"]["dequant"] == 0  # LoRA on the CPU: nothing is quantised
        assert p["phases_ms"]["recompute"] > 0 and p["phases_ms"]["backward"] > 0  # checkpointing is on
        assert p["recompute_layers_tagged"] >= 2
        assert len(p["top_ops"]) == profile_trace.TOP_OPS and all(op["ms_per_step"] >= 0 for op in p["top_ops"])
        assert p["useful_tokens_per_step"] > 0 and math.isfinite(p["useful_tokens_per_step"])
    assert "memory_techniques.chunked_causal_lm_loss" in rows["ours:universal"]["profile"]["loss_tagged"]
    md = (tmp_path / "out" / "profile-smoke.md").read_text()
    for line in ("- date: ", "- card: CPU", "- versions: python ", "- command: `", "## Side by side",
                 "| ms a step | ours:universal | baseline |", "## How buckets are matched", "| **sum** |"):
        assert line in md


def test_the_child_imports_no_torch_before_the_stack_does():
    """Unsloth must be imported before transformers: stacks.run_one does that in the child, so nothing the
    profiler's modules import at the top may pull torch or transformers in first."""
    code = ("import sys; import benchmarks.profile_step, benchmarks.profile_hooks, benchmarks.profile_report; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
