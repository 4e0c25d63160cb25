"""Batch tokenized rows for the Trainer: padding (of rows or of length groups), or padding-free packing.

* ``packing = false``: :class:`PaddingCollator` pads ``input_ids`` with the pad id (EOS when the
  tokenizer has no pad token), ``labels`` with -100 and builds ``attention_mask``. Padding is
  masked by position, never by token id, so pad = EOS is safe.
* ``packing = true``: ``transformers.DataCollatorWithFlattening``. It concatenates the batch's
  examples into ONE row with no padding and emits ``position_ids`` that restart at 0 for each
  example (and -100 as the first label of each, so no example predicts across a boundary).
  There is no ``attention_mask``: transformers' mask builder (``masking_utils``) detects the
  restarting ``position_ids`` and makes a block-diagonal causal mask for SDPA and eager
  attention; flash-attention uses the same boundaries. No token attends to another example.
  Condition (transformers 5.x): the forward pass must run without a KV cache, i.e.
  ``model.config.use_cache = False`` (the engine sets it for training; gradient checkpointing
  forces it too). With a cache, the mask builder skips the packed-sequence check and examples
  WOULD see each other; tests/test_data_collate.py shows the per-example logits match.

Grouping with packing: the engine packs the training rows into bins of at most ``seq_len`` tokens
before training (data/packing.py), each bin one example whose ``position_ids`` already restart at
each row. The Trainer's ``per_device_train_batch_size`` (``train.micro_batch``) then counts bins, and
:class:`FlatteningCollator` splits each bin back into its rows at those restarts before flattening
the lot, so a micro-batch of bins is one row of at most ``micro_batch x seq_len`` tokens, exactly what
``DataCollatorWithFlattening`` makes of all their rows; plain rows (evaluation) flatten as before.
With length grouping (``data.group_by_length``, data/packing.py) an example is a group of padded rows
stored the same way; :class:`GroupCollator` cuts it back into its rows and pads them (``PaddingCollator``),
so a group trains exactly as those rows would as one padded micro-batch; plain rows (evaluation) pad as before.
``TokenBudgetBatchSampler`` is the other way to cap a row by tokens, as a DataLoader's ``batch_sampler``.
Extra columns (``length``, ``sample_id``, ``sample_ids``) are ignored by both collators.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from tui_finetune.data.render import IGNORE_INDEX


class PaddingCollator:
    """Right-pad a list of rows to the longest: input_ids (pad id), labels (-100), attention_mask."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(list(f["input_ids"]), dtype=torch.long)
            labels[row, :n] = torch.as_tensor(list(f.get("labels", f["input_ids"])), dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class FlatteningCollator:
    """``DataCollatorWithFlattening`` over rows, where an example may be a bin of rows (data/packing.py):
    a bin is cut back into its rows where its ``position_ids`` restart at 0, so the result is the
    flattening of every row of the micro-batch, whether it came as rows or as bins."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([row for feature in features for row in split_bin(feature)])


class GroupCollator:
    """``PaddingCollator`` over rows, where an example may be a group of rows (data/packing.py ``group_dataset``):
    a group is cut back into its rows (``split_bin``) and they are padded to the longest, with attention_mask."""

    def __init__(self, pad_id: int) -> None:
        self.inner = PaddingCollator(pad_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([row for feature in features for row in split_bin(feature)])


def split_bin(feature: dict[str, Any]) -> list[dict[str, Any]]:
    """A bin's rows (``input_ids``, ``labels``), cut where its ``position_ids`` restart; a plain row alone."""
    ids, labels = list(feature["input_ids"]), list(feature.get("labels", feature["input_ids"]))
    positions = feature.get("position_ids")
    if positions is None:
        return [{"input_ids": ids, "labels": labels}]
    starts = [i for i, p in enumerate(positions) if int(p) == 0] + [len(ids)]
    return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(starts, starts[1:]) if b > a]


def make_collator(tokenizer: Any, packing: bool, grouped: bool = False) -> Any:
    """The collator for the Trainer or a DataLoader (see the module docstring for packing and grouping)."""
    if packing:
        return FlatteningCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with: "
                         "set pad_token in its tokenizer_config.json")
    return GroupCollator(pad) if grouped else PaddingCollator(pad)


class TokenBudgetBatchSampler:
    """Batches of example indices whose lengths sum to at most ``max_tokens`` (one packed row each).

    Order is a seeded shuffle per epoch (call ``set_epoch``); batches are filled greedily in that
    order, so every example appears exactly once per epoch. An example longer than the budget gets
    a batch of its own.
    """

    def __init__(self, lengths: list[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        out: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in order:
            if current and used + self.lengths[i] > self.max_tokens:
                out.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            out.append(current)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
