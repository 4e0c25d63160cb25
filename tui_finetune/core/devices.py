"""How many processes a run trains with, on which GPUs, and the command that starts them.

``train.devices`` is 1, a number, or ``"all"``. One device is the plain worker
(``python -m tui_finetune.engine.worker RUN_DIR``). More become data-parallel ranks started by PyTorch's
own launcher, ``python -m torch.distributed.run --standalone --nproc-per-node N -m
tui_finetune.engine.worker RUN_DIR``, with the same interpreter. ``--standalone`` binds its rendezvous
store to port 0, so the port is free by construction: a port picked here and passed on could be taken
by another run before torchrun binds it.

Which cards: the report's best ones (most memory first, as ``best_gpu``), named to CUDA by their NVML
index with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (NVML counts in PCI bus order; CUDA's default order is
"fastest first", and the two differ on mixed machines). A single-device run on a machine with several
GPUs is pinned to one card, so Hugging Face's Trainer never falls into ``DataParallel`` across all of
them. A ``CUDA_VISIBLE_DEVICES`` the user set is respected: the run takes the first N of those.
Plain Python: no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

from tui_finetune.core.hardware import GpuInfo, HardwareReport
from tui_finetune.core.recipe import RecipeError, RecipeSpec

WORKER_MODULE = "tui_finetune.engine.worker"
TORCHRUN_MODULE = "torch.distributed.run"
VISIBLE = "CUDA_VISIBLE_DEVICES"
DATA_PARALLEL_NOTE = ("every GPU holds the whole model (data-parallel): a model that doesn't fit one card is not "
                      "split across cards")
"""What the planner says about more than one GPU, in one place (docs/design.md: Several GPUs)."""


def settle_devices(value: int | str, gpu_count: int) -> int:
    """The number of processes ``train.devices`` means on a machine with ``gpu_count`` NVIDIA GPUs.

    ``"all"`` is every GPU (one process on a machine without any). A number above the GPUs present is
    refused with the fix. Without a GPU a number is that many CPU processes, which only tests want."""
    if value == "all":
        return max(gpu_count, 1)
    if not isinstance(value, int) or value < 1:
        raise RecipeError(f"train.devices: {value!r} must be a number of GPUs (1, 2, ...) or \"all\"")
    if gpu_count and value > gpu_count:
        raise RecipeError(f"train.devices = {value} but this machine has {gpu_count} NVIDIA GPU"
                          f"{'s' if gpu_count > 1 else ''}: use --devices {gpu_count} (or \"all\"), or fewer")
    return value


def visible_gpu_count(report: HardwareReport, env: Mapping[str, str]) -> int:
    """GPUs a run may use: NVML's count, or fewer when the user's ``CUDA_VISIBLE_DEVICES`` names fewer
    (NVML ignores that variable; CUDA doesn't)."""
    if VISIBLE in env:
        return min(len(report.gpus), len([part for part in env[VISIBLE].split(",") if part.strip()]))
    return len(report.gpus)


def pick_gpus(report: HardwareReport, count: int) -> list[GpuInfo]:
    """The ``count`` best cards (most memory, then newest, then lowest index), in NVML order."""
    ranked = sorted(report.gpus, key=lambda g: (g.total_bytes, g.compute_capability, -g.index), reverse=True)
    return sorted(ranked[:count], key=lambda g: g.index)


def smallest_gpu(report: HardwareReport, count: int, env: Mapping[str, str] | None = None) -> GpuInfo | None:
    """The card a run on ``count`` devices must fit: every rank holds the whole model, so the smallest.

    With ``env`` (the launch's environment), of the cards ``pin_gpus`` will pin there: the user's own
    ``CUDA_VISIBLE_DEVICES`` may name others than the best ones. Where NVML can't tell which cards it names
    (UUIDs, CUDA's own order), the smallest card of the machine: a plan may be too careful, never too bold."""
    pinned = run_gpus(pin_gpus(dict(env), report, count), report) if env is not None else []
    users_own = env is not None and VISIBLE in env
    picked = pinned or (list(report.gpus) if users_own else pick_gpus(report, count))
    return min(picked, key=lambda g: (g.total_bytes - g.other_process_bytes, g.index)) if picked else None


def pin_gpus(env: dict[str, str], report: HardwareReport, count: int) -> dict[str, str]:
    """``env`` with ``CUDA_VISIBLE_DEVICES`` naming the cards a run on ``count`` devices uses.

    Unchanged on a machine with at most one GPU (nothing to choose). The user's own
    ``CUDA_VISIBLE_DEVICES`` wins: the run takes its first ``count`` entries."""
    env = dict(env)
    if VISIBLE in env:  # set, even empty (no GPU at all): the user's choice
        visible = [part.strip() for part in env[VISIBLE].split(",") if part.strip()]
        env[VISIBLE] = ",".join(visible[:count])
        return env
    if len(report.gpus) <= 1:
        return env
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env[VISIBLE] = ",".join(str(gpu.index) for gpu in pick_gpus(report, count))
    return env


def run_gpus(env: Mapping[str, str], report: HardwareReport) -> list[GpuInfo]:
    """The cards a run started with ``env`` (``pin_gpus``'s) trains on, in rank order: rank r is on the r-th.

    Empty where NVML's numbers can't tell: no GPU, or a ``CUDA_VISIBLE_DEVICES`` of the user's that names
    cards by UUID or in CUDA's own order (``CUDA_DEVICE_ORDER`` not ``PCI_BUS_ID`` on a multi-GPU machine).
    The monitor then shows each rank's peak without a card's name or NVML figures, rather than a guess."""
    if VISIBLE not in env:
        return list(report.gpus) if len(report.gpus) == 1 else []
    if len(report.gpus) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return []
    by_index = {gpu.index: gpu for gpu in report.gpus}
    named = [part.strip() for part in env[VISIBLE].split(",") if part.strip()]
    if not all(part.isdigit() and int(part) in by_index for part in named):
        return []
    return [by_index[int(part)] for part in named]


def worker_command(run_dir: Path, processes: int = 1, python: str | None = None) -> list[str]:
    """The command that trains ``run_dir``: the worker itself, or torchrun starting ``processes`` of it."""
    python = python or sys.executable
    if processes <= 1:
        return [python, "-m", WORKER_MODULE, str(run_dir)]
    return [python, "-m", TORCHRUN_MODULE, "--standalone", "--nnodes", "1", "--nproc-per-node", str(processes),
            "--max-restarts", "0", "-m", WORKER_MODULE, str(run_dir)]


def describe_batch(recipe: RecipeSpec, unit: str = "GPUs") -> str:
    """``8 sequences a step (micro-batch 2 x accumulation 2 x 2 GPUs)``: the recipe's effective batch, shown
    whole (the recipe in effect: its recipe.toml after any OOM shrink, ``train.devices`` settled)."""
    per = f"micro-batch {recipe.train.micro_batch} x accumulation {recipe.train.grad_accum}"
    if recipe.device_count > 1:
        per += f" x {recipe.device_count} {unit}"
    return f"{recipe.effective_batch} sequences a step ({per})"
