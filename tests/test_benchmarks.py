"""benchmarks/memory_speed.py: the case syntax, the parity / planner / speed arithmetic, and a --smoke run on
the CPU (tiny Llama, ours:universal against the baseline stack) that writes the JSON and markdown."""

from __future__ import annotations

import importlib.util
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

from benchmarks import memory_speed, report  # noqa: E402
from benchmarks.memory_speed import CaseError, case_text, parse_case, parse_stack, parse_stacks  # noqa: E402


# ---------------------------------------------------------------- case and stack syntax

def test_case_without_a_cap_takes_the_default_cap():
    assert parse_case("gemma-2b:qlora:1024:1") == {"model": "gemma-2b", "method": "qlora", "seq": 1024, "batch": 1,
                                                   "cap_gb": None}
    assert parse_case("gemma-2b:qlora:1024:1", default_cap=3.55)["cap_gb"] == 3.55


def test_case_cap_overrides_the_default_and_round_trips():
    case = parse_case("mistral-7b:qlora:40960:1:15.5", default_cap=3.55)
    assert case["cap_gb"] == 15.5 and case["seq"] == 40960
    assert case_text(case) == "mistral-7b:qlora:40960:1:15.5"
    assert parse_case(case_text(case)) == case


@pytest.mark.parametrize("text, hint", [
    ("gemma-2b:qlora:1024", "model:method:seq:batch"),
    ("gemma-2b:full:1024:1", "method 'full'"),
    ("gemma-2b:qlora:long:1", "whole numbers"),
    ("gemma-2b:qlora:1024:1:four", "whole numbers"),
    ("gemma-2b:qlora:1024:0", "batch at least 1"),
])
def test_bad_case_names_what_is_wrong(text, hint):
    with pytest.raises(CaseError, match=hint):
        parse_case(text)


def test_stacks_plain_ours_means_auto_and_duplicates_collapse():
    assert parse_stack("ours") == "ours:auto"
    assert parse_stacks("ours,ours:universal,ours:auto,baseline,unsloth,ours:liger,ours:unsloth") == [
        "ours:auto", "ours:universal", "baseline", "unsloth", "ours:liger", "ours:unsloth"]
    with pytest.raises(CaseError, match="ours:universal"):
        parse_stack("ours:triton")
    with pytest.raises(CaseError):
        parse_stack("axolotl")


def test_uncapped_baseline_runs_without_the_cap_but_stays_in_its_case(monkeypatch, tmp_path):
    asked = []

    def fake_child(args, smoke, timeout):
        asked.append(args[args.index("--cases") + 1])
        if args[args.index("--one") + 1] == "unsloth":
            return None, "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory."
        return {"stack": args[args.index("--one") + 1], **parse_case(asked[-1])}, ""

    monkeypatch.setattr(memory_speed, "run_child", fake_child)
    options = memory_speed.build_parser().parse_args(["--baseline-uncapped", "--out", str(tmp_path), "--tag", "t"])
    case = parse_case("gemma-2b:qlora:2048:1:3.55")
    ours, base, uns = (memory_speed.measure(case, stack, options, []) for stack in ("ours:auto", "baseline", "unsloth"))
    assert asked == ["gemma-2b:qlora:2048:1:3.55", "gemma-2b:qlora:2048:1", "gemma-2b:qlora:2048:1:3.55"]
    assert (ours["cap_gb"], ours["cap_applied"]) == (3.55, True)
    assert (base["cap_gb"], base["cap_applied"]) == (3.55, False)  # same case key: parity compares with it
    assert uns["error"].startswith("OOM: torch.OutOfMemoryError")
    assert "OutOfMemoryError" in (tmp_path / "t.log").read_text()  # the failed child's output is kept


# ---------------------------------------------------------------- arithmetic

def test_parity_is_the_worst_relative_difference_over_the_first_50_steps():
    baseline = [10.0] * 60
    losses = [10.0] * 60
    losses[3] = 10.05  # 0.5%
    losses[55] = 20.0  # after step 50: not counted
    assert report.parity_max_rel(losses, baseline) == pytest.approx(0.005)
    assert report.within(report.parity_max_rel(losses, baseline), report.PARITY_GOAL) is True
    losses[10] = 9.8  # 2%
    assert report.parity_max_rel(losses, baseline) == pytest.approx(0.02)
    assert report.within(0.02, report.PARITY_GOAL) is False


def test_parity_of_a_nan_loss_fails_and_of_nothing_is_unknown():
    assert math.isnan(report.parity_max_rel([1.0, math.nan], [1.0, 1.0]))
    assert report.within(math.nan, report.PARITY_GOAL) is False
    assert report.parity_max_rel([], [1.0]) is None
    assert report.within(None, report.PARITY_GOAL) is None


def test_planner_error_is_relative_to_the_measured_peak():
    assert report.relative_error(4.4, 4.0) == pytest.approx(0.10)
    assert report.relative_error(3.0, 4.0) == pytest.approx(-0.25)
    assert report.relative_error(3.0, None) is None
    assert report.within(-0.099, report.PLANNER_GOAL) and not report.within(-0.25, report.PLANNER_GOAL)


def _row(stack: str, tokens: float, losses: list[float], **extra) -> dict:
    return {"stack": stack, "model": "phi-2", "method": "qlora", "seq": 2048, "batch": 1, "cap_gb": 3.55,
            "tokens_per_s": tokens, "losses": losses, **extra}


def test_summarize_compares_each_row_with_the_baseline_and_unsloth_of_its_case():
    rows = [_row("baseline", 2000.0, [10.0, 9.0]),
            _row("unsloth", 5000.0, [10.0, 9.09]),
            _row("ours:universal", 4000.0, [10.0, 9.0], peak_reserved_gib=3.0, planner_torch_gib=2.85),
            _row("ours:liger", 4500.0, [10.0, 9.5], peak_reserved_gib=3.0, planner_torch_gib=3.6),
            {**_row("ours:universal", 0.0, []), "seq": 4096, "error": "OOM: CUDA out of memory"}]
    report.summarize(rows)
    base, uns, universal, liger, oom = rows
    assert "parity_max_rel" not in base and base["speed_vs_unsloth"] == pytest.approx(0.4)
    assert uns["parity_max_rel"] == pytest.approx(0.01) and "speed_vs_unsloth" not in uns
    assert universal["speed_vs_baseline"] == pytest.approx(2.0) and universal["speed_vs_unsloth"] == pytest.approx(0.8)
    assert universal["parity_ok"] is True and universal["planner_error"] == pytest.approx(-0.05)
    assert universal["planner_ok"] is True
    assert liger["parity_ok"] is False and liger["planner_ok"] is False
    assert "parity_max_rel" not in oom


def test_markdown_lists_the_rows_that_miss_the_goals(tmp_path):
    rows = [_row("baseline", 2000.0, [10.0, 9.0]),
            _row("ours:auto", 4000.0, [10.0, 9.5], peak_reserved_gib=3.0, planner_torch_gib=3.6, backend="universal",
                 backend_requested="auto"),
            _row("ours:liger", 4000.0, [10.0, 9.0], peak_reserved_gib=3.0, planner_torch_gib=3.0, backend="universal",
                 backend_requested="liger")]
    text = report.write_results(rows, "python -m benchmarks.memory_speed --x", 2, tmp_path, "t").read_text()
    assert "| phi-2 qlora seq 2048 x1 | 3.55 GiB | ours:liger | universal (asked liger) | 3.00 |" in text
    goals = text.split("## Goals", 1)[1]
    assert "parity" in goals and "phi-2 qlora seq 2048 x1 ours:auto (5.56%)" in goals
    assert "ours:auto (+20.0%)" in goals and "ours:liger (" not in goals
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["planner_ok"] is False


# ---------------------------------------------------------------- the whole script, on the CPU

def _backends_missing() -> bool:
    return importlib.util.find_spec("tui_finetune.engine.backends") is None


@pytest.mark.skipif(_backends_missing(), reason="tui_finetune.engine.backends (the engine's backend interface, "
                    "which the benchmark's ours:<backend> stacks load through) is not there yet")
def test_smoke_run_trains_both_stacks_on_the_cpu_and_writes_results(tmp_path):
    env = {**os.environ, "TUIFT_BENCH_SCRATCH": str(tmp_path / "scratch")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_speed", "--smoke", "--out", str(tmp_path / "out"),
                           "--tag", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "smoke.json").read_text())
    rows = {row["stack"]: row for row in payload["rows"]}
    assert set(rows) == {"ours:universal", "baseline"}, payload["rows"]
    for row in rows.values():
        assert "error" not in row, row
        assert len(row["losses"]) == payload["steps"] and all(math.isfinite(x) for x in row["losses"])
        assert row["tokens_per_s"] > 0
    ours = rows["ours:universal"]
    assert ours["backend"] == "universal" and ours["backend_reason"]
    assert ours["planner_torch_gib"] > 0 and ours["planner_error"] is None  # no GPU peak on the CPU
    # fp32 on the CPU, same seed, same LoRA initialisation: the chunked loss equals transformers' loss
    assert ours["parity_max_rel"] is not None and ours["parity_max_rel"] < 1e-4 and ours["parity_ok"] is True
    assert ours["speed_vs_baseline"] > 0
    md = (tmp_path / "out" / "smoke.md").read_text()
    for line in ("- date: ", "- card: CPU", "- versions: python ", "- command: `"):
        assert line in md
    assert "--smoke" in md and "| smoke-llama lora seq 64 x2 | - | ours:universal | universal |" in md
    assert "## Goals" in md
