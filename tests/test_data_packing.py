"""Token-budget packing (data/packing.py): the bins, the step size that keeps the recipe's rows a step, and
the loss parity that makes it safe: a bin's per-token loss is its rows' own, and one optimizer step over bins
equals one over the same rows unpacked, in mean loss and gradients, through the engine's loss."""

from __future__ import annotations

import random
from collections import Counter

import datasets
import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from tui_finetune.core.recipe import MemorySpec
from tui_finetune.data.collate import FlatteningCollator, make_collator, split_bin
from tui_finetune.data.packing import (
    PackedBins, bins_per_step, describe_packing, flatten_rows, pack_dataset, pack_lengths)
from tui_finetune.data.render import IGNORE_INDEX
from tui_finetune.engine.fit_check import longest_batch
from tui_finetune.engine.memory_techniques import lean_causal_lm_loss


def _rows(lengths: list[int], seed: int = 0) -> list[dict]:
    """Rows of random ids whose first third carries no loss (a prompt), sample ids 100 + index."""
    draw = random.Random(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = [draw.randrange(4, 60) for _ in range(n)]
        prompt = max(1, n // 3)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": n,
                     "sample_id": 100 + i})
    return rows


def test_best_fit_decreasing_puts_every_row_in_one_bin_within_the_budget():
    draw = random.Random(5)
    lengths = [draw.randint(1, 300) for _ in range(500)]
    bins = pack_lengths(lengths, 512, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(500))  # each row exactly once, none split
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sum(lengths) / (512 * len(bins)) > 0.9  # best fit leaves little room on many small rows
    assert pack_lengths(lengths, 512, seed=3) == bins  # a pure function: a resume rebuilds the same bins
    # best fit, not first fit: 4 goes where it fills the bin (6 + 4), 3 and 2 then join the 5
    assert pack_lengths([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert pack_lengths([700, 3, 4], 512) == [[0], [1, 2]]  # over the budget: a bin of its own, never split
    with pytest.raises(ValueError):
        pack_lengths([1], 0)


def test_the_seed_orders_only_rows_of_equal_length():
    lengths = [5] * 6 + [3] * 6
    one, other = pack_lengths(lengths, 10, seed=1), pack_lengths(lengths, 10, seed=2)
    assert one != other
    assert sorted(sorted(lengths[i] for i in b) for b in one) == sorted(sorted(lengths[i] for i in b) for b in other)


def test_each_bin_is_one_example_as_the_flattening_collator_makes_it_with_its_length_and_ids(tmp_path):
    rows = _rows([40, 7, 25, 30, 12, 3, 60, 18])
    bins, packed = pack_dataset(datasets.Dataset.from_list(rows), 64, seed=7, cache_dir=tmp_path)
    members = pack_lengths([r["length"] for r in rows], 64, seed=7)
    assert len(bins) == len(members) == packed.bins
    assert (packed.rows, packed.tokens, packed.seq_len) == (8, 195, 64)
    assert packed.fill == pytest.approx(195 / (64 * packed.bins))
    assert packed.rows_per_bin == pytest.approx(8 / packed.bins)
    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    for example, rows_in in zip(bins, members):
        expected = flatten([rows[i] for i in rows_in])
        for key in ("input_ids", "labels", "position_ids"):
            assert example[key] == expected[key][0].tolist()
        assert example["length"] == len(example["input_ids"]) <= 64
        assert example["sample_ids"] == [100 + i for i in rows_in]
        # each row's first label is -100: nothing predicts across a boundary
        starts = [i for i, p in enumerate(example["position_ids"]) if p == 0]
        assert len(starts) == len(rows_in) and all(example["labels"][i] == IGNORE_INDEX for i in starts)
    assert Counter(i for b in bins for i in b["sample_ids"]) == Counter(100 + i for i in range(8))


def test_a_micro_batch_of_bins_is_the_flattening_of_all_their_rows(tmp_path):
    rows = _rows([20, 9, 14, 30, 5, 11])
    bins, _ = pack_dataset(datasets.Dataset.from_list(rows), 32, seed=0, cache_dir=tmp_path)
    collate = make_collator(None, packing=True)
    assert isinstance(collate, FlatteningCollator)
    batch = collate([bins[0], bins[1]])
    rows_of = [r for b in (bins[0], bins[1]) for r in split_bin(b)]
    assert len(rows_of) == len(bins[0]["sample_ids"]) + len(bins[1]["sample_ids"])
    expected = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)(rows_of)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(batch[key], expected[key])
    assert batch["input_ids"].shape == (1, bins[0]["length"] + bins[1]["length"])  # <= 2 x seq_len
    # plain rows (evaluation) flatten exactly as before
    plain = collate(rows[:3])
    assert plain["position_ids"].tolist() == [list(range(20)) + list(range(9)) + list(range(14))]


def test_the_fit_checks_longest_batch_is_the_fullest_bins(tmp_path):
    rows = _rows([50, 10, 45, 12, 8, 30, 33, 5, 60, 2])
    bins, _ = pack_dataset(datasets.Dataset.from_list(rows), 64, seed=0, cache_dir=tmp_path)
    fullest = sorted(bins["length"], reverse=True)
    batch = longest_batch(bins, make_collator(None, packing=True), 2)
    assert batch["input_ids"].shape == (1, fullest[0] + fullest[1])
    assert fullest[0] + fullest[1] > 60 + 50  # fuller than the two longest rows alone: bins are what to check


def test_the_accumulation_keeps_about_the_recipes_rows_a_step():
    assert bins_per_step(16, 1, 1, 5.6) == 3  # 16 rows a step at 5.6 rows a bin: 3 bins (16.8 rows)
    assert bins_per_step(16, 2, 1, 5.6) == 1  # two devices share them
    assert bins_per_step(16, 1, 2, 5.6) == 2  # micro-batch 2 bins x accumulation 1
    assert bins_per_step(4, 1, 4, 3.0) == 4  # never below one micro-batch
    assert bins_per_step(16, 1, 1, 1.0) == 16  # a bin a row: unchanged
    packed = PackedBins(rows=480, bins=86, tokens=160_000, seq_len=2048, effective_batch=16,
                        bins_per_step=bins_per_step(16, 1, 1, 480 / 86))
    assert packed.accumulation(1) == 3 and packed.accumulation(3) == 1
    line = describe_packing(packed, 1, 16)
    assert line.startswith("packing: 480 rows -> 86 bins of <= 2048 tokens (5.6 rows a bin, 91% full); "
                           "accumulation 16 -> 3 at micro-batch 1 bin(s), so a step sees about 17 rows")
    assert PackedBins.from_dict(packed.to_dict()) == packed and PackedBins.from_dict({"rows": 1}) is None


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).train()


def _items(batches: list[dict]) -> int:
    """What Trainer passes as ``num_items_in_batch``: the step's loss-carrying labels after the shift."""
    return int(sum((b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in batches))


def _step(model, batches: list[dict], memory: MemorySpec) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One optimizer step's accumulated loss and gradients, normalised per label token over the step."""
    model.zero_grad(set_to_none=True)
    items, total = _items(batches), torch.zeros(())
    for batch in batches:
        loss = lean_causal_lm_loss(model, batch, memory, items)
        loss.backward()
        total = total + loss.detach()
    return total, [p.grad.clone() for p in model.parameters()]


def test_a_step_over_bins_equals_an_unpacked_step_over_the_same_rows_in_loss_and_gradients(
        data_qwen_tokenizer, tmp_path):
    """Micro-batch 1 bin x accumulation 2 against micro-batch 1 row x accumulation (their rows), padded: the
    per-token loss of each bin is its rows' own, and the step's mean loss and gradients are the same."""
    model, memory = _tiny_llama(), MemorySpec(loss_chunk_tokens=8)  # chunks that straddle row boundaries
    rows = _rows([21, 9, 14, 30, 6, 11, 17], seed=4)
    bins, packed = pack_dataset(datasets.Dataset.from_list(rows), 48, seed=0, cache_dir=tmp_path)
    assert packed.bins < len(rows)
    step_bins = [bins[0], bins[1]]
    packed_batches = [make_collator(None, packing=True)([b]) for b in step_bins]
    padding = make_collator(data_qwen_tokenizer, packing=False)
    by_id = {r["sample_id"]: r for r in rows}
    row_batches = [padding([by_id[i]]) for b in step_bins for i in b["sample_ids"]]
    assert len(packed_batches) < len(row_batches)  # fewer passes for the same rows

    with torch.no_grad():  # per token: a bin's losses are its rows', in order
        for bin_batch, example in zip(packed_batches, step_bins):
            logits = model(input_ids=bin_batch["input_ids"], position_ids=bin_batch["position_ids"],
                           use_cache=False).logits
            per_bin = _token_losses(logits, bin_batch["labels"])
            alone = torch.cat([_token_losses(model(input_ids=torch.tensor([by_id[i]["input_ids"]])).logits,
                                             torch.tensor([by_id[i]["labels"]])) for i in example["sample_ids"]])
            torch.testing.assert_close(per_bin, alone, rtol=1e-5, atol=1e-6)

    loss_rows = assert_same_step(model, packed_batches, row_batches, memory)
    leaky = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in packed_batches]  # rows see each other
    assert not torch.allclose(_step(model, leaky, memory)[0], loss_rows, atol=1e-4)


def assert_same_step(model, batches: list[dict], row_batches: list[dict], memory: MemorySpec) -> torch.Tensor:
    """One optimizer step's loss and LoRA gradients over ``batches`` (bins or groups) equal those over the
    same rows as plain padded micro-batches, with the same label tokens counted; the rows' loss, for more checks."""
    loss, grads = _step(model, batches, memory)
    loss_rows, grads_rows = _step(model, row_batches, memory)
    assert _items(batches) == _items(row_batches) > 0
    torch.testing.assert_close(loss, loss_rows, rtol=1e-5, atol=1e-6)
    for from_batches, from_rows in zip(grads, grads_rows):
        torch.testing.assert_close(from_batches, from_rows, rtol=1e-4, atol=1e-6)
    return loss_rows


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat_logits, flat_labels = logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(flat_logits[keep], flat_labels[keep], reduction="none")


def test_flatten_rows_needs_no_tensors_of_torch():
    flat = flatten_rows([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert flat == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}


def test_group_lengths_keeps_each_padded_group_within_the_budget_and_every_row_once():
    from tui_finetune.data.packing import group_lengths

    lengths = [random.Random(5).randint(10, 300) for _ in range(400)]
    groups = group_lengths(lengths, 1024, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(400))
    assert all(len(g) * max(lengths[i] for i in g) <= 1024 for g in groups)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert sum(lengths) / padded > 0.9  # neighbours in length share a pass: little padding
    assert group_lengths(lengths, 1024, seed=3) == groups  # a pure function: a resume rebuilds the same groups
    assert group_lengths([5, 9, 4, 9, 3], 18) == [[1, 3], [0, 2, 4]]
    assert group_lengths([700, 3, 4], 512) == [[0], [1, 2]]  # over the budget: a group of its own
    with pytest.raises(ValueError):
        group_lengths([1], 0)
