"""The ranks of a multi-GPU run: which one this process is, and the few collectives its promises need.

torchrun starts one worker per GPU (core/devices.py) and tells each its ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``. Every rank loads the whole model on its own card and trains its own share of each
step's rows; Hugging Face's Trainer (through accelerate) shards the data and averages the loss it logs.
What this module adds, so the product's guarantees hold on every rank:

- **one writer**: rank 0 alone writes events, run.json, recipe.toml, checkpoints and the adapter; the
  others get a ``SilentEventLog`` and read-only run folders (core/run_folder/info.py);
- **decisions taken together**: a stop (the STOP file, a signal), a wall-clock save, an out-of-memory on
  any rank: each is a flag all-reduced with MAX (``any_rank``), so every rank acts on the same step and
  none waits forever in a collective the others left;
- **the smallest card**: auto-fit plans for the least free memory of any rank (``min_over_ranks``);
- **gradients averaged by us** (``average_gradients``), once per optimizer step, after every rank has
  finished its micro-batches: DDP's own reducer all-reduces inside ``backward``, so an out-of-memory on
  one rank mid-backward would leave the others blocked in it, and the OOM rule could never run;
- **peer failures told apart** (``is_peer_failure``): when one rank is killed, torchrun ends the rest;
  rank 0 then records ``interrupted`` (resumable), not ``failed``.

Everything here is a no-op in a single process, so the worker reads the same either way. The backend
is gloo on the CPU and NCCL on CUDA, as accelerate would pick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from tui_finetune.core.events import Event, EventLog

PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
             "nccl communicator was aborted", "socket timeout", "connection refused")
"""How gloo and NCCL word "another rank is gone" (gloo says the first, with "a remote worker crashing")."""
BUCKET_ELEMENTS = 1 << 24
"""Gradients are all-reduced in buckets of this many elements (64 MiB in fp32): one collective per bucket,
never a second copy of every gradient at once."""


@dataclass(frozen=True)
class RankFacts:
    """Which process of the run this is, read from torchrun's environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    under_torchrun: bool = False
    """Started by torchrun (``TORCHELASTIC_RUN_ID``), even with one process: run.json's pid is then torchrun's."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_rank_facts(env: dict[str, str] | None = None) -> RankFacts:
    env = dict(os.environ) if env is None else env
    return RankFacts(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                     world_size=int(env.get("WORLD_SIZE", 1)), under_torchrun="TORCHELASTIC_RUN_ID" in env)


def start_process_group(facts: RankFacts) -> None:
    """Join the run's process group (NCCL on CUDA, with this rank's card made current: ``device_map={"":
    current device}`` then loads the model on ``LOCAL_RANK``; gloo on the CPU). Trainer finds it started."""
    import torch.distributed as dist

    if not facts.distributed or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(facts.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", facts.local_rank))
    else:
        dist.init_process_group("gloo")


def stop_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where a collective's tensor must live: the current card under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over every rank, in one collective: the decisions all ranks must take together."""
    if not _active():
        return tuple(bool(f) for f in flags)
    import torch.distributed as dist

    tensor = torch.tensor([1.0 if f else 0.0 for f in flags], device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in tensor.tolist())


def failing_rank(failed: bool) -> int | None:
    """Whether any rank failed, and which (the highest, when several did): every rank learns it at once."""
    if not _active():
        return 0 if failed else None
    import torch.distributed as dist

    tensor = torch.tensor([float(dist.get_rank() + 1 if failed else 0)], device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item()) - 1 if tensor.item() > 0 else None


def min_over_ranks(value: float) -> float:
    """The smallest ``value`` of any rank (auto-fit's free VRAM: the smallest card decides)."""
    if not _active():
        return value
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return float(tensor.item())


def gather_from_ranks(value: float) -> list[float]:
    """``value`` of every rank, rank 0 first (the pids, each card's VRAM peak)."""
    if not _active():
        return [value]
    import torch.distributed as dist

    mine = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [float(t.item()) for t in every]


def barrier() -> None:
    """Wait until every rank is here (rank 0's writes are then visible to all)."""
    if _active():
        import torch.distributed as dist

        dist.barrier()


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the trainable parameters' gradients over the ranks, in place, as DDP would have (a missing
    gradient counts as zeros, so every rank's buckets line up)."""
    if not _active():
        return
    import torch.distributed as dist

    world = dist.get_world_size()
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in bucket:
            count = p.grad.numel()
            p.grad.copy_(flat[offset:offset + count].view_as(p.grad))
            offset += count


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, up to ``BUCKET_ELEMENTS`` each (every rank builds
    the same buckets: the parameters come in the model's order)."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        if not out or size + p.numel() > BUCKET_ELEMENTS or (out[-1][0].grad.dtype, out[-1][0].device) != (
                p.grad.dtype, p.device):
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` says another rank is gone (killed, crashed): the run is interrupted, not failed."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - a torch built without distributed
        DistError = ()  # type: ignore[assignment,misc]  # noqa: N806
    text = str(err).lower()
    return isinstance(err, DistError) or any(words in text for words in PEER_GONE)


class SilentEventLog(EventLog):
    """The event log of a rank other than 0: it writes nothing, so ``events.jsonl`` has one author."""

    def __init__(self, path: str | Path = "") -> None:
        self.path = Path(path)

    def emit(self, event: Event) -> None:
        return None

    def close(self) -> None:
        return None

