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

Batching: every stack gets the same rows in the same order, ``batch`` rows a step, so the losses
compare step by step. Every stack trains in the same loop (``stacks.train_and_measure``, not HF
Trainer's) with the same optimizer; only the batching differs:

* ``baseline`` and ``unsloth``: ``transformers.DataCollatorForSeq2Seq(padding="longest")``, the
  collator a notebook gives HF Trainer for prompt-masked SFT, with Trainer's defaults
  (``group_by_length=False``, a random sampler: our rows are independent draws, so their order is
  already random). Each batch is padded to its longest row. At micro-batch 4 and seq 1024, 59% of
  the tokens of the first 50 steps are useful (``padded_useful_share``; 77% at micro-batch 2, 48%
  at 8; at micro-batch 1 nothing is padded).
* ``ours``: the product's collator, ``make_collator(tokenizer, recipe.data.packing)``: the same
  padding (``PaddingCollator``).
* ``ours:<backend>:packed`` (``data.packing = true``) packs as the engine does (data/packing.py): rows
  go into bins of at most ``seq`` tokens (best-fit decreasing, ``PACK_SEED``), the bins are drawn in a
  seeded random order as the Trainer's sampler draws them, and a step is ``batch`` bins (the micro-batch
  counts bins) flattened into one row by the engine's collator, at most ``batch x seq`` tokens: the
  padded stacks' worst case. The engine's accumulation for this loop's one micro-batch a step stays 1
  (``bins_per_step(batch, 1, batch, rows a bin)``: it never goes below one micro-batch), so a packed
  step holds about ``batch x rows a bin`` rows (``rows_per_step`` in the row) in one pass where the
  padded stacks hold ``batch``: fewer, fuller passes are the lever measured. Its losses are over other
  rows than the baseline's, so the report leaves its parity out; tests/test_data_packing.py proves it.
* A fixed-length case that doesn't pack is batched as before: ``{input_ids, labels}``, no mask.
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


def collator_for(kind: str, packing: bool, case: dict, folder: Path) -> Collate | None:
    """The stack's collator (see the module docstring); None for a fixed case that doesn't pack."""
    from tui_finetune.data.collate import make_collator

    if packing:
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


def packed_steps(case: dict, steps: int, vocab: int) -> list[list[dict[str, Any]]]:
    """Each step's ``batch`` bins, packed as the engine packs (module docstring); each bin carries its ``rows``."""
    from tui_finetune.data.packing import flatten_rows, pack_lengths

    need, count = steps * case["batch"], steps * case["batch"]
    while True:  # enough rows to fill the steps' bins (make_rows is prefix-stable: more rows, same first ones)
        rows = make_rows(case, count, vocab)
        bins = pack_lengths([len(r["input_ids"]) for r in rows], case["seq"], seed=PACK_SEED)
        if len(bins) >= need:
            break
        count *= 2
    random.Random(PACK_SEED).shuffle(bins)
    examples = [{**flatten_rows([rows[i] for i in members]), "rows": len(members)} for members in bins[:need]]
    return [examples[step * case["batch"]:(step + 1) * case["batch"]] for step in range(steps)]


def rows_per_step(case: dict, steps: int, vocab: int, packing: bool) -> float:
    """Rows an optimizer step trains on, on average: ``batch``, or the packed steps' rows."""
    if not packing:
        return float(case["batch"])
    return sum(b["rows"] for step in packed_steps(case, steps, vocab) for b in step) / steps


def step_batches(case: dict, steps: int, vocab: int, collate: Collate | None,
                 device: Any, packing: bool = False) -> Iterator[tuple[dict[str, Any], int, int]]:
    """Each step's batch on ``device``, its useful (non-pad input) tokens and its loss-carrying tokens;
    ``packing``: a step of bins (``packed_steps``), flattened by ``collate``."""
    import torch

    if packing:
        for chunk in packed_steps(case, steps, vocab):
            batch = dict(collate(chunk))
            yield ({k: v.to(device) for k, v in batch.items()}, sum(len(b["input_ids"]) for b in chunk),
                   loss_tokens(batch["labels"]))
        return
    rows = make_rows(case, steps * case["batch"], vocab)
    for step in range(steps):
        chunk = rows[step * case["batch"]:(step + 1) * case["batch"]]
        useful = sum(len(r["input_ids"]) for r in chunk)
        if collate is None:  # one tensor for both, as memory_speed always did
            ids = torch.tensor([r["input_ids"] for r in chunk], dtype=torch.long).to(device)
            yield {"input_ids": ids, "labels": ids}, useful, loss_tokens(ids)
            continue
        batch = dict(collate(chunk))
        yield {k: v.to(device) for k, v in batch.items()}, useful, loss_tokens(batch["labels"])
