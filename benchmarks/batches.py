"""The token rows every memory_speed stack trains on, and how each stack batches them.

A case's length mode (its last field, ``memory_speed.parse_case``) picks the rows:

* ``fixed`` (the default): every row is ``seq`` random tokens and every token carries loss, so no
  stack pads. The ids are the ones memory_speed always drew (``torch.Generator`` seed 1234, one
  (batch, seq) draw per step), so older results stay comparable.
* ``real``: rows of chat-like lengths, the issue #14 case. Padding waste decides speed there.

Real lengths are a log-normal, median ``REAL_MEDIAN`` = 274 tokens (mu = ln 274 = 5.613) and
``REAL_SIGMA`` = 0.6, rounded, at least ``MIN_ROW`` = 16 and truncated to ``seq`` (as the product
truncates a longer example), drawn with ``random.Random(LENGTH_SEED = 14)``. Where the numbers come
from: the one published per-row token-length table found for an instruction set,
AdamCodd/recipe-nlg-alpaca's dataset card (Alpaca format, Llama-3 tokenizer: p10 192, median 274,
p90 467, max 3,285), gives the median. Its deciles imply a sigma of 0.42; 0.6 is our assumption,
wider, for multi-turn chat rows and for the shape issue #14 asks for (most rows 100-600 tokens, a
long tail up to seq_len). Change either and ``tests/test_benchmarks.py`` fails until this summary
is updated. ``sample_lengths(10_000, seq)``:

  seq    p10  p50  p90  p99   mean  in 100-600  above 600  truncated to seq
  1024   129  274  587  1024  325   86.2%       9.3%       1.5%
  2048   129  274  587  1124  329   86.2%       9.3%       0.06%

``PROMPT_SHARE`` = 25% of each row (at least one token) is the user's turn and carries no loss, as
the product trains by default (``data.train_on_prompt = false``).

Batching: a case is ``batch`` rows a micro-batch and ``accum`` micro-batches an optimizer step
(``BATCHxACCUM``; ``BATCH`` alone is accumulation 1). Every stack trains in the same loop
(``stacks.train_and_measure``, not HF Trainer's) with the same optimizer; each micro-batch's loss is over
the step's loss-carrying tokens (``num_items_in_batch``, as Trainer passes it; a step of one micro-batch
calls the loss as before), so a step's loss is its rows' mean whatever the split. Only the batching differs:

* ``baseline``, ``unsloth`` and ``ours:<backend>:rows`` (``data.group_by_length = false``) get the same
  rows in the same order, ``batch x accum`` a step (an accumulation of 1 trains the rows it always
  did), so the losses compare step by step. The baseline and Unsloth pad with
  ``transformers.DataCollatorForSeq2Seq(padding="longest")``, the collator a notebook gives HF Trainer
  for prompt-masked SFT, with Trainer's defaults (``group_by_length=False``, a random sampler: our rows
  are independent draws, so their order is already random); ours with the product's collator,
  ``make_collator(tokenizer, packing=False)``: the same padding. Each micro-batch is padded to its
  longest row. At micro-batch 4 and seq 1024, 59% of the tokens of the first 50 steps are useful
  (``padded_useful_share``; 77% at micro-batch 2, 48% at 8; at micro-batch 1 nothing is padded).
* ``ours:<backend>`` (the recipe's default ``data.group_by_length = true``; ``:grouped`` says so) on a
  real-length case groups as the engine does: the rows of a pool big enough for the steps go into
  ``group_lengths`` groups (data/packing.py, seed ``PACK_SEED``) of similar-length rows, each at most
  ``batch x min(seq, the pool's longest row)`` tokens padded; the groups are drawn in a seeded random
  order as the Trainer's sampler draws them, each group is ONE micro-batch padded by the product's
  collator, and a step takes ``bins_per_step(batch x accum, 1, 1, rows a group)`` groups, the
  accumulation the engine lowers so a step still sees about the recipe's rows. On a fixed-length case
  every row is ``seq`` long, each group would be ``batch`` rows: it trains as ``:rows`` does.
* ``ours:<backend>:packed`` (``data.packing = true``) packs as the engine does: rows go into bins of at
  most ``seq`` tokens (best-fit decreasing, ``PACK_SEED``), drawn in a seeded random order; a micro-batch
  is ``batch`` bins (the micro-batch counts bins) flattened into one row by the engine's collator, at
  most ``batch x seq`` tokens (the padded stacks' worst case), and a step takes
  ``bins_per_step(batch x accum, 1, batch, rows a bin)`` bins (never below one micro-batch).

Grouped and packed steps hold about the recipe's rows (``rows_per_step`` in the row) in fewer, fuller
passes (``passes_per_step``): the lever measured. Their losses are over other rows than the baseline's,
so the report leaves their parity out; tests/test_data_packing.py proves their per-token loss. The first
20 steps of the real-length Gemma-2B cases (``plan_steps``; the lengths don't depend on the model):

  case (seq 1024)   stack     passes a step  rows a step  useful share of the padded tokens
  micro 1 x 16      rows      16             16           100% (a row a pass: nothing to pad)
  micro 1 x 16      grouped   6              15.55        99.3%
  micro 1 x 16      packed    5              15.8         (no padding)
  micro 4 x 4       rows      4              16           59.5%
  micro 4 x 4       grouped   1              12.15        96.0%
  micro 4 x 4       packed    1              12.65        (no padding)

A fixed-length case that doesn't pack is batched as before: ``{input_ids, labels}``, no mask.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator

REAL_MEDIAN = 274
REAL_SIGMA = 0.6
MIN_ROW = 16
LENGTH_SEED = 14
PROMPT_SHARE = 0.25
TOKEN_SEED = 1234
PACK_SEED = 42
"""The recipe's default ``train.seed``, which the engine packs and samples bins with."""
LENGTH_MODES = ("fixed", "real")
ROWS, PACKED, GROUPED = "rows", "packed", "grouped"
"""How a stack's step is made: ``batch``-row micro-batches, the engine's packed bins, or its length groups."""
IGNORE_INDEX = -100

Collate = Callable[[list[dict]], Any]


def sample_lengths(count: int, seq: int, seed: int = LENGTH_SEED) -> list[int]:
    """``count`` real-length rows, each within [min(MIN_ROW, seq), seq]; a longer draw starts with a shorter one."""
    draw = random.Random(seed)
    mu = math.log(REAL_MEDIAN)
    return [min(seq, max(MIN_ROW, round(draw.lognormvariate(mu, REAL_SIGMA)))) for _ in range(count)]


def length_summary(lengths: list[int], seq: int) -> dict[str, float]:
    """The percentiles and shares the module docstring states (nearest-rank percentiles)."""
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    n = len(ordered)
    return {"p10": rank(0.10), "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
            "mean": round(sum(ordered) / n), "in_100_600": sum(100 <= x <= 600 for x in ordered) / n,
            "above_600": sum(x > 600 for x in ordered) / n, "at_seq": sum(x == seq for x in ordered) / n}


def padded_useful_share(lengths: list[int], batch: int) -> float:
    """Real tokens over the tokens of consecutive batches of ``batch`` rows, each padded to its longest."""
    groups = [lengths[i:i + batch] for i in range(0, len(lengths), batch)]
    return sum(lengths) / sum(len(g) * max(g) for g in groups)


def make_rows(case: dict, count: int, vocab: int) -> list[dict[str, list[int]]]:
    """``count`` rows of ``{input_ids, labels}``: fixed rows in the historical draw order, or real-length
    rows whose first ``PROMPT_SHARE`` carries no loss."""
    import torch

    g = torch.Generator().manual_seed(TOKEN_SEED)
    if case.get("lengths", "fixed") == "fixed":
        rows: list[dict[str, list[int]]] = []
        while len(rows) < count:  # one (batch, seq) draw per step, as memory_speed always drew
            for ids in torch.randint(0, vocab, (case["batch"], case["seq"]), generator=g).tolist():
                rows.append({"input_ids": ids, "labels": list(ids)})
        return rows[:count]
    rows = []
    for length in sample_lengths(count, case["seq"]):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = max(1, round(length * PROMPT_SHARE))
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def collator_for(kind: str, batching: str, case: dict, folder: Path) -> Collate | None:
    """The stack's collator (see the module docstring); None for a fixed case that doesn't pack."""
    from tui_finetune.data.collate import make_collator

    if batching == PACKED:
        return make_collator(None, packing=True)  # FlatteningCollator: a micro-batch of bins in one row
    if case.get("lengths", "fixed") == "fixed":
        return None
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(folder)  # the stand-in saved beside the random weights
    if kind == "ours":
        return make_collator(tokenizer, packing=False)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)


def loss_tokens(labels: Any) -> int:
    """Tokens that carry loss: labels other than -100 after the shift by one."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batching_for(packing: bool, grouping: bool, case: dict) -> str:
    """``PACKED`` when the recipe packs, ``GROUPED`` when it groups rows of a real-length case (fixed rows are
    all ``seq`` long: each group would be ``batch`` rows, the same passes as ``ROWS``), else ``ROWS``."""
    if packing:
        return PACKED
    return GROUPED if grouping and case.get("lengths", "fixed") != "fixed" else ROWS


def accumulation(case: dict) -> int:
    """Micro-batches a step (the case's ``BATCHxACCUM``); cases and rows from before it have none: 1."""
    return int(case.get("accum", 1))


def pooled_bins(case: dict, steps: int, vocab: int, make_bins: Callable[[list[int]], list[list[int]]],
                micro_batch: int) -> tuple[list[dict[str, list[int]]], list[list[int]], int]:
    """(rows, the steps' bins in a seeded random order, bins a step): bins of a pool of rows big enough to
    fill ``steps`` steps (make_rows is prefix-stable: more rows, same first ones). A step takes
    ``bins_per_step(batch x accumulation, 1, micro_batch, rows a bin)`` bins, as the engine lowers the
    accumulation so a step still sees about the recipe's effective batch in rows."""
    from tui_finetune.data.packing import bins_per_step

    effective = case["batch"] * accumulation(case)
    count = steps * effective
    while True:
        rows = make_rows(case, count, vocab)
        bins = make_bins([len(r["input_ids"]) for r in rows])
        per_step = bins_per_step(effective, 1, micro_batch, len(rows) / len(bins))
        if len(bins) >= steps * per_step:
            break
        count *= 2
    random.Random(PACK_SEED).shuffle(bins)  # as the Trainer's seeded sampler draws them
    return rows, bins[:steps * per_step], per_step


def packed_steps(case: dict, steps: int, vocab: int) -> list[list[list[dict[str, Any]]]]:
    """Each step's micro-batches of ``batch`` bins, packed as the engine packs (module docstring); each bin is
    one flattened example carrying its ``rows``."""
    from tui_finetune.data.packing import flatten_rows, pack_lengths

    size = case["batch"]
    rows, bins, per_step = pooled_bins(case, steps, vocab,
                                       lambda lengths: pack_lengths(lengths, case["seq"], seed=PACK_SEED), size)
    examples = [{**flatten_rows([rows[i] for i in members]), "rows": len(members)} for members in bins]
    return [[examples[at:at + size] for at in range(first, first + per_step, size)]
            for first in range(0, steps * per_step, per_step)]


def group_rows(case: dict, lengths: list[int]) -> list[list[int]]:
    """The engine's length groups of these rows: ``group_lengths`` at the engine's ``group_budget``
    (micro-batch x min(seq, the longest row)), seed ``PACK_SEED``."""
    from tui_finetune.data.packing import group_budget, group_lengths

    return group_lengths(lengths, group_budget(case["batch"], case["seq"], max(lengths)), PACK_SEED)


def grouped_steps(case: dict, steps: int, vocab: int) -> list[list[list[dict[str, list[int]]]]]:
    """Each step's groups (``data.group_by_length``, module docstring): one group of similar-length rows a
    micro-batch, padded by the collator to its longest row."""
    rows, groups, per_step = pooled_bins(case, steps, vocab, lambda lengths: group_rows(case, lengths), 1)
    micro = [[rows[i] for i in members] for members in groups]
    return [micro[first:first + per_step] for first in range(0, steps * per_step, per_step)]


def plan_steps(case: dict, steps: int, vocab: int, batching: str = ROWS) -> list[list[list[dict[str, Any]]]]:
    """Each step's micro-batches, each the examples its collator takes: ``accumulation`` micro-batches of
    ``batch`` rows (the rows in the order an accumulation of 1 trains them), or packed bins, or groups."""
    if batching == PACKED:
        return packed_steps(case, steps, vocab)
    if batching == GROUPED:
        return grouped_steps(case, steps, vocab)
    size, accum = case["batch"], accumulation(case)
    rows = make_rows(case, steps * size * accum, vocab)
    return [[rows[(step * accum + m) * size:(step * accum + m + 1) * size] for m in range(accum)]
            for step in range(steps)]


def rows_per_step(case: dict, steps: int, vocab: int, batching: str = ROWS) -> float:
    """Rows an optimizer step trains on, on average: ``batch x accumulation``, or the bins' or groups' rows."""
    if batching == ROWS:
        return float(case["batch"] * accumulation(case))
    plan = plan_steps(case, steps, vocab, batching)
    return sum(example.get("rows", 1) for step in plan for micro in step for example in micro) / steps


MicroBatch = tuple[dict[str, Any], int, int]
"""A micro-batch on the device, its useful (non-pad input) tokens and its loss-carrying tokens."""


def step_batches(case: dict, steps: int, vocab: int, collate: Collate | None,
                 device: Any, batching: str = ROWS) -> Iterator[list[MicroBatch]]:
    """Each step's micro-batches (``plan_steps``), collated by ``collate``; a fixed case without one is
    batched as memory_speed always did."""
    import torch

    for step in plan_steps(case, steps, vocab, batching):
        micro_batches = []
        for chunk in step:
            useful = sum(len(r["input_ids"]) for r in chunk)
            if collate is None:  # one tensor for both, as memory_speed always did
                ids = torch.tensor([r["input_ids"] for r in chunk], dtype=torch.long).to(device)
                micro_batches.append(({"input_ids": ids, "labels": ids}, useful, loss_tokens(ids)))
                continue
            batch = dict(collate(chunk))
            micro_batches.append(({k: v.to(device) for k, v in batch.items()}, useful, loss_tokens(batch["labels"])))
        yield micro_batches
