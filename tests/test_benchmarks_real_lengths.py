"""Issue #14 in benchmarks/memory_speed.py: the real-length case (its lengths, the stated histogram, how each
stack batches it), the packed stacks, useful tokens/s, ratios at unequal memory, and --repeat's alternation,
mean and spread. The fixed-length path trains in-process here; the real-length case runs as the CPU smoke in
tests/test_benchmarks.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import batches, memory_speed, report, stacks  # noqa: E402
from benchmarks.memory_speed import CaseError, case_text, parse_case, parse_stack  # noqa: E402

VOCAB = 512


# ---------------------------------------------------------------- syntax

def test_real_length_case_round_trips_with_or_without_a_cap():
    case = parse_case("gemma-2b:qlora:1024:4:real")
    assert (case["lengths"], case["cap_gb"], case["batch"]) == ("real", None, 4)
    assert parse_case("gemma-2b:qlora:1024:4:real", default_cap=3.55)["cap_gb"] == 3.55
    capped = parse_case("gemma-2b:qlora:1024:4:3.55:real")
    assert capped["cap_gb"] == 3.55 and case_text(capped) == "gemma-2b:qlora:1024:4:3.55:real"
    assert parse_case(case_text(capped)) == capped
    assert case_text(parse_case("gemma-2b:qlora:1024:4:fixed")) == "gemma-2b:qlora:1024:4"
    with pytest.raises(CaseError, match="real"):
        parse_case("gemma-2b:qlora:1024:4:long")


def test_packed_stacks_name_their_backend_and_the_rest_is_refused():
    assert parse_stack("ours:packed") == "ours:auto:packed"
    assert parse_stack("ours:universal:packed") == "ours:universal:packed"
    assert parse_stack("ours:grouped") == "ours:auto:grouped" and parse_stack("ours:liger:rows") == "ours:liger:rows"
    assert stacks.split_stack("ours:universal:packed") == ("ours", "universal", "packed")
    assert stacks.split_stack("ours:auto") == ("ours", "auto", "")
    assert stacks.split_stack("baseline") == ("baseline", "", "")
    for bad in ("ours:packed:universal", "baseline:packed", "ours:triton:packed", "ours:universal:sorted"):
        with pytest.raises(CaseError, match="packed, grouped, rows"):
            parse_stack(bad)


def test_stack_variants_and_set_turn_packing_and_length_grouping_on_or_off_in_our_recipe(tmp_path):
    case = parse_case("smoke-llama:lora:512:4x4:real")
    plain = stacks.ours_recipe(tmp_path, case, "universal", [], True)
    assert plain.data.packing is False and plain.data.group_by_length is True  # the recipe's default groups
    assert (plain.train.micro_batch, plain.train.grad_accum) == (4, 4)
    assert stacks.ours_recipe(tmp_path, case, "universal", [], True, stacks.PACKED).data.packing is True
    assert stacks.ours_recipe(tmp_path, case, "universal", ["data.packing=true"], True).data.packing is True
    assert stacks.ours_recipe(tmp_path, case, "universal", [], True, stacks.ROWS).data.group_by_length is False
    grouped = stacks.ours_recipe(tmp_path, case, "universal", ["data.group_by_length=false"], True, stacks.GROUPED)
    assert grouped.data.group_by_length is True  # the stack's variant wins over --set
    assert batches.batching_for(False, True, case) == batches.GROUPED
    assert batches.batching_for(True, True, case) == batches.PACKED
    assert batches.batching_for(False, False, case) == batches.ROWS
    # fixed rows are all seq long: each group would be `batch` rows, the passes of padded rows (and their parity)
    assert batches.batching_for(False, True, parse_case("smoke-llama:lora:512:4")) == batches.ROWS


def test_accumulation_parses_and_a_plain_batch_is_accumulation_1():
    case = parse_case("gemma-2b:qlora:1024:4x4:3.55:real")
    assert (case["batch"], case["accum"], case["cap_gb"], case["lengths"]) == (4, 4, 3.55, "real")
    assert case_text(case) == "gemma-2b:qlora:1024:4x4:3.55:real" and parse_case(case_text(case)) == case
    assert parse_case("gemma-2b:qlora:1024:4") == parse_case("gemma-2b:qlora:1024:4x1")
    assert parse_case("gemma-2b:qlora:1024:4")["accum"] == 1 and case_text(parse_case("x:lora:64:2x1")) == "x:lora:64:2"
    # a row written before the accumulation (no "accum") is in the same case as ":4" now
    old_row = {"model": "gemma-2b", "method": "qlora", "seq": 1024, "batch": 4, "cap_gb": None, "lengths": "real"}
    assert report.case_key(old_row) == report.case_key(parse_case("gemma-2b:qlora:1024:4:real"))
    assert report.case_key(old_row) != report.case_key(parse_case("gemma-2b:qlora:1024:4x4:real"))
    assert report.case_label(case) == "gemma-2b qlora seq 1024 x4 accum 4 real lengths"
    for bad in ("gemma-2b:qlora:1024:4x0", "gemma-2b:qlora:1024:4x", "gemma-2b:qlora:1024:x4"):
        with pytest.raises(CaseError, match="accum"):
            parse_case(bad)


# ---------------------------------------------------------------- the lengths

@pytest.mark.parametrize("seq, stated", [
    (1024, {"p10": 129, "p50": 274, "p90": 587, "p99": 1024, "mean": 325, "in_100_600": 0.862, "above_600": 0.093,
            "at_seq": 0.015}),
    (2048, {"p10": 129, "p50": 274, "p90": 587, "p99": 1124, "mean": 329, "in_100_600": 0.862, "above_600": 0.093,
            "at_seq": 0.0006}),
])
def test_real_lengths_match_the_histogram_batches_py_states(seq, stated):
    """benchmarks/batches.py's docstring (and README) state these numbers: change the law, update them."""
    summary = batches.length_summary(batches.sample_lengths(10_000, seq), seq)
    for key, value in stated.items():
        assert summary[key] == pytest.approx(value, abs=0.0006 if isinstance(value, float) else 0), key


def test_real_lengths_are_seeded_bounded_and_a_longer_draw_extends_a_shorter():
    short, long = batches.sample_lengths(200, 1024), batches.sample_lengths(400, 1024)
    assert long[:200] == short and batches.sample_lengths(200, 1024) == short
    assert min(long) >= batches.MIN_ROW and max(long) <= 1024
    assert batches.sample_lengths(200, 1024, seed=1) != short
    assert max(batches.sample_lengths(200, 64)) == 64  # truncated to seq
    assert batches.padded_useful_share(batches.sample_lengths(200, 1024), 4) == pytest.approx(0.589, abs=0.001)
    assert batches.padded_useful_share([5, 5, 5], 1) == 1.0


def test_fixed_rows_are_the_draw_memory_speed_always_made():
    case = parse_case("smoke-llama:lora:64:2")
    rows = batches.make_rows(case, 6, VOCAB)
    g = torch.Generator().manual_seed(1234)
    expected = [torch.randint(0, VOCAB, (2, 64), generator=g) for _ in range(3)]
    assert [r["input_ids"] for r in rows] == torch.cat(expected).tolist()
    assert all(r["labels"] == r["input_ids"] for r in rows)
    [(batch, useful, counted)], *_ = batches.step_batches(case, 3, VOCAB, None, "cpu")
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"] is batch["labels"]
    assert torch.equal(batch["input_ids"], expected[0]) and (useful, counted) == (128, 126)


def test_real_rows_mask_the_prompt_and_every_stack_batches_the_same_rows(tmp_path):
    """The baseline's notebook collator and our padding give the same tensors; packing drops only the padding."""
    stacks.save_stand_in_tokenizer(tmp_path, VOCAB)
    case = parse_case("smoke-llama:lora:1024:4:real")
    rows = batches.make_rows(case, 8, VOCAB)
    assert [len(r["input_ids"]) for r in rows] == batches.sample_lengths(8, 1024)
    first = rows[0]
    prompt = round(len(first["input_ids"]) * batches.PROMPT_SHARE)
    assert first["labels"][:prompt] == [-100] * prompt and first["labels"][prompt:] == first["input_ids"][prompt:]

    def run(kind: str, batching: str) -> list:
        collate = batches.collator_for(kind, batching, case, tmp_path)
        steps = list(batches.step_batches(case, 12, VOCAB, collate, "cpu", batching))
        assert all(len(step) == 1 for step in steps)  # accumulation 1: one micro-batch a step
        return [step[0] for step in steps]

    notebook, ours, packed = run("baseline", batches.ROWS), run("ours", batches.ROWS), run("ours", batches.PACKED)
    assert type(batches.collator_for("baseline", batches.ROWS, case, tmp_path)).__name__ == "DataCollatorForSeq2Seq"
    for (a, useful_a, loss_a), (b, useful_b, loss_b) in zip(notebook, ours):
        assert set(a) == set(b) == {"input_ids", "labels", "attention_mask"}
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert a["input_ids"].shape[1] == max(a["attention_mask"].sum(1).tolist())  # padded to the longest row
        assert useful_a == useful_b == int(a["attention_mask"].sum()) and loss_a == loss_b
    padded_tokens = sum(int(a["input_ids"].numel()) for a, _, _ in notebook)
    assert sum(u for _, u, _ in notebook) / padded_tokens == pytest.approx(
        batches.padded_useful_share(batches.sample_lengths(48, 1024), 4))
    # packed: 4 of the engine's bins a step, in one row of at most 4 x 1024 tokens, no padding, fuller passes
    for p, useful_p, loss_p in packed:
        assert set(p) == {"input_ids", "labels", "position_ids"} and p["input_ids"].shape[0] == 1
        assert useful_p == p["input_ids"].numel() <= 4 * 1024 and loss_p == batches.loss_tokens(p["labels"])
    assert sum(u for _, u, _ in packed) > 2 * sum(u for _, u, _ in notebook)
    steps = [micro for step in batches.packed_steps(case, 12, VOCAB) for micro in step]
    assert all(len(step) == 4 and all(b["position_ids"][0] == 0 and len(b["input_ids"]) <= 1024 for b in step)
               for step in steps) and len(steps) == 12
    assert batches.rows_per_step(case, 12, VOCAB, batches.PACKED) == sum(b["rows"] for s in steps for b in s) / 12 > 8
    assert batches.rows_per_step(case, 12, VOCAB, batches.ROWS) == 4.0


# ---------------------------------------------------------------- report: useful speed, memory, repeats

def _row(stack: str, useful: float, peak: float | None = None, rep: int | None = None, **extra) -> dict:
    row = {"stack": stack, "model": "gemma-2b", "method": "qlora", "seq": 1024, "batch": 4, "cap_gb": None,
           "lengths": "real", "tokens_per_s": useful * 1.6, "useful_tokens_per_s": useful, "losses": [10.0, 9.0],
           "peak_reserved_gib": peak, **extra}
    return row | ({"rep": rep} if rep is not None else {})


def test_ratios_use_useful_tokens_and_compare_each_round_with_its_own_baseline():
    rows = [_row("ours:universal", 3000, rep=1), _row("baseline", 2000, rep=1),
            _row("ours:universal", 3300, rep=2), _row("baseline", 3000, rep=2),
            {**_row("baseline", 1000), "lengths": "fixed"},  # another case: never a peer
            _row("ours:auto", 3000, rep=3, losses=[10.0, 9.9]), _row("unsloth", 2500, rep=3)]  # a round without baseline
    report.summarize(rows)
    assert rows[0]["speed_vs_baseline"] == pytest.approx(1.5) and rows[2]["speed_vs_baseline"] == pytest.approx(1.1)
    auto = rows[5]
    assert auto["speed_vs_baseline"] is None and auto["speed_vs_unsloth"] == pytest.approx(1.2)
    assert auto["parity_max_rel"] == pytest.approx(0.1)  # against the case's first baseline (round 1)
    old = {**_row("ours:auto", 0), "tokens_per_s": 500.0}
    del old["useful_tokens_per_s"]
    assert report.useful_speed(old) == 500.0  # results from before issue #14: fixed lengths, nothing padded


def test_a_ratio_at_unequal_memory_is_marked_and_explained(tmp_path):
    rows = [_row("ours:universal", 3000, peak=2.8), _row("ours:universal:packed", 4000, peak=4.0),
            _row("baseline", 2000, peak=7.05), _row("unsloth", 3500, peak=2.9)]
    text = report.write_results(rows, "python -m benchmarks.memory_speed --x", 2, tmp_path, "t").read_text()
    universal, packed = rows[0], rows[1]
    assert universal["baseline_peak_gib"] == 7.05 and universal["baseline_memory_ratio"] == pytest.approx(7.05 / 2.8)
    assert report.unequal_memory(packed["unsloth_memory_ratio"])  # 2.9 / 4.0 = 0.725: below 1 / 1.3
    assert "| ours:universal | - | 2.80 | 4800 | 3000 | 1.50† | 7.05 | 0.86 |" in text  # Unsloth's 2.9 is within 1.3x
    section = text.split("## Speed at equal memory", 1)[1].split("##", 1)[0]
    assert "ours:universal: 1.50x the baseline's useful tokens/s, but the baseline reserved 2.52x ours " \
           "(7.05 against 2.80 GiB)" in section
    assert "ours:universal:packed: 1.14x the Unsloth's useful tokens/s, but we reserved 1.38x the Unsloth's" in section
    assert "ours:universal: 0.86x the Unsloth" not in section


def test_repeat_runs_the_stacks_in_turn_and_reports_mean_spread_and_per_round_ratios(monkeypatch, tmp_path):
    speeds = {("ours:universal", 1): 3000.0, ("baseline", 1): 2000.0, ("ours:universal", 2): 3600.0,
              ("baseline", 2): 3000.0, ("ours:universal", 3): 3300.0}
    asked = []

    def fake_child(args, smoke, timeout, stack=""):
        stack = args[args.index("--one") + 1]
        asked.append(stack)
        rnd = sum(1 for s in asked if s == stack)
        if (stack, rnd) not in speeds:
            return None, "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory."
        case = parse_case(args[args.index("--cases") + 1])
        return {"stack": stack, **case, "tokens_per_s": speeds[stack, rnd], "useful_tokens_per_s": speeds[stack, rnd],
                "losses": [10.0, 9.0], "peak_reserved_gib": 3.0}, ""

    monkeypatch.setattr(memory_speed, "run_child", fake_child)
    options = memory_speed.build_parser().parse_args(
        ["--smoke", "--repeat", "3", "--steps", "2", "--out", str(tmp_path), "--tag", "t"])
    rows = memory_speed.run_all([parse_case("gemma-2b:qlora:1024:4:real")], ["ours:universal", "baseline"], options)
    assert asked == ["ours:universal", "baseline"] * 3  # A, B, A, B, A, B
    assert [r["rep"] for r in rows] == [1, 1, 2, 2, 3, 3]
    payload = json.loads((tmp_path / "t.json").read_text())
    ours = next(s for s in payload["repeats"] if s["stack"] == "ours:universal")
    assert ours["runs"] == 3 and ours["failed"] == 0 and ours["useful_mean"] == pytest.approx(3300)
    assert ours["spread"] == pytest.approx(600 / 3300)
    assert ours["vs_baseline"] == pytest.approx([(1.5 + 1.2) / 2, 1.2, 1.5])  # round 3's baseline failed
    base = next(s for s in payload["repeats"] if s["stack"] == "baseline")
    assert (base["runs"], base["failed"]) == (2, 1)
    text = (tmp_path / "t.md").read_text()
    assert "| gemma-2b qlora seq 1024 x4 real lengths | - | ours:universal #2 |" in text
    assert "| gemma-2b qlora seq 1024 x4 real lengths | ours:universal | 3 | 3300 | 3000-3600 | 18.2% | " \
           "1.35 (1.20-1.50) | - | 3.00 |" in text
    assert "| baseline | 2 (1 failed) |" in text


def test_a_single_run_has_no_rounds(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_speed, "run_child", lambda args, smoke, timeout, stack="": (
        {"stack": args[args.index("--one") + 1], **parse_case(args[args.index("--cases") + 1]),
         "tokens_per_s": 1.0, "losses": [1.0]}, ""))
    options = memory_speed.build_parser().parse_args(["--smoke", "--steps", "1", "--out", str(tmp_path)])
    rows = memory_speed.run_all([parse_case("gemma-2b:qlora:1024:1")], ["ours:auto", "baseline"], options)
    assert all("rep" not in r for r in rows)
    assert "## Repeats" not in (tmp_path / "latest.md").read_text()


def test_append_adds_rounds_to_the_tag_so_calls_under_a_time_limit_report_together(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_speed, "run_child", lambda args, smoke, timeout, stack="": (
        {"stack": args[args.index("--one") + 1], **parse_case(args[args.index("--cases") + 1]),
         "tokens_per_s": 100.0, "losses": [1.0]}, ""))
    case = parse_case("gemma-2b:qlora:1024:4:real")
    other = parse_case("phi-2:qlora:2048:1")

    def call(*extra: str) -> list[dict]:
        options = memory_speed.build_parser().parse_args(["--smoke", "--steps", "1", "--out", str(tmp_path), *extra])
        return memory_speed.run_all([case, other], ["ours:auto", "baseline"], options)

    call()  # a single run: no rounds in its rows
    rows = call("--append", "--repeat", "2")
    assert [(r["model"], r["rep"]) for r in rows] == [
        ("gemma-2b", 1), ("gemma-2b", 1), ("phi-2", 1), ("phi-2", 1),  # the first call's rows, now round 1
        ("gemma-2b", 2), ("gemma-2b", 2), ("gemma-2b", 3), ("gemma-2b", 3),
        ("phi-2", 2), ("phi-2", 2), ("phi-2", 3), ("phi-2", 3)]
    payload = json.loads((tmp_path / "latest.json").read_text())
    assert len(payload["rows"]) == 12 and payload["command"].count("python -m benchmarks.memory_speed") == 2
    gemma = next(s for s in payload["repeats"] if s["case"].startswith("gemma-2b") and s["stack"] == "ours:auto")
    assert gemma["runs"] == 3 and gemma["vs_baseline"] == pytest.approx([1.0, 1.0, 1.0])
    assert len(call()) == 4  # without --append the tag starts over


# ---------------------------------------------------------------- the fixed-length path, in-process

def test_fixed_length_case_trains_as_before_with_useful_equal_to_all_tokens(monkeypatch, tmp_path):
    monkeypatch.setenv("TUIFT_BENCH_SCRATCH", str(tmp_path))
    case = parse_case(f"{stacks.SMOKE_MODEL}:lora:64:2")
    ours = stacks.run_one(case, "ours:universal", 4, [], smoke=True)
    base = stacks.run_one(case, "baseline", 4, [], smoke=True)
    for row in (ours, base):
        assert row["packing"] is False and row["useful_share"] == 1.0
        assert row["useful_tokens_per_s"] == row["tokens_per_s"] > row["loss_tokens_per_s"] > 0
    assert report.parity_max_rel(ours["losses"], base["losses"]) < 1e-4
