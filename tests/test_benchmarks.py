"""benchmarks/memory_speed.py: the case syntax, the parity / planner / speed arithmetic, and a --smoke run on
the CPU (tiny Llama, ours:universal against the baseline stack) that writes the JSON and markdown.
benchmarks/cards.py (the card simulator): the grid, the holder's arithmetic on a fake card, reading run
folders, the report, and a --smoke run that trains, kills and resumes through the real CLI on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import card_holder, card_report, card_run, cards, memory_speed, report  # noqa: E402
from benchmarks.memory_speed import CaseError, case_text, parse_case, parse_stack, parse_stacks  # noqa: E402
from tui_finetune.core import gpu_allocator  # noqa: E402
from tui_finetune.core.events import (  # noqa: E402
    CheckpointEvent, EndEvent, ErrorEvent, EventLog, PhaseEvent, StepEvent, WarningEvent)
from tui_finetune.core.recipe import RecipeSpec, TrainSpec  # noqa: E402

GIB = 1024**3


# ---------------------------------------------------------------- case and stack syntax

def test_case_without_a_cap_takes_the_default_cap():
    assert parse_case("gemma-2b:qlora:1024:1") == {"model": "gemma-2b", "method": "qlora", "seq": 1024, "batch": 1,
                                                   "accum": 1, "cap_gb": None, "lengths": "fixed"}
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
    assert parse_stack("ours:compiled:dynamic") == "ours:compiled:dynamic"
    with pytest.raises(CaseError, match="ours:compiled:dynamic"):
        parse_stack("ours:universal:dynamic")  # only the compiled backend compiles layers
    with pytest.raises(CaseError, match="ours:universal"):
        parse_stack("ours:triton")
    with pytest.raises(CaseError):
        parse_stack("axolotl")


def test_uncapped_baseline_runs_without_the_cap_but_stays_in_its_case(monkeypatch, tmp_path):
    asked, stacks_asked = [], []

    def fake_child(args, smoke, timeout, stack=""):
        asked.append(args[args.index("--cases") + 1])
        stacks_asked.append(stack)
        if args[args.index("--one") + 1] == "unsloth":
            return None, "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory."
        return {"stack": args[args.index("--one") + 1], **parse_case(asked[-1])}, ""

    monkeypatch.setattr(memory_speed, "run_child", fake_child)
    options = memory_speed.build_parser().parse_args(["--baseline-uncapped", "--out", str(tmp_path), "--tag", "t"])
    case = parse_case("gemma-2b:qlora:2048:1:3.55")
    ours, base, uns = (memory_speed.measure(case, stack, options, []) for stack in ("ours:auto", "baseline", "unsloth"))
    assert asked == ["gemma-2b:qlora:2048:1:3.55", "gemma-2b:qlora:2048:1", "gemma-2b:qlora:2048:1:3.55"]
    assert stacks_asked == ["ours:auto", "baseline", "unsloth"]  # child_env's allocator setting follows the stack
    assert (ours["cap_gb"], ours["cap_applied"]) == (3.55, True)
    assert (base["cap_gb"], base["cap_applied"]) == (3.55, False)  # same case key: parity compares with it
    assert uns["error"].startswith("OOM: torch.OutOfMemoryError")
    assert "OutOfMemoryError" in (tmp_path / "t.log").read_text()  # the failed child's output is kept


def test_our_stacks_start_with_the_products_allocator_setting_and_the_others_with_pytorchs(monkeypatch):
    monkeypatch.setattr(gpu_allocator, "expandable_segments_safe", lambda *a: True)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert memory_speed.child_env(False, "ours:compiled")["PYTORCH_CUDA_ALLOC_CONF"] == gpu_allocator.EXPANDABLE_SEGMENTS
    for stack in ("baseline", "unsloth", ""):  # a notebook's default; Unsloth sets its own when it imports
        assert "PYTORCH_CUDA_ALLOC_CONF" not in memory_speed.child_env(False, stack)


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


def test_a_cells_batching_comes_from_run_json_packing():
    grouped = {"rows": 57, "bins": 29, "tokens": 3000, "seq_len": 128, "effective_batch": 4, "bins_per_step": 2,
               "kind": "grouped", "padded": 3500}
    assert card_run.batching_of({}) == "padded rows"  # the engine writes no record for plain rows
    assert card_run.batching_of(grouped) == "length groups: 57 rows in 29 of <= 128 tokens, 2 a step"
    assert card_run.batching_of({**grouped, "kind": "flat"}).startswith("packed bins: 57 rows in 29")
    assert card_run.batching_of({"rows": 3}).startswith("unknown")  # not read as padded rows


def test_the_backends_section_says_which_unsloth_rows_ran_with_its_compiler_off_and_each_rows_allocator():
    """The child sets UNSLOTH_COMPILE_DISABLE for Gemma itself, so the parent's command line can't say it."""
    case = {"model": "gemma-2b", "method": "qlora", "seq": 1024, "batch": 1}
    rows = [{**case, "stack": "ours", "backend": "unsloth", "backend_reason": "fastest", "unsloth_compile_disable": "1"},
            {**case, "stack": "unsloth", "unsloth_compile_disable": "1"},
            {**case, "stack": "ours:universal", "backend": "universal", "unsloth_compile_disable": "1"},
            {**case, "stack": "baseline", "unsloth_compile_disable": "1"},
            {**case, "stack": "unsloth", "rep": 2, "unsloth_compile_disable": None},
            {**case, "stack": "ours:compiled", "backend": "compiled",
             "alloc_conf": "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"}]
    text = "\n".join(report.backend_lines(rows))
    off = [line for line in text.splitlines() if "compiler off" in line]
    assert off == ["- gemma-2b qlora seq 1024 x1 ours: Unsloth's compiler off (UNSLOTH_COMPILE_DISABLE=1)",
                   "- gemma-2b qlora seq 1024 x1 unsloth: Unsloth's compiler off (UNSLOTH_COMPILE_DISABLE=1)"]
    assert [line for line in text.splitlines() if "allocator" in line] == [
        "- gemma-2b qlora seq 1024 x1 ours:compiled: allocator PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"]



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
def test_smoke_run_trains_the_real_length_case_grouped_padded_and_packed_on_the_cpu(tmp_path):
    """The CPU smoke is the real-length case (issue #14) at micro-batch 2 x accumulation 2: ours grouped by
    length (the recipe's default), ours on padded rows (:rows), ours packed and the baseline, whose batches are
    padded to their longest row; the fixed-length path is tested in-process (tests/test_benchmarks_real_lengths.py)."""
    env = {**os.environ, "TUIFT_BENCH_SCRATCH": str(tmp_path / "scratch")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_speed", "--smoke", "--out", str(tmp_path / "out"),
                           "--tag", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "smoke.json").read_text())
    rows = {row["stack"]: row for row in payload["rows"]}
    assert set(rows) == {"ours:universal", "ours:universal:rows", "ours:universal:packed", "baseline"}, payload["rows"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["lengths"] == "real" and (row["batch"], row["accum"]) == (2, 2)
        assert len(row["losses"]) == payload["steps"] and all(math.isfinite(x) for x in row["losses"])
        assert row["tokens_per_s"] > 0 and row["useful_tokens_per_s"] > row["loss_tokens_per_s"] > 0
    grouped, padded, packed, base = (rows[s] for s in ("ours:universal", "ours:universal:rows",
                                                       "ours:universal:packed", "baseline"))
    assert [r["batching"] for r in (grouped, padded, packed, base)] == ["grouped", "rows", "packed", "rows"]
    assert padded["packing"] is False and packed["packing"] is True and base["packing"] is False
    # the same rows, 2 micro-batches of 2 a step, each padded to its longest row: a share is padding
    assert padded["useful_share"] == base["useful_share"] < 0.9
    assert padded["rows_per_step"] == base["rows_per_step"] == 4 and padded["passes_per_step"] == 2
    assert packed["useful_share"] == 1.0 and packed["useful_tokens_per_s"] == packed["tokens_per_s"]
    # rows of similar length share a padded pass: less padding, fewer passes for about the same rows a step
    assert grouped["useful_share"] > padded["useful_share"]
    assert grouped["passes_per_step"] < 2 and packed["passes_per_step"] < 2
    assert 2 < grouped["rows_per_step"] <= 6 and 2 < packed["rows_per_step"] <= 6
    assert padded["backend"] == "universal" and padded["backend_reason"]
    assert padded["planner_torch_gib"] > 0 and padded["planner_error"] is None  # no GPU peak on the CPU
    # fp32 on the CPU, same seed, same rows: the chunked loss equals transformers' loss
    assert padded["parity_max_rel"] is not None and padded["parity_max_rel"] < 1e-4 and padded["parity_ok"] is True
    # grouped and packed steps train other rows than the baseline's: no step-by-step parity
    for other in (grouped, packed):
        assert other["parity_max_rel"] is None and other["parity_ok"] is None
    for ours in (grouped, padded, packed):
        assert ours["speed_vs_baseline"] == pytest.approx(ours["useful_tokens_per_s"] / base["useful_tokens_per_s"])
    md = (tmp_path / "out" / "smoke.md").read_text()
    for line in ("- date: ", "- card: CPU", "- versions: python ", "- command: `"):
        assert line in md
    label = "| smoke-llama lora seq 512 x2 accum 2 real lengths | - |"
    assert "--smoke" in md and f"{label} ours:universal:packed | universal |" in md
    rows_line = next(line for line in md.splitlines() if line.startswith(f"{label} ours:universal:rows |"))
    assert rows_line.endswith("| 4.0 |")  # rows/step, the table's last column
    assert "## Goals" in md and "Speed at equal memory" not in md  # no GPU peaks, nothing to compare
    assert "(packed into bins: each step trains other rows than the baseline's" in md
    assert "ours:universal (grouped by length: each step trains other rows than the baseline's" in md


# ---------------------------------------------------------------- the card simulator (benchmarks/cards.py)



def test_simulator_parent_never_imports_torch():
    """The parent must hold no CUDA context: it would take memory the holder has measured out."""
    code = "import sys, benchmarks.cards, benchmarks.card_run, benchmarks.card_report; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_issue11_grid_is_every_gpu_preset_twice_plus_unsloth_with_one_kill_per_card_size():
    presets = cards.gpu_presets()
    assert presets and all(p.split("gb-")[0].isdigit() for p in presets) and "demo-cpu" not in presets
    default = cards.expand_cells("all-default")
    assert len(default) == 2 * len(presets) and not any(c.kill or c.install != "default" for c in default)
    grid = cards.expand_cells("issue11")
    keys = [c.key for c in grid]
    assert len(grid) == 2 * len(presets) + 3 and len(set(keys)) == len(keys)
    assert "8gb-llama-3.1-8b-qlora:desktop:unsloth" in keys
    kills = [c for c in grid if c.kill]
    assert sorted(c.card_gib for c in kills) == sorted({c.card_gib for c in grid})  # one per card size
    assert all(c.state == "desktop" and c.install == "default" for c in kills)
    assert "4gb-gemma-2b-qlora:desktop:default:kill" in keys  # gemma sorts before phi: the first 4 GB preset
    assert "4gb-phi-2-qlora:desktop:default" in keys


def test_cell_names_its_card_and_the_free_memory_of_each_state():
    cell = cards.parse_cell("4gb-gemma-2b-qlora:desktop:unsloth")
    assert (cell.card_gib, cell.install, cell.kill) == (4, "unsloth", False)
    assert cell.target_free_bytes == int(3.0 * GIB)
    assert cards.parse_cell("16gb-mistral-7b-qlora:headless:default:kill").target_free_bytes == int(15.7 * GIB)
    assert cards.model_key(cell) == "gemma-2b"
    first = cards.expand_cells("issue11,4gb-gemma-2b-qlora:headless:default")[0]
    assert first.key == "4gb-gemma-2b-qlora:headless:default"  # each cell once


@pytest.mark.parametrize("text, hint", [
    ("4gb-gemma-2b-qlora:desktop", "PRESET:STATE:INSTALL"),
    ("4gb-gemma-2b-qlora:desktop:default:stop", "PRESET:STATE:INSTALL"),
    ("demo-cpu:desktop:default", "not a GPU preset"),
    ("4gb-gemma-2b-qlora:laptop:default", "state 'laptop'"),
    ("4gb-gemma-2b-qlora:desktop:liger", "install 'liger'"),
])
def test_bad_cell_names_what_is_wrong(text, hint):
    with pytest.raises(cards.CellError, match=hint):
        cards.parse_cell(text)


def test_chat_data_is_deterministic_and_longer_than_every_preset(tmp_path):
    first = cards.write_chat_data(tmp_path / "a.jsonl").read_text()
    assert cards.write_chat_data(tmp_path / "b.jsonl").read_text() == first
    rows = [json.loads(line) for line in first.splitlines()]
    lengths = [len(r["messages"][1]["content"].split()) for r in rows]
    from tui_finetune.core.presets import find_recipe
    from tui_finetune.core.recipe_io import load_recipe

    longest_preset = max(load_recipe(find_recipe(p)).data.seq_len for p in cards.gpu_presets())
    assert len(rows) == 60 and sum(n > longest_preset + 64 for n in lengths) == 42 and min(lengths) < 64
    middling = sorted(n for n in lengths if 64 <= n < cards.LONG_WORDS)
    assert len(middling) == 12 and middling[0] < 300 and middling[-1] > 3900  # groups of several rows at any seq_len
    assert cards.LONG_WORDS > longest_preset
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)


class FakeCuda:
    """torch.cuda as the holder sees it: free memory is the total less the context and the blocks the caching
    allocator holds; a dropped block stays reserved until ``empty_cache`` (as in torch)."""

    def __init__(self, total: int, context: int, rounding: int = 1) -> None:
        self.total, self.context, self.rounding = total, context, rounding
        self.reserved: list[list] = []  # [weakref to the block, bytes it took]
        self.context_made = False

    def init(self) -> None:
        pass

    def mem_get_info(self):
        used = (self.context if self.context_made else 0) + sum(size for _, size in self.reserved)
        return self.total - used, self.total

    def empty_cache(self) -> None:
        self.reserved = [entry for entry in self.reserved if entry[0]() is not None]


class FakeBlock:
    def __init__(self, size: int) -> None:
        self.size = size

    def numel(self) -> int:
        return self.size


def fake_torch(cuda: FakeCuda):
    import types
    import weakref

    def empty(size, dtype=None, device=None):
        cuda.context_made = True
        block = FakeBlock(size)
        if size > 1:  # the 1-byte tensor that makes the context lives in the context
            cuda.reserved.append([weakref.ref(block), -(-size // cuda.rounding) * cuda.rounding])
        return block

    return types.SimpleNamespace(cuda=cuda, empty=empty, uint8="uint8")


@pytest.mark.parametrize("rounding", [1, 2 * 1024**2, 20 * 1024**2])
def test_holder_stops_within_16_mib_of_the_target_counting_its_own_context(monkeypatch, rounding):
    """Blocks may take more than asked: cudaMalloc's 2 MiB pages, torch's 20 MiB buffers."""
    cuda = FakeCuda(total=139 * GIB, context=500 * 1024**2, rounding=rounding)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda))
    target = int(3.7 * GIB)
    blocks = card_holder.hold_until_free(target)
    assert abs(cuda.mem_get_info()[0] - target) <= card_holder.TOLERANCE_BYTES
    assert len(blocks) == len(cuda.reserved)  # what the holder keeps is what the card lost


def test_holder_refuses_a_target_above_what_is_free_after_its_context(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(FakeCuda(total=4 * GIB, context=GIB)))
    with pytest.raises(SystemExit, match="can't simulate"):
        card_holder.hold_until_free(int(3.7 * GIB))


def test_held_card_reads_ready_and_release_ends_the_holder(tmp_path):
    script = "print('loading', flush=True); print('READY 123 456 789', flush=True); import time; time.sleep(120)"
    held = card_holder.HeldCard.start(100, dict(os.environ), tmp_path, [sys.executable, "-c", script])
    assert (held.nvml_free_at_ready, held.held_bytes, held.cuda_free_at_ready) == (123, 456, 789)
    held.release()
    assert held.proc.returncode is not None
    with pytest.raises(card_holder.HolderFailed, match="out of memory here"):
        card_holder.HeldCard.start(100, dict(os.environ), tmp_path,
                                   [sys.executable, "-c", "print('out of memory here'); raise SystemExit(1)"])


def test_worker_watch_keeps_the_peaks_of_the_worker_and_the_card():
    class FakeNvml:
        def __init__(self):
            self.used = iter([10 * GIB, 12 * GIB, 11 * GIB])
            self.per_pid = iter([1 * GIB, None, 3 * GIB])

        def used_bytes(self):
            return next(self.used)

        def process_bytes(self, pids):
            assert os.getpid() in pids
            return next(self.per_pid)

    watch = card_run.WorkerWatch(FakeNvml())
    for _ in range(3):
        watch.sample(os.getpid())
    assert (watch.worker_peak, watch.device_peak, watch.samples) == (3 * GIB, 12 * GIB, 3)
    idle = card_run.WorkerWatch(None)
    idle.sample(os.getpid())
    assert idle.worker_peak is None and idle.samples == 0


def _fake_run(tmp_path: Path, events: list, recipe=None, **info) -> Path:
    from tui_finetune.core.run_folder.info import create_run, update_run_info

    run_dir = create_run(recipe or RecipeSpec(model="gemma-2b"), tmp_path / "data.jsonl", base=tmp_path / "runs")
    update_run_info(run_dir, state=info.pop("state", "failed"), pid=None, **info)
    with EventLog(run_dir / "events.jsonl") as log:
        for event in events:
            log.emit(event)
    return run_dir


def test_results_of_a_run_that_refused_on_a_measurement(tmp_path):
    run_dir = _fake_run(tmp_path, [
        WarningEvent(message="auto-fit: micro-batch 2 -> 1", advice="to keep this value: --set train.micro_batch=2"),
        WarningEvent(message="5 row(s) are longer than data.seq_len"),
        ErrorEvent(message="CUDA out of memory in the fit-check even at micro-batch 1 x 512 tokens: 2.9 GiB",
                   advice="a smaller model", kind="oom"),
        EndEvent(state="failed")], autofit=["micro-batch 2 -> 1: --set train.micro_batch=1"],
        recipe=RecipeSpec(model="gemma-2b", train=TrainSpec(micro_batch=1, grad_accum=16)))
    row = card_run.read_results(run_dir)
    assert (row["state"], row["micro_batch"], row["grad_accum"], row["seq_len"]) == ("failed", 1, 16, 1024)
    assert row["autofit_warnings"] == ["auto-fit: micro-batch 2 -> 1"] and row["warnings"][0].startswith("5 row(s)")
    assert row["error"]["kind"] == "oom" and row["phase_peaks_gib"] is None
    assert card_run.classify(row) == "refused (measured)"
    assert card_run.classify({**row, "error": {**row["error"], "message": "the planner estimates 3.0 GiB"}}) \
        == "refused (estimate)"
    late = {**row, "steps_done": 3, "error": {"kind": "oom", "message": "CUDA out of memory"}}
    assert card_run.classify(late) == "OOM"
    assert card_run.classify({**row, "timed_out": True}) == "timeout"


def test_results_of_a_completed_run_with_phase_peaks(tmp_path):
    run_dir = _fake_run(tmp_path, [
        PhaseEvent(phase="fit", message="the longest batch fits (1 example(s) in 1 x 2048 tokens): peak 2.77 GiB "
                                        "reserved (2.50 GiB allocated); forward and backward in 1.2s"),
        StepEvent(step=1, total_steps=4, epoch=0.1, loss=9.0, vram_peak_mb=2900.0),
        CheckpointEvent(step=2, path="checkpoints/step-000002"),
        StepEvent(step=4, total_steps=4, epoch=0.2, loss=8.0, vram_peak_mb=3072.0),
        EndEvent(state="completed")], state="completed", backend="universal", backend_reason="pure PyTorch")
    run_json = run_dir / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "phase_peaks_gib": {"fit": 2.8, "eval": 1.5}}))
    row = card_run.read_results(run_dir)
    assert row["fit_peak_gib"] == pytest.approx(2.77) and row["step_peak_gib"] == pytest.approx(3.0)
    assert row["phase_peaks_gib"] == {"fit": 2.8, "eval": 1.5} and row["steps_done"] == 4
    row.update(outcome=card_run.classify(row), wall_s=12.0, free_gib_at_start=3.0, nvml_worker_peak_gib=3.4,
               kill={"done": True, "after_checkpoint": "step-000002", "state_after_kill": "interrupted",
                     "resume_exit": 0, "resumed_from": "step-000002", "resume_said": "step-000002"})
    line = card_report.table_row("4gb-gemma-2b-qlora:desktop:default:kill", row)
    assert "| **completed** | universal | 1 x 8, 1024 | 2.77 | fit 2.80 eval 1.50 | 3.00 | 3.40 | 12 s |" in line
    assert "resumed from step-000002 (said step-000002)" in line


def test_report_keeps_cells_across_calls_and_retries_simulator_errors(tmp_path):
    results = card_report.load_results(tmp_path)
    results["invocations"].append({"date": "d1", "card": {"name": "NVIDIA H200", "driver": "580", "total_gib": 139.8},
                                   "versions": {"torch": "2.11"}, "command": "python -m benchmarks.cards", "cells": []})
    results["cells"]["8gb-llama-3.1-8b-qlora:desktop:default"] = {
        "outcome": "OOM", "error": {"kind": "oom", "message": "CUDA out of memory", "advice": "shorter"}}
    results["cells"]["4gb-phi-2-qlora:headless:default"] = {"outcome": "completed", "autofit": ["offload on: --set x"]}
    results["cells"]["4gb-gemma-2b-qlora:desktop:unsloth"] = {
        "outcome": card_report.SIMULATOR_ERROR, "simulator_error": "install 'unsloth': 'import unsloth' fails"}
    md = card_report.write_results(results, tmp_path).read_text()
    again = card_report.load_results(tmp_path)
    assert card_report.is_done(again, "4gb-phi-2-qlora:headless:default")
    assert not card_report.is_done(again, "4gb-gemma-2b-qlora:desktop:unsloth")
    assert md.index("`4gb-gemma-2b-qlora:desktop:unsloth`") < md.index("`4gb-phi-2-qlora:headless:default`") \
        < md.index("`8gb-llama-3.1-8b-qlora:desktop:default`")  # by card size, then preset
    assert "NVIDIA H200, driver 580, 139.8 GiB" in md and "auto-fit: offload on: --set x" in md
    assert "error (oom): CUDA out of memory -> shorter" in md
    assert ("**3 cells: 1 completed, 0 refused (0 on a measurement), 1 failed (1 out of memory), 1 not measured "
            "(simulator errors: the next call runs them again)**") in md


def test_a_recipe_the_cli_refuses_is_recorded_without_a_run(tmp_path):
    data = cards.write_chat_data(tmp_path / "chat.jsonl")
    recipe = cards.write_smoke_recipe(tmp_path / "smoke.toml")
    env = {**cards.child_env(True), "TUIFT_BENCH_SCRATCH": str(tmp_path)}
    job = card_run.CellJob("x", str(recipe), data, ["method=qlora"], False, env, tmp_path / "home", 120.0)
    row = card_run.run_cell(job)
    assert row["state"] == "not started" and row["outcome"] == "refused by the CLI"
    assert "qlora" in row["cli_error"] and "NVIDIA GPU" in row["cli_error"]


def test_install_label_must_match_the_environment(tmp_path):
    env = cards.child_env(True)
    assert cards.check_install("default", env) is None  # the CPU venv has no Unsloth
    assert "'import unsloth' fails" in cards.check_install("unsloth", env)
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text("")
    with_unsloth = {**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"}
    assert "unsloth is importable here" in cards.check_install("default", with_unsloth)
    assert cards.check_install("unsloth", with_unsloth) is None


def test_a_cell_for_another_install_is_skipped_without_a_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUIFT_BENCH_SCRATCH", str(tmp_path / "scratch"))
    code = cards.main(["--smoke", "--cells", f"{cards.SMOKE_PRESET}:cpu:unsloth", "--out", str(tmp_path / "out")])
    assert code == 1 and "skipped: install 'unsloth'" in capsys.readouterr().out
    assert not (tmp_path / "out" / "cards.json").exists()
    assert not (tmp_path / "scratch" / cards.stacks.SMOKE_MODEL).exists()  # no model was built for it


class FakeHeld:
    released = 0

    def __init__(self, target: int, free: int) -> None:
        self.target_free, self.nvml_free_at_ready, self.cuda_free_at_ready, self.held_bytes = target, free, free, 0

    def release(self) -> None:
        FakeHeld.released += 1


class FakeCardNvml:
    def __init__(self, free: int, used: int) -> None:
        self.free, self.used = free, used

    def free_bytes(self) -> int:
        return self.free

    def used_bytes(self) -> int:
        return self.used


def _measure_with(monkeypatch, tmp_path, nvml_free: int, outcome: Any) -> dict:
    cell = cards.parse_cell("4gb-gemma-2b-qlora:desktop:default")
    monkeypatch.setattr(cards.HeldCard, "start", classmethod(lambda cls, target, env, cwd: FakeHeld(target, 3 * GIB)))

    def fake_run_cell(job):
        if isinstance(outcome, BaseException):
            raise outcome
        return dict(outcome)

    monkeypatch.setattr(cards, "run_cell", fake_run_cell)
    args = cards.build_parser().parse_args(["--out", str(tmp_path / "out")])
    args.scratch, args.data, args.steps = str(tmp_path), str(tmp_path / "chat.jsonl"), 4
    return cards.measure(cell, args, {}, FakeCardNvml(nvml_free, 136 * GIB), "4gb-gemma-2b-qlora")


def test_measure_always_releases_the_card_and_checks_its_free_memory(monkeypatch, tmp_path):
    FakeHeld.released = 0
    row = _measure_with(monkeypatch, tmp_path, 3 * GIB, {"outcome": "completed", "nvml_worker_peak_gib": None,
                                                         "nvml_device_peak_gib": 139.5})
    assert row["free_gib_at_start"] == 3.0 and row["target_free_gib"] == 3.0 and FakeHeld.released == 1
    assert row["nvml_worker_peak_gib"] == pytest.approx(3.5) and row["nvml_worker_peak_source"] == "card"
    moved = _measure_with(monkeypatch, tmp_path, int(3.5 * GIB), {"outcome": "completed"})
    assert moved["outcome"] == card_report.SIMULATOR_ERROR and "another process" in moved["simulator_error"]
    assert FakeHeld.released == 2
    with pytest.raises(KeyboardInterrupt):
        _measure_with(monkeypatch, tmp_path, 3 * GIB, KeyboardInterrupt())
    assert FakeHeld.released == 3
    crashed = _measure_with(monkeypatch, tmp_path, 3 * GIB, RuntimeError("bug"))
    assert crashed["outcome"] == card_report.SIMULATOR_ERROR and "RuntimeError: bug" in crashed["simulator_error"]
    assert FakeHeld.released == 4


@pytest.mark.slow
def test_card_smoke_trains_kills_resumes_and_is_resumable(tmp_path):
    """The whole simulator on the CPU: a plain cell and a :kill cell through the real CLI and worker."""
    env = {**os.environ, "TUIFT_BENCH_SCRATCH": str(tmp_path / "scratch")}
    command = [sys.executable, "-m", "benchmarks.cards", "--smoke", "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "cards.json").read_text())
    plain, killed = (results["cells"][key] for key in cards.SMOKE_CELLS.split(","))
    for row in (plain, killed):
        assert row["outcome"] == "completed" and row["state"] == "completed" and row["adapter_saved"], row
        assert row["steps_done"] == cards.DEFAULT_STEPS and row["backend"] == "universal"
        assert (row["micro_batch"], row["grad_accum"], row["seq_len"]) == (2, 2, 64)
        rows, groups = map(int, re.match(r"length groups: (\d+) rows in (\d+) of", row["batching"]).groups())
        assert 50 <= rows <= 60 and groups < rows, row["batching"]  # the default; several short rows a group
    kill = killed["kill"]
    assert kill["done"] and kill["state_after_kill"] == "interrupted" and kill["resume_exit"] == 0
    assert kill["after_checkpoint"].startswith("step-")  # the first checkpoint: the one it was killed after
    assert kill["resumed_from"] == kill["resume_said"] == kill["after_checkpoint"], kill
    md = (tmp_path / "out" / "cards.md").read_text()
    assert "`smoke-llama-lora:cpu:default`" in md and "`smoke-llama-lora:cpu:default:kill`" in md
    assert f"resumed from {kill['after_checkpoint']}" in md and "**2 cells: 2 completed" in md
    assert f"batching: {plain['batching']}" in md
    assert not list((tmp_path / "scratch" / "homes").iterdir())  # each cell's home is gone
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 cells, 2 already in" in again.stdout
    after = json.loads((tmp_path / "out" / "cards.json").read_text())
    assert after["cells"] == results["cells"] and len(after["invocations"]) == 1  # nothing ran: no new header


def test_the_fitted_variant_auto_fits_the_recipe_to_the_cases_cap_and_the_report_says_what_changed(tmp_path):
    from benchmarks.report import _backend_cell
    from benchmarks.stacks import fit_to_cap, ours_recipe

    roomy, tight = parse_case("gemma-2b:qlora:1024:1:12"), parse_case("gemma-2b:qlora:1024:1:2.4")
    recipe = ours_recipe(tmp_path, roomy, "universal", [], False, "fitted")
    fitted, settings = fit_to_cap(recipe, roomy)
    kept = fitted.memory.layers_keeping_activations
    assert isinstance(kept, int) and kept > 0 and settings == [f"memory.layers_keeping_activations={kept}"]
    assert fit_to_cap(recipe, tight)[1] != settings  # a tight cap spends nothing on kept layers
    assert _backend_cell({"backend": "universal", "autofit": settings}) == f"universal; fitted: {settings[0]}"
    with pytest.raises(SystemExit, match="give the case one"):
        fit_to_cap(recipe, parse_case("gemma-2b:qlora:1024:1"))
