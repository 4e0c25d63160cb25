"""Length-grouped batches in real runs (``data.group_by_length``, the default): the worker trains on groups of
rows of similar length within ``micro_batch x the longest row`` padded tokens, one group a pass, says so in one
event line, and a kill and resume continue on the very same groups, bit for bit. After an OOM halves the
micro-batch the groups are rebuilt at half the budget and the run completes. A run folder written before the
key existed keeps its rows (engine/packed_training.py, core/run_folder/info.py)."""

from __future__ import annotations

import json

import pytest

from engine_runs import events_of
from engine_tiny import build_tiny_llama
from faults_support import assert_kill_resume_matches, reference_run, fault_recipe, launch, read_trace, wait_dead
from tui_finetune.core.events import PhaseEvent, WarningEvent
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe
from tui_finetune.core.run_folder.resume import resume_differences
from tui_finetune.data.packing import PackedBins

STEPS = 6
ROWS = 24
TRAIN_ROWS = 19  # 24 rows, 5 held out (eval_split 0.2)


def write_varied_alpaca(path, rows: int = ROWS):
    """Answers from 1 to 12 words: rows of about 40 to 110 tokens, as real data varies."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            words = " ".join(f"w{j}" for j in range(1 + (i * 7) % 12))
            handle.write(json.dumps({"instruction": f"Say {i} words", "input": "", "output": words}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping")
    return build_tiny_llama(root / "model"), write_varied_alpaca(root / "data.jsonl")


def grouped_recipe(model, grouping: bool = True, **train):
    """4 rows a micro-batch x 2 in the recipe: groups of <= 4 x the longest row padded tokens."""
    return fault_recipe(model, STEPS, data={"seq_len": 256, "group_by_length": grouping},
                        train={"micro_batch": 4, "grad_accum": 2, **train}, eval={"every_steps": 1000})


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    model, data = tiny
    return reference_run(grouped_recipe(model), data, tmp_path_factory.mktemp("grouped-reference"))


def test_a_run_groups_its_rows_by_default_and_says_so(tiny, reference):
    from tui_finetune.core.recipe import DataSpec

    assert DataSpec().group_by_length is True
    run_dir, records = reference
    grouped = PackedBins.from_dict(read_run_info(run_dir).packing)
    assert grouped is not None and grouped.kind == "grouped" and grouped.rows == TRAIN_ROWS
    longest = grouped.seq_len // 4
    assert 60 < longest < 256  # 4 x the longest training row, which is shorter than seq_len
    assert grouped.bins < TRAIN_ROWS and grouped.fill > 0.7
    line = next(e.message for e in events_of(run_dir, PhaseEvent) if e.message.startswith("grouping:"))
    assert line.startswith(f"grouping: {TRAIN_ROWS} rows -> {grouped.bins} groups of <= {grouped.seq_len} padded "
                           f"tokens ({grouped.rows_per_bin:.1f} rows a group, {grouped.fill:.0%} real tokens); "
                           f"accumulation 2 -> {grouped.accumulation(1)}")
    train = next(e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "train")
    assert f"grouped: 1 group of <= {grouped.seq_len} padded tokens a micro-batch" in train
    assert read_run_recipe(run_dir).train.micro_batch == 4  # the recipe keeps counting rows
    assert sorted(records) == list(range(1, STEPS + 1))
    assert all(r["micro_batches"] == grouped.accumulation(1) for r in records.values())
    rows_a_step = sum(len(r["ids"]) for r in records.values()) / len(records)
    assert 5 <= rows_a_step <= 12  # about the recipe's 8 rows a step
    fit = next(e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "fit")
    assert fit.startswith("the longest batch fits (4 example(s) in ")


@pytest.mark.faults
def test_a_killed_grouped_run_resumes_with_the_same_groups_bit_identical(tiny, reference, tmp_path):
    model, data = tiny
    assert_kill_resume_matches(grouped_recipe(model), data, reference, tmp_path, STEPS)


@pytest.mark.faults
@pytest.mark.parametrize("fault, where, resumed_from", [("oom:train:2@1", "fit-check", "the start"),
                                                        ("oom:train:2@4", "training", "step-000003")])
def test_an_oom_shrink_rebuilds_the_groups_at_half_the_budget_and_the_run_completes(
        tiny, reference, tmp_path, fault, where, resumed_from):
    model, data = tiny
    before = PackedBins.from_dict(read_run_info(reference[0]).packing)
    run_dir = launch(grouped_recipe(model), data, tmp_path / "home", fault=fault, trace=tmp_path / "t.jsonl")
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]
    info = read_run_info(run_dir)
    assert [(s["where"], s["micro_batch"]) for s in info.oom_shrinks] == [(where, [4, 2])]
    after = PackedBins.from_dict(info.packing)
    assert after.kind == "grouped" and after.seq_len == before.seq_len // 2  # the budget halved with the micro-batch
    assert after.bins > before.bins and after.rows == before.rows
    lines = [e.message for e in events_of(run_dir, PhaseEvent) if e.message.startswith("grouping:")]
    assert len(lines) == 2 and f"<= {after.seq_len} padded tokens" in lines[1]
    assert any("micro-batch 4 -> 2" in e.message for e in events_of(run_dir, WarningEvent))
    assert any(e.phase == "train" and e.message.endswith(f"from {resumed_from}")
               and f"grouped: 1 group of <= {after.seq_len} padded tokens" in e.message
               for e in events_of(run_dir, PhaseEvent))
    records = read_trace(tmp_path / "t.jsonl")
    assert sorted(records) == list(range(1, STEPS + 1)) and info.total_steps == STEPS
    late = [r for step, r in records.items() if step > 3]
    assert max(r["micro_batches"] for r in late) == after.accumulation(1)  # the new step size (an epoch's last is short)


def test_an_old_run_folder_without_the_key_resumes_on_rows(tmp_path, monkeypatch):
    """recipe.toml and the checkpoint's recipe from before ``group_by_length`` existed: read as false (the rows
    it trained on), not today's default, and the checkpoint sees no change."""
    from tui_finetune.core.recipe import RecipeSpec
    from tui_finetune.core.recipe_io import load_recipe

    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    old = RecipeSpec(model="phi-2")
    old.data.group_by_length = False
    run_dir = create_run(old, tmp_path / "d.jsonl", base=tmp_path / "runs")
    toml = (run_dir / "recipe.toml").read_text()
    assert "group_by_length = false" in toml
    (run_dir / "recipe.toml").write_text(toml.replace("group_by_length = false\n", ""))
    assert load_recipe(run_dir / "recipe.toml").data.group_by_length is True  # a new run from it groups
    assert read_run_recipe(run_dir).data.group_by_length is False
    assert read_run_recipe(run_dir, ["train.micro_batch=2"]).data.group_by_length is False

    checkpoint = run_dir / "checkpoints" / "step-000002"
    checkpoint.mkdir()
    state = old.to_dict()
    del state["data"]["group_by_length"]
    (checkpoint / "run_state.json").write_text(json.dumps({"recipe": state}))
    assert resume_differences(checkpoint, read_run_recipe(run_dir)) == []
    new = read_run_recipe(run_dir)
    new.data.group_by_length = True
    assert resume_differences(checkpoint, new) == ["data.group_by_length: False -> True"]
