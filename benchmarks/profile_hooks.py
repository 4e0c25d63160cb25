"""The profiler's side of a benchmark child: torch.profiler around chosen steps of the benchmark's own loop
(``stacks.train_and_measure``, through its ``StepObserver`` hook), and the two ranges that kernel names can't
give, added from outside the engine so the engine pays nothing when no profiler runs:

* ``profile::recompute``: each checkpointed layer's function (transformers' ``_gradient_checkpointing_func``
  on the layer, Unsloth's too, and the engine's chunked-MLP checkpoint) is wrapped so that a call made
  while autograd runs a backward pass (``torch._C._current_graph_task_id() != -1``: the recompute) opens
  the range; the forward call opens none.
* ``profile::loss``: our chunked loss (``memory_techniques.chunked_causal_lm_loss``, looked up by
  ``lean_causal_lm_loss`` at call time) and transformers' ``loss_function`` of the model run inside it.

Only the recorded steps run under the profiler and inside ``profile::step``; the wrappers cost a Python
call per layer and per loss in every step, recorded or not, the same for every stack.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, Callable, Iterator

from benchmarks.profile_trace import LOSS_RANGE, RECOMPUTE_RANGE, STEP_RANGE


class ProfilingObserver:
    """Steps ``0 .. warmup-1`` run plain; steps ``warmup .. warmup+record-1`` run under torch.profiler, each
    in a ``profile::step`` range; the trace is exported to ``trace_path`` after the last of them."""

    def __init__(self, warmup: int, record: int, trace_path: Path) -> None:
        self.warmup, self.record, self.trace_path = warmup, record, trace_path
        self.step_seconds: list[float] = []
        self.tagged_layers = 0
        self.loss_tagged: list[str] = []
        self._profiler: Any = None
        self._undo: list[Callable[[], None]] = []

    def attach(self, model: Any) -> None:
        self.tagged_layers = tag_recompute(model, self._undo)
        self.loss_tagged = tag_loss(model, self._undo)

    def restore(self) -> None:
        """Put back what ``attach`` wrapped (a child process needn't; a test in one process must)."""
        while self._undo:
            self._undo.pop()()

    @contextmanager
    def step(self, index: int) -> Iterator[None]:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        if index == self.warmup:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profiler = profile(activities=activities, record_shapes=True)
            self._profiler.start()
        recording = self.warmup <= index < self.warmup + self.record
        start = time.perf_counter()
        if recording:
            with record_function(STEP_RANGE):
                yield
        else:
            yield
        self.step_seconds.append(time.perf_counter() - start)
        if index == self.warmup + self.record - 1:
            self._profiler.stop()
            self._profiler.export_chrome_trace(str(self.trace_path))
            self._profiler = None


def in_backward() -> bool:
    import torch

    return torch._C._current_graph_task_id() != -1


def ranged(name: Callable[[], str | None], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run inside the record_function range ``name()`` returns (none when it returns None)."""
    from torch.profiler import record_function

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        label = name()
        if label is None:
            return fn(*args, **kwargs)
        with record_function(label):
            return fn(*args, **kwargs)

    return run


def replace_attribute(owner: Any, name: str, value: Any, undo: list[Callable[[], None]]) -> None:
    """``owner.name = value``, with the way back in ``undo``: the instance's attributes as they were (a property's
    setter, like transformers' ``loss_function``, stores under another name, so the whole changed set is kept)."""
    before = dict(vars(owner))
    setattr(owner, name, value)
    changed = [key for key, now in vars(owner).items() if key not in before or before[key] is not now]

    def put_back() -> None:
        for key in changed:
            if key in before:
                vars(owner)[key] = before[key]
            else:
                del vars(owner)[key]

    undo.append(put_back)


def tag_recompute(model: Any, undo: list[Callable[[], None]]) -> int:
    """Wrap the checkpoint function of every checkpointed layer so its recompute runs in ``profile::recompute``;
    returns how many layers were wrapped (0: no checkpointing, or one these hooks don't know)."""

    def recompute_label() -> str | None:
        return RECOMPUTE_RANGE if in_backward() else None

    def tagging(checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(checkpoint_fn)
        def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return checkpoint_fn(ranged(recompute_label, function), *args, **kwargs)

        return run

    count = 0
    for module in model.modules():
        func = vars(module).get("_gradient_checkpointing_func")
        if func is not None and getattr(module, "gradient_checkpointing", True):
            replace_attribute(module, "_gradient_checkpointing_func", tagging(func), undo)
            count += 1
    techniques = sys.modules.get("tui_finetune.engine.memory_techniques")
    if techniques is not None:  # chunk_mlps' own checkpoint of each MLP chunk
        replace_attribute(techniques, "checkpoint", tagging(techniques.checkpoint), undo)
    return count


def tag_loss(model: Any, undo: list[Callable[[], None]]) -> list[str]:
    """Run the losses we can reach inside ``profile::loss``; returns which were wrapped."""
    tagged = []
    techniques = sys.modules.get("tui_finetune.engine.memory_techniques")
    if techniques is not None:
        replace_attribute(techniques, "chunked_causal_lm_loss",
                          ranged(lambda: LOSS_RANGE, techniques.chunked_causal_lm_loss), undo)
        tagged.append("memory_techniques.chunked_causal_lm_loss")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        replace_attribute(base, "loss_function", ranged(lambda: LOSS_RANGE, base.loss_function), undo)
        tagged.append(f"{type(base).__name__}.loss_function")
    except (AttributeError, TypeError):  # a model without transformers' settable loss_function
        pass
    return tagged
