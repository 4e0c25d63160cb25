"""Collators: padding, and padding-free packing that keeps examples apart in attention and gives the same
per-token loss through the engine's loss (engine/memory_techniques.py) as padding does."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tui_finetune.core.recipe import MemorySpec
from tui_finetune.data.collate import PaddingCollator, TokenBudgetBatchSampler, make_collator
from tui_finetune.data.render import IGNORE_INDEX
from tui_finetune.engine.memory_techniques import lean_causal_lm_loss

ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "length": 5, "sample_id": 0},
    {"input_ids": [10, 11, 12], "labels": [-100, 11, 12], "length": 3, "sample_id": 1},
    {"input_ids": [13, 14, 15, 16], "labels": [-100, -100, -100, 16], "length": 4, "sample_id": 2},
]


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def test_padding_collator_pads_ids_labels_and_mask(data_qwen_tokenizer) -> None:
    collate = make_collator(data_qwen_tokenizer, packing=False)
    assert isinstance(collate, PaddingCollator) and collate.pad_id == data_qwen_tokenizer.pad_token_id
    batch = collate(ROWS)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    pad = data_qwen_tokenizer.pad_token_id
    assert batch["input_ids"].tolist()[1] == [10, 11, 12, pad, pad]
    assert batch["labels"].tolist()[1] == [-100, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_padding_uses_eos_when_there_is_no_pad_token(data_llama3_tokenizer) -> None:
    assert data_llama3_tokenizer.pad_token_id is None
    assert make_collator(data_llama3_tokenizer, packing=False).pad_id == data_llama3_tokenizer.eos_token_id


def test_packing_flattens_into_one_row_with_restarting_position_ids(data_qwen_tokenizer) -> None:
    batch = make_collator(data_qwen_tokenizer, packing=True)(ROWS)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    # each example's first label is -100, so nothing predicts across a boundary
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 11, 12, -100, -100, -100, 16]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_across_boundaries(data_qwen_tokenizer, attn: str) -> None:
    model = tiny_llama(attn)
    batch = make_collator(data_qwen_tokenizer, packing=True)(ROWS)
    with torch.no_grad():
        # use_cache=False as in training (the engine sets model.config.use_cache = False): transformers
        # builds the per-example mask from position_ids only when there is no KV cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in ROWS])
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # no position_ids: one long sequence
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(leaky[5:], alone[5:], atol=1e-3)  # the check above can fail


def test_padded_rows_give_the_same_logits_as_unpadded(data_qwen_tokenizer) -> None:
    model = tiny_llama("sdpa")
    batch = make_collator(data_qwen_tokenizer, packing=False)(ROWS)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, row in enumerate(ROWS):
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(padded[i, :len(row["input_ids"])], alone, rtol=1e-4, atol=1e-5)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each counted token's cross-entropy, in order (labels shift left by one, -100 is dropped)."""
    flat_logits, flat_labels = logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(flat_logits[keep], flat_labels[keep], reduction="none")


def test_packing_gives_the_same_per_token_loss_and_gradients_as_padding(data_qwen_tokenizer) -> None:
    """Issue #14's condition for packing: the loss is unchanged. Per token (from the logits), and as the
    engine trains it: lean_causal_lm_loss with loss chunks (4 tokens) that straddle example boundaries,
    against transformers' own loss on the padded batch; the gradients too."""
    model = tiny_llama("sdpa").train()
    padded = make_collator(data_qwen_tokenizer, packing=False)(ROWS)
    packed = make_collator(data_qwen_tokenizer, packing=True)(ROWS)
    with torch.no_grad():
        per_padded = _token_losses(model(**{k: v for k, v in padded.items() if k != "labels"}).logits,
                                   padded["labels"])
        per_packed = _token_losses(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                         use_cache=False).logits, packed["labels"])
    assert per_padded.numel() == 6  # the tokens that carry loss: 3 + 2 + 1
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-5, atol=1e-6)

    memory = MemorySpec(loss_chunk_tokens=4)
    grads = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        loss = lean_causal_lm_loss(model, batch, memory)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    reference = model(**padded).loss
    torch.testing.assert_close(grads[0][0], reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][0], reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][0], per_padded.mean(), rtol=1e-5, atol=1e-6)
    for from_padded, from_packed in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(from_packed, from_padded, rtol=1e-4, atol=1e-6)
    unmasked = {"input_ids": packed["input_ids"], "labels": packed["labels"]}  # no position_ids: examples leak
    assert not torch.allclose(lean_causal_lm_loss(model, unmasked, memory).detach(), reference.detach(), atol=1e-4)


def test_token_budget_sampler_uses_every_example_once_within_the_budget() -> None:
    lengths = [5, 3, 4, 9, 1, 2, 7, 20]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=10, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 or len(b) == 1 for b in batches)
    assert [7] in batches  # longer than the budget: alone
    assert list(sampler) == batches and len(sampler) == len(batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(TokenBudgetBatchSampler(lengths, 10, shuffle=False)) == [[0, 1], [2], [3, 4], [5, 6], [7]]
