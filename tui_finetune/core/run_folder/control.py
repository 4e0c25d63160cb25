"""Start, resume and stop a run's worker: the one way the UI and ``train --detach`` launch a run.

The worker is ``python -m tui_finetune.engine.worker RUN_DIR``, or torchrun starting one per GPU when
``train.devices`` is more than 1 (core/devices.py: the command, and which cards); starting it as a
command keeps this module (and so the UI) free of torch and of the engine package. POSIX: a new session
(``start_new_session``), so the terminal's hangup and Ctrl+C never reach it. Windows: a new process
group detached from the console. stdin is closed and stdout/stderr go to ``RUN_DIR/worker.log``.
The pid goes into ``run.json`` at once, so a reader never sees a run without its pid.

``launch_run`` is the one way a run starts (the wizard, ``train``, the tests), so it also settles the
recipe the same way for all of them before it is stored: ``prepare_recipe`` makes a local model
folder's path absolute (the worker runs in the run folder), refuses what this machine can't run, and
replaces ``auto`` precisions with this machine's, and ``train.devices = "all"`` with the number of GPUs.
The stored recipe.toml then doesn't depend on where the run was started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from tui_finetune.core.devices import pin_gpus, run_gpus, settle_devices, visible_gpu_count, worker_command
from tui_finetune.core.gpu_allocator import allocator_env
from tui_finetune.core.hardware import HardwareReport, detect_hardware, machine_facts
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.recipe_machine import MachineFacts, check_recipe_fits_machine, resolve_precision
from tui_finetune.core.run_folder.info import RunInfo, create_run, read_run_info, read_run_recipe, update_run_info
from tui_finetune.core.run_folder.layout import STOP_FILE, WORKER_LOG
from tui_finetune.core.run_folder.listing import pid_alive


def start_worker_detached(run_dir: Path, env: dict[str, str] | None = None,
                          report: HardwareReport | None = None) -> int:
    """Start the worker on ``run_dir`` in its own session; returns its pid (also written to run.json).

    With ``train.devices`` above 1 the pid is torchrun's, the parent of every rank: it lives as long as
    any of them, and it ends the others when one dies (run.json's ``world_size`` says how many). The child's
    environment pins its cards (``pin_gpus``) and sets PyTorch's allocator (``allocator_env``)."""
    kwargs: dict = {}
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
    else:
        kwargs["start_new_session"] = True
    child_env = dict(os.environ if env is None else env)
    package_root = str(Path(__file__).resolve().parents[3])  # the folder that holds tui_finetune/
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH", "")) if p)
    report = report or detect_hardware()
    processes = settle_devices(read_run_recipe(run_dir).train.devices, visible_gpu_count(report, child_env))
    child_env = allocator_env(pin_gpus(child_env, report, processes))
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stale STOP would end the resumed run at once
    with (run_dir / WORKER_LOG).open("ab") as log:
        proc = subprocess.Popen(worker_command(run_dir, processes), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(run_dir), env=child_env, close_fds=True, **kwargs)
    update_run_info(run_dir, pid=proc.pid, state="running", world_size=processes,
                    gpus=[{"index": gpu.index, "name": gpu.name, "total_mb": gpu.total_bytes / 2**20}
                          for gpu in run_gpus(child_env, report)])
    return proc.pid


def prepare_recipe(recipe: RecipeSpec, facts: MachineFacts | None = None,
                   report: HardwareReport | None = None) -> RecipeSpec:
    """The recipe as a run stores it: absolute local model path, checked against this machine (raises
    ``RecipeError`` with the fix), ``auto`` precisions resolved, ``train.devices`` a number.
    ``facts`` and ``report`` default to this machine's."""
    if facts is None or report is None:
        report = report or detect_hardware()
        facts = facts or machine_facts(report)
    local_model = Path(recipe.model).expanduser()
    if local_model.is_dir():
        recipe = replace(recipe, model=str(local_model.resolve()))
    check_recipe_fits_machine(recipe, facts, None)
    recipe = settle_recipe_devices(recipe, report)
    return resolve_precision(recipe, facts)


def settle_recipe_devices(recipe: RecipeSpec, report: HardwareReport) -> RecipeSpec:
    """``train.devices`` as the number of processes it means here (``"all"`` resolved; too many refused)."""
    devices = settle_devices(recipe.train.devices, visible_gpu_count(report, os.environ))
    return replace(recipe, train=replace(recipe.train, devices=devices))


def launch_run(recipe: RecipeSpec, data_path: str | Path, base: Path | None = None,
               env: dict[str, str] | None = None, facts: MachineFacts | None = None) -> Path:
    """A new run folder for ``recipe`` (settled by ``prepare_recipe``) on ``data_path``, its worker running."""
    run_dir = create_run(prepare_recipe(recipe, facts), data_path, base)
    start_worker_detached(run_dir, env)
    return run_dir


def resume_run(run_dir: Path, env: dict[str, str] | None = None) -> int:
    """Start the worker again on an interrupted run: it resumes from the newest valid checkpoint."""
    return start_worker_detached(run_dir, env)


def request_stop(run_dir: Path) -> RunInfo:
    """Ask a worker to save a checkpoint and exit: a STOP file (works everywhere) plus SIGINT on POSIX.

    Not the signal for a multi-process run: its pid is torchrun's, which would pass the signal on and kill
    every rank 30 s later, saved or not; each rank reads the STOP file and they stop together instead."""
    info = read_run_info(run_dir)
    (run_dir / STOP_FILE).write_text(f"stop requested at {time.time():.0f}\n", encoding="utf-8")
    if info.state == "running" and pid_alive(info.pid):
        info = update_run_info(run_dir, state="stopping")
        if sys.platform != "win32" and info.pid and info.world_size <= 1:
            try:
                os.kill(info.pid, signal.SIGINT)
            except OSError:
                pass
    return info
