"""Length-grouped batches (``data.group_by_length``, data/packing.py): a group is stored like a bin and trained as
ordinary padded rows, so a group collates to exactly what padding its rows makes, and one optimizer step over
groups equals one over the same rows one by one, in mean loss per label token and in gradients."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
import torch

from test_data_packing import _rows, _tiny_llama, _token_losses, assert_same_step
from tui_finetune.core.recipe import MemorySpec, RecipeSpec, TrainSpec
from tui_finetune.data.collate import GroupCollator, PaddingCollator, make_collator, split_bin
from tui_finetune.data.packing import (
    PackedBins, bins_per_step, describe_grouping, group_budget, group_dataset, group_lengths)
from tui_finetune.engine.fit_check import longest_batch
from tui_finetune.engine.packed_training import describe_bins_a_step, trainer_recipe

PAD = 0


def test_each_group_is_its_rows_untouched_within_the_padded_budget(tmp_path):
    rows = _rows([40, 7, 25, 30, 12, 3, 60, 18, 33, 9])
    rows[1]["labels"] = list(rows[1]["input_ids"])  # a row whose first label carries loss (train_on_prompt)
    groups, grouped = group_dataset(datasets.Dataset.from_list(rows), 96, seed=7, cache_dir=tmp_path)
    members = group_lengths([r["length"] for r in rows], 96, seed=7)
    assert len(groups) == len(members) == grouped.bins < len(rows)
    assert (grouped.kind, grouped.rows, grouped.tokens, grouped.seq_len) == ("grouped", 10, 237, 96)
    assert grouped.padded == sum(len(m) * max(rows[i]["length"] for i in m) for m in members)
    assert grouped.fill == pytest.approx(237 / grouped.padded) and grouped.fill < 1
    for example, rows_in in zip(groups, members):
        assert example["length"] == len(rows_in) * max(rows[i]["length"] for i in rows_in) <= 96
        assert example["sample_ids"] == [100 + i for i in rows_in]
        back = split_bin(example)  # cut at the restarting position_ids: the very rows, labels included
        assert back == [{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in rows_in]
    assert Counter(i for g in groups for i in g["sample_ids"]) == Counter(100 + i for i in range(10))


def test_a_group_collates_to_the_padded_batch_of_its_rows(tmp_path):
    rows = _rows([20, 9, 14, 30, 5, 11, 19, 21])
    groups, _ = group_dataset(datasets.Dataset.from_list(rows), 64, seed=0, cache_dir=tmp_path)
    collate = make_collator(_PadTokenizer(), packing=False, grouped=True)
    assert isinstance(collate, GroupCollator)
    by_id = {r["sample_id"]: r for r in rows}
    for example in groups:
        batch = collate([example])
        expected = PaddingCollator(PAD)([by_id[i] for i in example["sample_ids"]])
        assert batch.keys() == expected.keys() == {"input_ids", "labels", "attention_mask"}
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
        assert batch["input_ids"].numel() == example["length"]  # rows x longest: the padded tokens
    plain = collate(rows[:3])  # evaluation's plain rows pad as before
    assert torch.equal(plain["input_ids"], PaddingCollator(PAD)(rows[:3])["input_ids"])


def test_the_fit_checks_longest_batch_is_the_group_with_the_most_padded_tokens(tmp_path):
    rows = _rows([50, 10, 45, 12, 8, 30, 33, 5, 60, 2, 29, 31])
    groups, _ = group_dataset(datasets.Dataset.from_list(rows), 120, seed=0, cache_dir=tmp_path)
    batch = longest_batch(groups, GroupCollator(PAD), 1)
    assert batch["input_ids"].numel() == max(groups["length"]) <= 120


class _PadTokenizer:
    pad_token_id, eos_token_id = PAD, 1


def test_the_budget_is_the_padded_worst_case_of_a_micro_batch_of_rows():
    assert group_budget(4, 2048, 600) == 2400  # 4 rows of the longest row: what the planner sizes
    assert group_budget(4, 2048, 5000) == 8192  # rows were truncated to seq_len
    assert group_budget(1, 512, 0) == 512


def test_a_grouped_run_trains_one_group_a_micro_batch_and_about_the_recipes_rows_a_step():
    recipe = RecipeSpec(model="phi-2", train=TrainSpec(micro_batch=1, grad_accum=16))
    grouped = PackedBins(rows=480, bins=80, tokens=150_000, seq_len=2048, effective_batch=16,
                         bins_per_step=bins_per_step(16, 1, 1, 6.0), kind="grouped", padded=161_290)
    trainer = trainer_recipe(recipe, grouped).train
    assert (trainer.micro_batch, trainer.grad_accum) == (1, 3)
    assert describe_grouping(grouped, 16) == (
        "grouping: 480 rows -> 80 groups of <= 2048 padded tokens (6.0 rows a group, 93% real tokens); "
        "accumulation 16 -> 3 at one group a micro-batch, so a step sees about 18 rows (the recipe's effective "
        "batch: 16)")
    assert "grouped: 1 group of <= 2048 padded tokens a micro-batch x accumulation 3" in describe_bins_a_step(recipe, grouped)
    assert PackedBins.from_dict(grouped.to_dict()) == grouped
    old = {k: v for k, v in grouped.to_dict().items() if k not in ("kind", "padded")}  # a run.json from before
    assert PackedBins.from_dict(old).kind == "flat" and not PackedBins.from_dict(old).same_bins(grouped)


def test_a_step_over_groups_equals_a_step_over_the_same_rows_in_loss_and_gradients(tmp_path):
    """One group a micro-batch x accumulation 2 against one row a micro-batch over the same rows: per token each
    row's losses are its own (right padding changes nothing before it), and the step's loss, normalised per
    label token, and its gradients are the same."""
    model, memory = _tiny_llama(), MemorySpec(loss_chunk_tokens=8)  # chunks that straddle rows and padding
    rows = _rows([21, 9, 14, 30, 6, 11, 17, 19], seed=4)
    rows[2]["labels"] = list(rows[2]["input_ids"])  # label 0 of a row is never a target after the shift
    groups, grouped = group_dataset(datasets.Dataset.from_list(rows), 64, seed=0, cache_dir=tmp_path)
    assert grouped.bins < len(rows)
    step_groups = [groups[0], groups[1]]
    group_batches = [GroupCollator(PAD)([g]) for g in step_groups]
    by_id = {r["sample_id"]: r for r in rows}
    row_batches = [PaddingCollator(PAD)([by_id[i]]) for g in step_groups for i in g["sample_ids"]]
    assert len(group_batches) < len(row_batches)  # fewer passes for the same rows
    assert any(b["attention_mask"].eq(0).any() for b in group_batches)  # there is padding to get wrong

    with torch.no_grad():  # per token: each padded row's losses are the row's own
        for batch in group_batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            for row in range(batch["input_ids"].shape[0]):
                n = int(batch["attention_mask"][row].sum())
                alone = model(input_ids=batch["input_ids"][row:row + 1, :n]).logits
                torch.testing.assert_close(_token_losses(logits[row:row + 1, :n], batch["labels"][row:row + 1, :n]),
                                           _token_losses(alone, batch["labels"][row:row + 1, :n]), rtol=1e-5, atol=1e-6)

    assert_same_step(model, group_batches, row_batches, memory)
