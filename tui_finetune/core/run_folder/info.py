"""A run's own records: run.json (``RunInfo``) and the run's recipe.toml, and creating a run folder.

Run ids read and sort by time: ``20261126-091630-gemma-3-270m``. Any process may read a run; only
its worker (and ``request_stop``) writes ``run.json``, always by atomic replace, so a reader never
sees half a file; of a multi-GPU run's ranks only rank 0 writes (``make_run_folders_read_only``). recipe.toml is the run's recipe as it trains now: auto-fit, the fit-check and OOM
recovery rewrite it (also by atomic replace), so every reader and a resume see the values in effect.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tui_finetune.core.paths import runs_dir
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.recipe_io import fill_missing_keys, load_recipe, recipe_from_dict, recipe_to_toml
from tui_finetune.core.run_folder.layout import CHECKPOINTS_DIR, EVENTS_FILE, RECIPE_FILE, RUN_FILE

STATES = ("running", "stopping", "completed", "failed", "interrupted")
FINAL_STATES = ("completed", "failed", "interrupted")


class RunError(LookupError):
    """A run that can't be found or read; the message says what to try."""


@dataclass
class RunInfo:
    """The contents of ``run.json``."""

    run_id: str
    model: str
    state: str = "running"
    pid: int | None = None
    data_path: str = ""
    data_hash: str = ""
    """Hash of the data as prepared (data/prepare.py); a resume with other data is refused."""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    total_steps: int = 0
    message: str = ""
    """Why the run ended, in one line (the error, or where the adapter is)."""
    versions: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    """The kernels that train this run (engine/backends.py): universal, liger or unsloth."""
    backend_reason: str = ""
    backend_skipped: list[str] = field(default_factory=list)
    """Each backend tried before it and why it was passed over ("liger: not installed ...")."""
    backend_failures: dict[str, str] = field(default_factory=dict)
    """Backends that raised while loading or on their probe step (name: error); the worker restarted
    without them, and later starts of this run skip them too."""
    device: str = ""
    resumed_from: str = ""
    """The checkpoint the worker last resumed from ('' for a fresh start)."""
    eval_batch: int = 0
    """The eval batch after an OOM in evaluation halved it (0: the micro-batch)."""
    oom_shrinks: list[dict[str, Any]] = field(default_factory=list)
    """The history of OOM recoveries: time, where (fit-check or training), micro_batch [old, new], grad_accum
    [old, new], the error's first line. The values in effect are in recipe.toml, never here."""
    autofit: list[str] = field(default_factory=list)
    """What auto-fit and the fit-check changed before training, one sentence each with its ``--set``
    (engine/recipe_refit.py); the changed values are in recipe.toml."""
    phase_peaks_gib: dict[str, float] = field(default_factory=dict)
    """Peak VRAM torch reserved in each phase that touches the GPU (fit, train, save, eval, sample-before,
    sample-after), in GiB, as the worker last measured it: the evidence that every phase fits the card."""
    phase_running: str = ""
    """The optional phase under way (eval, sample-before, sample-after): one still set when a worker
    starts was under way when its predecessor died, and counts as failed."""
    failed_phases: dict[str, str] = field(default_factory=dict)
    """Optional phases that failed (name: why); a resume skips them rather than fail the same way again."""
    resume_from_step: int | None = None
    resume_force: bool = False
    """Set by ``resume --from STEP`` / ``--force`` for the next worker, which clears them once read."""
    world_size: int = 1
    """Processes the run was launched with (its recipe's ``train.devices``, settled at launch): above 1,
    ``pid`` is torchrun's, the parent of the ranks, and a stop is the STOP file alone (every rank reads
    it). The effective batch in effect is the recipe's (recipe.toml), never a copy here."""
    rank_pids: list[int] = field(default_factory=list)
    """Each rank's pid, rank 0 first (multi-process runs)."""
    gpus: list[dict[str, Any]] = field(default_factory=list)
    """The cards the run trains on, rank order, as NVML saw them at launch: ``index`` (NVML's, as nvidia-smi
    shows it), ``name`` and ``total_mb`` (``core/devices.py::run_gpus``; empty where that can't be told, or
    without a GPU). The monitor names each rank's card from it, live and after the run."""
    packing: dict[str, Any] = field(default_factory=dict)
    """With ``data.packing`` or ``data.group_by_length``: kind (``flat`` bins or ``grouped`` rows; a record
    without it is flat), rows, bins, tokens, seq_len (a bin's budget: tokens, or padded tokens for a group),
    padded (a grouped run's padded tokens), effective_batch and bins_per_step (bins a device trains per
    optimizer step), as engine/packed_training.py chose them; a resume with the same bins reuses
    bins_per_step, so it skips exactly the bins trained. An OOM shrink of a grouped run rewrites it with the
    groups of the halved budget. The recipe in recipe.toml keeps counting rows. Empty: plain rows."""


def make_run_id(model: str, now: datetime | None = None) -> str:
    """``YYYYMMDD-HHMMSS-<model short name>``: sorts by start time and says what it trains."""
    now = now or datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{model_short_name(model)}"


def model_short_name(model: str) -> str:
    """The last part of a Hub id, folder or package name, as a lowercase slug."""
    name = model.rstrip("/\\").replace("\\", "/").split("/")[-1].split(":")[-1]
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")
    return slug[:40] or "model"


def create_run(recipe: RecipeSpec, data_path: str | Path, base: Path | None = None,
               now: datetime | None = None) -> Path:
    """Make a new run folder with the resolved recipe and a ``running`` run.json (pid set by the launcher)."""
    base = base or runs_dir()
    base.mkdir(parents=True, exist_ok=True)
    run_id = make_run_id(recipe.model, now)
    run_dir = base / run_id
    suffix = 1
    while True:
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            suffix += 1
            run_dir = base / f"{run_id}-{suffix}"
    (run_dir / CHECKPOINTS_DIR).mkdir()
    write_run_recipe(run_dir, recipe, data_path)
    (run_dir / EVENTS_FILE).touch()
    write_run_info(run_dir, RunInfo(run_id=run_dir.name, model=recipe.model, data_path=str(Path(data_path).resolve())))
    return run_dir


def read_run_info(run_dir: Path) -> RunInfo:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run_dir}: not a run folder (no {RUN_FILE})") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{run_dir / RUN_FILE}: unreadable ({err})") from None
    known = {f.name for f in fields(RunInfo)}
    return RunInfo(**{k: v for k, v in data.items() if k in known})


_read_only = False


def make_run_folders_read_only() -> None:
    """From now on this process reads run folders but never writes ``run.json`` or ``recipe.toml``: it is a
    rank other than 0 of a multi-process run, which trains in step with rank 0 but leaves the folder to it.
    One switch here, rather than a condition at every writer, so no code path can forget it."""
    global _read_only
    _read_only = True


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    """Write run.json by atomic replace: readers see the old or the new file, never a torn one."""
    if _read_only:
        return
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / RUN_FILE)


def update_run_info(run_dir: Path, **changes: Any) -> RunInfo:
    info = replace(read_run_info(run_dir), **changes)
    write_run_info(run_dir, info)
    return info


KEYS_OLDER_RUNS_LACK = {"data.group_by_length": False}
"""Recipe keys a run folder written before they existed lacks, with the value that trains it as it trained
then (not today's default): an interrupted run resumed on other batches (groups instead of rows) would skip
other rows than those it trained. New runs write every key, so this applies to old folders alone."""


def read_run_recipe(run_dir: Path, overrides: list[str] | None = None) -> RecipeSpec:
    """The run's recipe.toml (with ``--set`` ``overrides``); keys it lacks as ``KEYS_OLDER_RUNS_LACK`` says."""
    return load_recipe(run_dir / RECIPE_FILE, overrides, missing=KEYS_OLDER_RUNS_LACK)


def run_recipe_from_dict(data: dict[str, Any], source: str) -> RecipeSpec:
    """A recipe a run folder stored as a dict (a checkpoint's run_state.json), read as ``read_run_recipe`` does."""
    return recipe_from_dict(fill_missing_keys(copy.deepcopy(data), KEYS_OLDER_RUNS_LACK), source)


def write_run_recipe(run_dir: Path, recipe: RecipeSpec, data_path: str | Path | None = None) -> None:
    """Write the run's resolved recipe by atomic replace: the worker rewrites it when auto-fit, the
    fit-check or an OOM changes a value (engine/recipe_refit.py), so every reader and a resume see the
    values in effect."""
    if _read_only:
        return
    data = data_path if data_path is not None else read_run_info(run_dir).data_path
    header = (f"Resolved recipe of run {run_dir.name}. "
              f"Start again with: tui-finetune train {run_dir / RECIPE_FILE} --data {data}")
    tmp = run_dir / f".{RECIPE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(recipe_to_toml(recipe, header), encoding="utf-8")
    os.replace(tmp, run_dir / RECIPE_FILE)


def mark_interrupted_phase_failed(run_dir: Path) -> None:
    """A starting worker's first step: an optional phase still marked as under way was under way when the
    previous worker died (killed, or a crash inside CUDA), so it counts as failed and will be skipped."""
    running = read_run_info(run_dir).phase_running
    if running:
        update_run_info(run_dir, phase_running="")
        mark_phase_failed(run_dir, running, "the worker stopped during it (killed or crashed)")


def mark_phase_failed(run_dir: Path, key: str, why: str) -> None:
    update_run_info(run_dir, failed_phases={**read_run_info(run_dir).failed_phases, key: why})
