"""benchmarks/step_ops.py: the per-step op counter runs on the CPU and attributes ops to phases and sources."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from benchmarks import step_ops  # noqa: E402


@pytest.mark.slow
def test_smoke_counts_both_stacks_by_phase_and_source(tmp_path, monkeypatch, capsys):
    """A 2-layer Gemma with LoRA: both stacks count ops in every phase, our loss shows as our chunked loss and
    the baseline's as transformers', and the optimizer (the same AdamW over the same 28 LoRA tensors) the same."""
    import json

    monkeypatch.setenv("TUIFT_BENCH_SCRATCH", str(tmp_path / "scratch"))
    assert step_ops.main(["--smoke", "--json", str(tmp_path / "ops.json")]) == 0
    results = {r["stack"]: r for r in json.loads((tmp_path / "ops.json").read_text())["results"]}
    assert set(results) == {"ours:universal", "baseline"}
    for stack, result in results.items():
        phases = step_ops.totals(result["ops"], lambda row: row["phase"], views=False)
        assert all(phases[phase] > 0 for phase in step_ops.PHASES), (stack, phases)
        assert result["layers"] == 2 and result["trainable_tensors"] == 2 * 7 * 2
    sources = {name: step_ops.totals(r["ops"], lambda row: row["source"]) for name, r in results.items()}
    assert sources["ours:universal"]["loss (ours, chunked)"] > 0 and "loss (ours, chunked)" not in sources["baseline"]
    assert sources["baseline"]["loss (transformers)"] > 0
    assert sources["ours:universal"]["optimizer"] == sources["baseline"]["optimizer"]
    assert "| kernel ops: recompute |" in capsys.readouterr().out
