"""Test hooks: faults injected at named points of a run, chosen by the ``TUI_FINETUNE_FAULT`` variable.

The promise "it finishes" is only as good as the tests that kill, corrupt and starve a real worker
at the worst moment. Those moments are inside the save and the training step, where a test can't
reach from outside, so the engine calls :func:`fault_point` there and this module decides, from the
environment, whether to die. Unset (every real run), it costs one dict lookup.

``TUI_FINETUNE_FAULT`` holds comma-separated faults ``ACTION:POINT[:ARG][@STEP]``:

- ``exit:save-after-file:K@S``  ``os._exit(137)`` once K files of the save at step S are flushed
- ``exit:save-before-marker@S`` / ``exit:save-before-rename@S`` / ``exit:save-after-rename@S``
- ``exit:after-save@S``          die right after step S's checkpoint is sealed (a resume exactly there)
- ``exit:step@S``                die at the end of step S, before its save
- ``enospc:save@S``              the marker write of step S's save raises ``OSError(ENOSPC)``
- ``oom:train:MB@S``             from step S on, a training micro-step raises
                                 ``torch.cuda.OutOfMemoryError`` while the micro-batch exceeds MB
- ``oom:kept:N@S``               from step S on, a training micro-step raises it while more than N decoder
                                 layers keep their activations (``memory.layers_keeping_activations``)
- ``oom:eval:MB``                evaluation raises it while the eval batch exceeds MB
- ``oom:sample`` / ``oom:save``  the before/after generation, or the final adapter save, raises it

Without ``@S`` a fault fires at every step. A ``#R`` suffix (``oom:train:1@3#1``) limits a fault to the
rank R of a multi-process run (engine/distributed.py), so a test can fail one card of several.
``TUI_FINETUNE_TRACE=FILE`` is the other hook: each
optimizer step appends ``{"step", "ids", "loss", "micro_batches"}`` (the sample ids it trained on, the
exact loss as a hex float, the forward passes it took) to FILE, so a test can compare what a resumed run saw with an uninterrupted one.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import lru_cache

FAULT_ENV = "TUI_FINETUNE_FAULT"
TRACE_ENV = "TUI_FINETUNE_TRACE"
KILLED_EXIT = 137
"""What a shell reports for a SIGKILL: the injected deaths look like the real thing to the tests."""


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    arg: int | None
    step: int | None
    rank: int | None = None
    """Only on this rank of a multi-process run (None: every process)."""


def parse_faults(text: str) -> tuple[Fault, ...]:
    """``exit:save-after-file:2@4,oom:train:2@1#1`` -> Faults; a malformed item raises ValueError."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        item_body, _, rank = item.partition("#")
        body, _, step = item_body.partition("@")
        parts = body.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"{FAULT_ENV}: '{item}' is not ACTION:POINT[:ARG][@STEP][#RANK]")
        arg = int(parts[2]) if len(parts) == 3 else None
        out.append(Fault(parts[0], parts[1], arg, int(step) if step else None, int(rank) if rank else None))
    return tuple(out)


@lru_cache(maxsize=1)
def _faults(text: str, rank: str) -> tuple[Fault, ...]:
    return tuple(f for f in parse_faults(text) if f.rank is None or f.rank == int(rank or 0))


def active_faults() -> tuple[Fault, ...]:
    return _faults(os.environ.get(FAULT_ENV, ""), os.environ.get("RANK", ""))


def find_fault(action: str, point: str, step: int | None = None) -> Fault | None:
    """The fault set for this point (and step, where the fault names one), if any."""
    for fault in active_faults():
        if fault.action == action and fault.point == point and (fault.step is None or step is None
                                                                  or fault.step == step):
            return fault
    return None


def fault_point(point: str, step: int, arg: int | None = None) -> None:
    """Fault injection for tests: die here (``exit`` faults) or raise ENOSPC (``enospc``) when a test asked
    for it; nothing in a real run."""
    if not active_faults():
        return
    exit_fault = find_fault("exit", point, step)
    if exit_fault is not None and (exit_fault.arg is None or exit_fault.arg == arg):
        os._exit(KILLED_EXIT)
    if find_fault("enospc", point, step) is not None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {FAULT_ENV})")


def raise_injected_oom(point: str) -> None:
    """Fault injection for tests: raise a CUDA out-of-memory here when a test asked for one (``oom:POINT``)."""
    if active_faults() and find_fault("oom", point) is not None:
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} at {point})")


def oom_limit(point: str, step: int) -> int | None:
    """Fault injection for tests: the figure above which an injected OOM fires at this point and step (a
    batch size; for ``kept``, layers keeping their activations), or None (always None in a real run)."""
    for fault in active_faults():
        if fault.action == "oom" and fault.point == point and (fault.step is None or step >= fault.step):
            return fault.arg or 0
    return None
