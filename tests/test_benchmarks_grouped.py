"""Issue #14 in benchmarks/memory_speed.py, a hobbyist's recipe: gradient accumulation in the measured loop (a
step's loss over its label tokens, as Trainer's num_items_in_batch) and ours grouped by length as the engine
groups (data.group_by_length), with rows/step in the report. The CPU smoke (tests/test_benchmarks.py) trains
the grouped stack end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import batches, report, stacks  # noqa: E402
from benchmarks.memory_speed import parse_case  # noqa: E402
from tui_finetune.data.packing import bins_per_step  # noqa: E402

VOCAB = 512


def _ids(row: dict) -> tuple[int, ...]:
    return tuple(row["input_ids"])


@pytest.mark.parametrize("text", ["smoke-llama:lora:1024:1x16:real", "smoke-llama:lora:1024:4x4:real"])
def test_a_grouped_step_takes_whole_groups_within_the_budget_and_each_row_once(text):
    case = parse_case(text)
    rows = batches.make_rows(case, 400, VOCAB)
    lengths = [len(r["input_ids"]) for r in rows]
    budget = case["batch"] * min(case["seq"], max(lengths))  # the engine's data/packing.py group_budget
    groups = batches.group_rows(case, lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))  # every row in exactly one group
    assert all(len(g) * max(lengths[i] for i in g) <= budget or len(g) == 1 for g in groups)

    plan = batches.plan_steps(case, 12, VOCAB, batches.GROUPED)
    seen = [_ids(r) for step in plan for group in step for r in group]
    assert len(seen) == len(set(seen))  # no row trained twice
    # a fixed number of groups a step: the engine's bins_per_step for 16 rows at the pool's rows a group
    pool, _, per_step = batches.pooled_bins(case, 12, VOCAB, lambda n: batches.group_rows(case, n), 1)
    pool_groups = batches.group_rows(case, [len(r["input_ids"]) for r in pool])
    assert per_step == bins_per_step(16, 1, 1, len(pool) / len(pool_groups)) and {len(s) for s in plan} == {per_step}
    rows_a_step = batches.rows_per_step(case, 12, VOCAB, batches.GROUPED)
    for step in plan:
        for group in step:
            widest = max(len(r["input_ids"]) for r in group)
            assert len(group) * widest <= case["batch"] * case["seq"] or len(group) == 1
    # about the recipe's 16 rows a step, in far fewer passes than 16 / micro-batch
    assert 10 <= rows_a_step <= 22 and sum(len(s) for s in plan) / 12 < 16 / case["batch"]


@pytest.mark.parametrize("batch, batching, passes, rows, share", [
    ("1x16", "rows", 16, 16, 1.0), ("1x16", "grouped", 6, 15.55, 0.993), ("1x16", "packed", 5, 15.8, None),
    ("4x4", "rows", 4, 16, 0.595), ("4x4", "grouped", 1, 12.15, 0.960), ("4x4", "packed", 1, 12.65, None),
])
def test_passes_and_rows_a_step_match_the_table_batches_py_states(batch, batching, passes, rows, share):
    """benchmarks/batches.py's docstring (and README) state these numbers for the first 20 steps."""
    case = parse_case(f"gemma-2b:qlora:1024:{batch}:real")
    plan = batches.plan_steps(case, 20, VOCAB, batching)
    assert sum(len(step) for step in plan) / 20 == passes
    assert batches.rows_per_step(case, 20, VOCAB, batching) == pytest.approx(rows)
    if share is not None:
        micro = [m for step in plan for m in step]
        padded = sum(len(m) * max(len(r["input_ids"]) for r in m) for m in micro)
        assert sum(len(r["input_ids"]) for m in micro for r in m) / padded == pytest.approx(share, abs=0.0006)


def test_accumulated_micro_batches_keep_the_rows_and_their_order_of_one_big_micro_batch():
    one = batches.plan_steps(parse_case("smoke-llama:lora:256:4:real"), 3, VOCAB)
    split = batches.plan_steps(parse_case("smoke-llama:lora:256:2x2:real"), 3, VOCAB)
    assert [len(step) for step in split] == [2, 2, 2] and all(len(m) == 2 for s in split for m in s)
    assert [[_ids(r) for m in s for r in m] for s in split] == [[_ids(r) for r in s[0]] for s in one]
    assert batches.rows_per_step(parse_case("smoke-llama:lora:256:2x2:real"), 3, VOCAB) == 4.0


def test_an_accumulated_step_has_the_loss_of_its_rows_in_one_micro_batch(monkeypatch, tmp_path):
    """Micro-batch 4, 2 x 2 and 1 x 4 train the same 4 rows in the first step: each micro-batch's loss is over
    the step's label tokens, so their sum is the one big micro-batch's mean loss, on the baseline (the model's
    own loss) and on ours (the engine's chunked loss). The optimizer is made a no-op, so one model serves all."""
    import torch

    monkeypatch.setenv("TUIFT_BENCH_SCRATCH", str(tmp_path))
    monkeypatch.setattr(stacks, "make_optimizer", lambda params, gpu: torch.optim.SGD(params, lr=0.0))
    folder = stacks.build_model(stacks.SMOKE_MODEL)
    text = f"{stacks.SMOKE_MODEL}:lora:256:%s:real"
    base_model, base_loss, _ = stacks.setup_baseline(folder, parse_case(text % "4"), gpu=False)
    recipe = stacks.ours_recipe(folder, parse_case(text % "4"), "universal", [], True, stacks.ROWS)
    ours_model, ours_loss, _ = stacks.setup_ours(folder, recipe)

    def first_step(model, loss_fn, kind: str, batch: str) -> dict:
        case = parse_case(text % batch)
        collate = batches.collator_for(kind, batches.ROWS, case, folder)
        return stacks.train_and_measure(model, loss_fn, case, 1, False, collate, batches.ROWS)

    for model, loss_fn, kind in ((base_model, base_loss, "baseline"), (ours_model, ours_loss, "ours")):
        whole, halves, singles = (first_step(model, loss_fn, kind, b) for b in ("4", "2x2", "1x4"))
        assert [r["passes_per_step"] for r in (whole, halves, singles)] == [1, 2, 4]
        assert halves["losses"][0] == pytest.approx(whole["losses"][0], rel=1e-5), kind
        assert singles["losses"][0] == pytest.approx(whole["losses"][0], rel=1e-5), kind
        assert singles["useful_share"] == 1.0 > halves["useful_share"]  # a micro-batch of one row has no padding


def _row(stack: str, useful: float, rep: int, **extra) -> dict:
    return {"stack": stack, "model": "gemma-2b", "method": "qlora", "seq": 1024, "batch": 1, "accum": 16,
            "cap_gb": None, "lengths": "real", "tokens_per_s": useful * 1.2, "useful_tokens_per_s": useful,
            "losses": [10.0, 9.0], "peak_reserved_gib": 3.0, "rep": rep, **extra}


def test_report_shows_rows_a_step_and_leaves_grouped_parity_out(tmp_path):
    rows = [_row("ours:universal", 6000, 1, batching="grouped", rows_per_step=15.6, losses=[10.5, 9.5]),
            _row("ours:universal:rows", 3000, 1, batching="rows", rows_per_step=16.0),
            _row("baseline", 2900, 1, batching="rows", rows_per_step=16.0),
            _row("ours:universal", 6600, 2, batching="grouped", rows_per_step=15.6, losses=[10.5, 9.5]),
            _row("ours:universal:rows", 3100, 2, batching="rows", rows_per_step=16.0),
            _row("baseline", 3000, 2, batching="rows", rows_per_step=16.0)]
    text = report.write_results(rows, "python -m benchmarks.memory_speed --x", 2, tmp_path, "t").read_text()
    grouped, padded = rows[0], rows[1]
    assert grouped["parity_max_rel"] is None and padded["parity_ok"] is True
    assert grouped["speed_vs_baseline"] == pytest.approx(6000 / 2900)
    label = "gemma-2b qlora seq 1024 x1 accum 16 real lengths"
    first = next(line for line in text.splitlines() if line.startswith(f"| {label} | - | ours:universal #1 |"))
    assert first.endswith("| 10.5000 / 9.5000 | 15.6 |")
    repeats = text.split("## Repeats", 1)[1]
    assert f"| {label} | ours:universal | 2 | 6300 | 6000-6600 |" in repeats
    assert next(line for line in repeats.splitlines() if "| ours:universal |" in line).endswith("| 3.00 | 15.6 |")
    assert "ours:universal #1 (grouped by length: each step trains other rows than the baseline's" in text
