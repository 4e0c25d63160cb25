"""The fit-check: one forward and backward pass on the longest batch before the real run starts.

The planner's estimate is a model; this is the measurement. The worker builds the batch the run will
find hardest (the ``micro_batch`` longest rows, collated as training collates them: padded, or
flattened into one row when packing), runs the trainer's own loss function on it and backward,
and reads the peak. A CUDA out-of-memory here costs seconds instead of an hour: the micro-batch
is halved (accumulation doubled, so the effective batch stays) or, at micro-batch 1, the sequence
length is halved, and the check runs again.

It leaves no trace: the optimizer never steps, so the LoRA weights are unchanged; the gradients are
set to None, the RNG states and train/eval mode are put back, and the allocator's cache and peak
statistics are reset, so the real run starts from the state it would have had without the check.
On the CPU it runs too (that is how it is tested), without memory figures.
"""

from __future__ import annotations

import gc
import heapq
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from tui_finetune.core.autofit import micro_batch_sentence, next_micro_batch
from tui_finetune.core.planner import MIN_SEQ_LEN as MIN_FIT_SEQ_LEN  # the floor auto-fit keeps too
from tui_finetune.engine.training import is_oom

LossFn = Callable[[Any, dict[str, Any]], torch.Tensor]
"""What the trainer computes: ``loss_fn(model, inputs) -> scalar loss``."""


@dataclass(frozen=True)
class FitCheckResult:
    """One forward+backward: the loss, the time, and on CUDA the peak memory it took."""

    loss: float
    seconds: float
    rows: int
    tokens: int
    """Tokens in the batch, padding included (what the memory follows)."""
    peak_allocated_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` during the check; None on the CPU."""
    peak_reserved_bytes: int | None = None
    """``torch.cuda.max_memory_reserved`` during the check: the number the planner predicts."""


@dataclass
class FitOutcome:
    """The fit-check loop's answer: the settings that passed (or the last tried) and what changed."""

    fits: bool
    micro_batch: int
    grad_accum: int
    seq_len: int
    result: FitCheckResult | None = None
    changes: list[str] = field(default_factory=list)
    """One sentence per shrink, with the OOM that caused it and the ``--set`` that makes it permanent."""
    error: str = ""
    """The last out-of-memory message, when nothing fitted."""


# ------------------------------------------------------------ the longest batch

def row_lengths(dataset: Any) -> list[int]:
    """Tokens per row: the prepared dataset's ``length`` column, else the length of ``input_ids``."""
    names = getattr(dataset, "column_names", None)
    if names is not None and "length" in names:
        return [int(n) for n in dataset["length"]]
    return [len(row["input_ids"]) for row in dataset]


def longest_rows(dataset: Any, count: int) -> list[dict[str, Any]]:
    """The ``count`` longest rows, longest first (the earliest row wins a tie)."""
    lengths = row_lengths(dataset)
    picked = heapq.nsmallest(min(count, len(lengths)), range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [dict(dataset[i]) for i in picked]


def longest_batch(dataset: Any, collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
                  micro_batch: int) -> dict[str, Any]:
    """The hardest batch training can meet: the ``micro_batch`` longest rows through the training collator.

    Padded, that is ``micro_batch`` rows at the longest length; packed (``DataCollatorWithFlattening``),
    one row of all their tokens, which is the most a packed micro-batch can hold.
    """
    return collator(longest_rows(dataset, micro_batch))


def truncate_rows(rows: list[dict[str, Any]], seq_len: int) -> list[dict[str, Any]]:
    """The same rows cut to ``seq_len`` tokens, as a shorter ``data.seq_len`` would tokenize them."""
    out = []
    for row in rows:
        row = dict(row)
        for key in ("input_ids", "labels", "attention_mask"):
            if key in row:
                row[key] = list(row[key])[:seq_len]
        if "length" in row:
            row["length"] = min(int(row["length"]), seq_len)
        out.append(row)
    return out


# ------------------------------------------------------------ one check

def fit_check(model: Any, loss_fn: LossFn, batch: dict[str, Any], *, hold_bytes: int = 0) -> FitCheckResult:
    """One forward and backward pass of ``loss_fn`` on ``batch``, then everything put back.

    ``hold_bytes`` of VRAM stay allocated through the pass: the optimizer states the first real
    optimizer step will add (the check never steps, so they would otherwise be missing from its peak).
    Raises what the pass raises (a CUDA OOM included), after the same clean-up.
    """
    cuda = torch.cuda.is_available() and _model_device(model).type == "cuda"
    inputs = {k: v.to(_model_device(model)) if torch.is_tensor(v) else v for k, v in batch.items()}
    ids = inputs.get("input_ids")
    rows, tokens = (int(ids.shape[0]), int(ids.numel())) if torch.is_tensor(ids) else (0, 0)
    with _leaves_no_trace(model):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        held = torch.empty(hold_bytes, dtype=torch.uint8, device=_model_device(model)) if cuda and hold_bytes else None
        start = time.perf_counter()
        loss = loss_fn(model, inputs)
        loss.backward()
        value = float(loss.detach().float().item())
        del loss
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        allocated = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        del held
    return FitCheckResult(loss=value, seconds=seconds, rows=rows, tokens=tokens,
                          peak_allocated_bytes=allocated, peak_reserved_bytes=reserved)


def _model_device(model: Any) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def _leaves_no_trace(model: Any) -> Iterator[None]:
    """Train mode inside; afterwards no gradients, the old mode and RNG states, and an empty cache."""
    was_training = model.training
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.train()
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        release_memory()


def release_memory() -> None:
    """Give back what the check held: collect the graph's garbage, empty the cache, reset the peaks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------ check, shrink on OOM, check again

def fit_check_until_it_fits(model: Any, loss_fn: LossFn, rows: list[dict[str, Any]], collator: Callable[..., Any],
                            *, micro_batch: int, grad_accum: int, seq_len: int,
                            min_seq_len: int = MIN_FIT_SEQ_LEN, hold_bytes: int = 0) -> FitOutcome:
    """Fit-check ``rows`` (the longest first, at least ``micro_batch`` of them when the data has them).

    On a CUDA OOM: halve the micro-batch and double the accumulation (``next_micro_batch``, the
    effective batch unchanged); at micro-batch 1, halve the sequence length (the rows truncated)
    down to ``min_seq_len``. Anything but an OOM propagates.
    """
    changes: list[str] = []
    micro, accum, seq = micro_batch, grad_accum, seq_len
    while True:
        batch_rows = truncate_rows(rows[:micro], seq)
        try:
            result = fit_check(model, loss_fn, collator(batch_rows), hold_bytes=hold_bytes)
            return FitOutcome(True, micro, accum, seq, result, changes)
        except Exception as err:  # noqa: BLE001 - only an OOM is handled; the rest is re-raised
            if not is_oom(err):
                raise
            error = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        release_memory()
        longest = max((len(r["input_ids"]) for r in batch_rows), default=0)
        where = f"CUDA out of memory in the fit-check at micro-batch {micro} x {longest} tokens"
        if micro > 1:
            new_micro = next_micro_batch(micro)
            new_accum = accum * (micro // new_micro)
            changes.append(f"{where}: {micro_batch_sentence(micro, new_micro, accum, new_accum)}: "
                           f"--set train.micro_batch={new_micro} --set train.grad_accum={new_accum}")
            micro, accum = new_micro, new_accum
            continue
        new_seq = min(seq, longest) // 2
        if new_seq < min_seq_len:
            return FitOutcome(False, micro, accum, seq, None, changes, error)
        changes.append(f"{where}: data.seq_len {seq} -> {new_seq} (rows longer than {new_seq} tokens are "
                       f"truncated): --set data.seq_len={new_seq}")
        seq = new_seq
