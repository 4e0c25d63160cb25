"""The fit-check: the run's own training step on its longest batch, before the first real step.

The planner's estimate is a model; this is the measurement. It runs inside ``Trainer.train``, from a
callback's ``on_train_begin``, once the model is prepared (autocast, device) and the optimizer is
built, so it takes the path every step takes: ``trainer.training_step`` (the backend's loss and its
backward) on the ``micro_batch`` longest rows, collated as training collates them (padded, or
flattened into one row when packing), then the optimizer's step, so its states exist as they will
after the first real step. Nothing is estimated or held on the side. An out-of-memory propagates out
of ``train()`` like one in a real step, and the worker's one recovery rule handles both
(engine/training_loop.py): Liger or Unsloth is dropped, then the micro-batch shrinks, then a fresh
run's input embedding moves to CPU RAM, the compiled backend is dropped, and its sequence is halved.

It leaves no trace: the LoRA weights and the optimizer's state are put back as they were (a resumed
run's moments included), the gradients set to None, the RNG states and train/eval mode restored, and
the allocator's cache emptied, so the run's numbers are those it would have had without the check
and a backend's compile caches see the same step they will see in training. On the CPU it runs too
(that is how it is tested), without memory figures. With several ranks every rank checks the same
longest batch on its own card, and an out-of-memory on any of them is raised on all (the smallest card
decides, and the one OOM rule shrinks every rank alike).
"""

from __future__ import annotations

import copy
import gc
import heapq
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers import TrainerCallback

from tui_finetune.core.planner import GIB

HEADROOM_BYTES = 256 * 1024**2
"""What must stay free at the check's peak. A step that fits with less is treated as an out-of-memory:
on the simulated 4 GB card (desktop state) Phi-2's check fitted with under 100 MiB to spare, and a later
step, its allocator's blocks split differently, asked for 100 MiB more and failed at micro-batch 1."""


@dataclass(frozen=True)
class FitCheckResult:
    """One real training step on the longest batch: the loss, the time, and on CUDA the peak it took."""

    loss: float
    seconds: float
    rows: int
    tokens: int
    """Tokens in the batch, padding included (what the memory follows)."""
    peak_allocated_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` during the check; None on the CPU."""
    peak_reserved_bytes: int | None = None
    """``torch.cuda.max_memory_reserved`` during the check: the number the planner predicts."""

    def message(self, micro_batch: int) -> str:
        """The ``fit`` phase's line: the batch checked, its measured peak and its time."""
        peak = ""
        if self.peak_reserved_bytes is not None and self.peak_allocated_bytes is not None:
            peak = (f": peak {self.peak_reserved_bytes / GIB:.2f} GiB reserved "
                    f"({self.peak_allocated_bytes / GIB:.2f} GiB allocated)")
        return (f"the longest batch fits ({micro_batch} example(s) in {self.rows} x "
                f"{self.tokens // max(self.rows, 1)} tokens){peak}; training step and optimizer step in "
                f"{self.seconds:.1f}s")


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


# ------------------------------------------------------------ the check

def fit_check_step(trainer: Any, batch: dict[str, Any]) -> FitCheckResult:
    """``trainer.training_step`` on ``batch`` and one optimizer step, then everything put back.

    Call it where ``Trainer.train`` has prepared the model and built the optimizer (``FitCheckCallback``).
    Raises what the step raises (a CUDA OOM included), after the same clean-up.
    """
    model, optimizer = trainer.model_wrapped, trainer.optimizer
    cuda = torch.cuda.is_available() and _model_device(model).type == "cuda"
    ids = batch.get("input_ids")
    rows, tokens = (int(ids.shape[0]), int(ids.numel())) if torch.is_tensor(ids) else (0, 0)
    labels = batch.get("labels")
    counted = int((labels[..., 1:] != -100).sum()) if torch.is_tensor(labels) else None
    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # set by the loop from its first step on
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    if hasattr(trainer, "begin_optimizer_step"):  # one micro-batch, then the ranks sync (training.py)
        trainer.begin_optimizer_step(1)
    with _leaves_no_trace(model, optimizer):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = trainer.training_step(model, dict(batch), counted)
        _inner(optimizer).step()  # past accelerate's wrapper: a grad scaler must not learn from this step
        value = float(loss.detach().float().item())
        del loss
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        allocated = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        if cuda:
            check_headroom(reserved or 0)
    return FitCheckResult(loss=value, seconds=seconds, rows=rows, tokens=tokens,
                          peak_allocated_bytes=allocated, peak_reserved_bytes=reserved)


def check_headroom(peak_reserved: int) -> None:
    """Raise a CUDA out-of-memory when less than ``HEADROOM_BYTES`` was free at the step's peak (the free
    figure is the driver's, so memory outside torch, other programs' included, counts)."""
    free = torch.cuda.mem_get_info()[0]
    spare = free - max(peak_reserved - torch.cuda.memory_reserved(), 0)
    if spare < HEADROOM_BYTES:
        raise torch.OutOfMemoryError(f"CUDA out of memory: the fit-check's step fitted with only {spare / 2**20:.0f} MiB "
                                     f"to spare, and training needs {HEADROOM_BYTES / 2**20:.0f} MiB of room")


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


def _model_device(model: Any) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


@contextmanager
def _leaves_no_trace(model: Any, optimizer: Any) -> Iterator[None]:
    """Inside: train mode. Afterwards: the trainable weights and the optimizer's state as they were (kept
    in CPU RAM meanwhile, so the check needs no VRAM the run won't), no gradients, the old mode and RNG
    states, and an empty cache."""
    was_training = model.training
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    weights = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}
    optimizer_state = _to_cpu(_inner(optimizer).state_dict()) if optimizer is not None else None
    model.train()
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.copy_(weights[name])
        if optimizer_state is not None:
            _inner(optimizer).load_state_dict(optimizer_state)
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


class FitCheckCallback(TrainerCallback):
    """Runs the fit-check when ``Trainer.train`` begins, on the longest batch of ``dataset`` at the
    trainer's micro-batch (``longest_batch``).

    ``on_checked(result)`` gets the measurement (the worker writes the ``fit`` phase and its peak).
    ``passed`` tells an out-of-memory in the check from one in a later step.
    """

    def __init__(self, trainer: Any, dataset: Any, collator: Callable[[list[dict[str, Any]]], Any],
                 on_checked: Callable[[FitCheckResult], None]) -> None:
        self.trainer = trainer
        self.dataset = dataset
        self.collator = collator
        self.on_checked = on_checked
        self.passed = False
        self.stepping = False
        """True from the check's own step on: a failure then is the step's (so the backend's), not the data's
        or a checkpoint's, which ``Trainer.train`` loads before the check (engine/training_loop.py)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.passed or not len(self.dataset):
            return
        batch = longest_batch(self.dataset, self.collator, args.per_device_train_batch_size)
        self.stepping = True
        if args.world_size <= 1:
            result = fit_check_step(self.trainer, batch)
        else:
            result = self._check_on_every_rank(batch)
        if not math.isfinite(result.loss) and not getattr(getattr(self.trainer, "backend", None), "probes", True):
            # the check is an unprobed backend's probe (engine/backends.py Backend.probes), NaN guard included
            raise RuntimeError(f"the fit-check's loss is {result.loss:.4g}")
        self.passed = True
        self.on_checked(result)

    def _check_on_every_rank(self, batch: dict[str, Any]) -> FitCheckResult:
        """The check on this rank; an out-of-memory on any rank (the headroom check is this card's own) is
        raised on every rank, after the check's clean-up, so all of them shrink together."""
        from tui_finetune.engine import distributed
        from tui_finetune.engine.training import is_oom

        result, failed = None, ""
        try:
            result = fit_check_step(self.trainer, batch)
        except Exception as err:
            if not is_oom(err):
                raise
            failed = str(err).splitlines()[0] if str(err) else type(err).__name__
        rank = distributed.failing_rank(bool(failed))
        if rank is not None or result is None:
            raise torch.OutOfMemoryError(failed if failed.startswith("CUDA out of memory on rank") else
                                         f"CUDA out of memory on rank {rank}" + (f": {failed}" if failed else ""))
        return result
