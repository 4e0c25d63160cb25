"""The fit-check on the CPU with a tiny Llama and peft LoRA: it runs, leaves no trace, and shrinks on OOM.

A CUDA OOM can't happen here, so the OOM tests use a loss function that raises torch.OutOfMemoryError
when the batch is bigger than a limit: the same exception the GPU raises, at a size we choose.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine_tiny import build_tokenizer, write_alpaca
from tui_finetune.core.recipe import DataSpec, MemorySpec
from tui_finetune.data.collate import PaddingCollator, make_collator
from tui_finetune.engine.fitcheck import (
    fit_check, fit_check_until_it_fits, longest_batch, longest_rows, row_lengths, truncate_rows)
from tui_finetune.engine.lean import lean_causal_lm_loss


def lean_loss(model, batch):
    return lean_causal_lm_loss(model, batch, MemorySpec())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, use_cache=False)
    model = LlamaForCausalLM(config)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():  # B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def rows_of(lengths):
    import datasets

    ids = [[7 + (i + j) % 20 for j in range(n)] for i, n in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "length": list(lengths),
                                       "sample_id": list(range(len(lengths)))})


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_fit_check_runs_and_leaves_weights_grads_mode_and_rng_as_they_were(lora_model):
    batch = PaddingCollator(0)(longest_rows(rows_of([40, 90, 60, 120]), 2))
    before = lora_state(lora_model)
    lora_model.eval()
    rng = torch.random.get_rng_state()

    result = fit_check(lora_model, lean_loss, batch)

    assert math.isfinite(result.loss) and result.loss > 0
    assert (result.rows, result.tokens) == (2, 2 * 120) and result.seconds > 0
    assert result.peak_allocated_bytes is None and result.peak_reserved_bytes is None  # CPU: no figures
    after = lora_state(lora_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lora_model.parameters())
    assert not lora_model.training
    assert torch.equal(torch.random.get_rng_state(), rng)  # LoRA dropout drew; the run will draw the same


def test_the_backward_pass_really_ran(lora_model):
    """The check is only worth something if it allocates what training allocates: the gradients existed."""
    seen = []
    hook = next(p for n, p in lora_model.named_parameters() if "lora_A" in n).register_hook(
        lambda grad: seen.append(grad.abs().sum().item()))
    fit_check(lora_model, lean_loss, PaddingCollator(0)(longest_rows(rows_of([30, 50]), 2)))
    hook.remove()
    assert seen and seen[0] > 0


def test_longest_rows_picks_the_longest_first_and_ties_by_position():
    data = rows_of([5, 30, 12, 30, 7, 29])
    assert [r["sample_id"] for r in longest_rows(data, 3)] == [1, 3, 5]
    assert row_lengths(data) == [5, 30, 12, 30, 7, 29]
    assert [len(r["input_ids"]) for r in longest_rows(data, 10)] == [30, 30, 29, 12, 7, 5]
    plain = [{"input_ids": [1] * n} for n in (3, 9, 4)]  # no length column: counted
    assert [len(r["input_ids"]) for r in longest_rows(plain, 1)] == [9]


def test_longest_batch_from_prepared_data_padded_and_packed(tokenizer, tmp_path):
    from tui_finetune.data.prepare import prepare_datasets

    data = prepare_datasets(write_alpaca(tmp_path / "d.jsonl", rows=24), tokenizer, DataSpec(seq_len=128), 7)
    lengths = sorted(data.train["length"], reverse=True)
    padded = longest_batch(data.train, make_collator(tokenizer, packing=False), 4)
    assert padded["input_ids"].shape == (4, lengths[0])
    assert int(padded["attention_mask"].sum()) == sum(lengths[:4])
    packed = longest_batch(data.train, make_collator(tokenizer, packing=True), 4)
    assert packed["input_ids"].shape == (1, sum(lengths[:4]))  # one flattened row of the 4 longest examples


def test_truncate_rows_cuts_ids_labels_and_length():
    rows = truncate_rows(longest_rows(rows_of([50, 20]), 2), 32)
    assert [len(r["input_ids"]) for r in rows] == [32, 20] and [len(r["labels"]) for r in rows] == [32, 20]
    assert [r["length"] for r in rows] == [32, 20]


def oom_above(max_tokens):
    def loss_fn(model, batch):
        if batch["input_ids"].numel() > max_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch['input_ids'].numel()} tokens")
        return lean_loss(model, batch)
    return loss_fn


def test_an_oom_halves_the_micro_batch_and_keeps_the_effective_batch(lora_model):
    rows = longest_rows(rows_of([100, 100, 90, 80, 70, 60, 50, 40]), 8)
    before = lora_state(lora_model)
    outcome = fit_check_until_it_fits(lora_model, oom_above(250), rows, PaddingCollator(0),
                                      micro_batch=8, grad_accum=2, seq_len=128)
    assert outcome.fits and (outcome.micro_batch, outcome.grad_accum, outcome.seq_len) == (2, 8, 128)
    assert outcome.result is not None and outcome.result.tokens == 200
    assert len(outcome.changes) == 2
    assert "micro-batch 8 x 100 tokens" in outcome.changes[0] and "effective batch 16 unchanged" in outcome.changes[0]
    assert outcome.changes[-1].endswith("--set train.micro_batch=2 --set train.grad_accum=8")
    assert all(torch.equal(before[k], v) for k, v in lora_state(lora_model).items())
    assert all(p.grad is None for p in lora_model.parameters())


def test_at_micro_batch_one_an_oom_halves_the_sequence(lora_model):
    rows = longest_rows(rows_of([300, 200]), 1)
    outcome = fit_check_until_it_fits(lora_model, oom_above(100), rows, PaddingCollator(0),
                                      micro_batch=1, grad_accum=16, seq_len=512, min_seq_len=16)
    assert outcome.fits and (outcome.micro_batch, outcome.grad_accum) == (1, 16)
    assert outcome.seq_len == 75 and outcome.result.tokens == 75  # 300 -> 150 -> 75
    assert [c.rsplit("--set ", 1)[1] for c in outcome.changes] == ["data.seq_len=150", "data.seq_len=75"]


def test_it_gives_up_below_the_shortest_sequence_with_the_error(lora_model):
    rows = longest_rows(rows_of([300]), 1)
    outcome = fit_check_until_it_fits(lora_model, oom_above(10), rows, PaddingCollator(0),
                                      micro_batch=1, grad_accum=4, seq_len=512)
    assert not outcome.fits and outcome.result is None
    assert "CUDA out of memory" in outcome.error
    assert (outcome.seq_len, outcome.changes) == (512, [])  # 150 tokens would be under the 256 floor


def test_other_errors_are_not_swallowed(lora_model):
    def broken(model, batch):
        raise ValueError("not an OOM")
    with pytest.raises(ValueError, match="not an OOM"):
        fit_check_until_it_fits(lora_model, broken, longest_rows(rows_of([20]), 1), PaddingCollator(0),
                                micro_batch=1, grad_accum=1, seq_len=64)
    assert all(p.grad is None for p in lora_model.parameters())
