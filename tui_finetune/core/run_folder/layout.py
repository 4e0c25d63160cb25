"""The names inside a run folder, in one place.

Layout of ``runs_dir()/<run-id>/``::

    recipe.toml      the fully resolved recipe: everything needed to start again
    run.json         RunInfo: state, pid, versions, the data file's hash, times
    events.jsonl     append-only events (core/events.py)
    worker.log       the worker's own stdout and stderr
    checkpoints/     step-NNNNNN/ folders, each complete only once its marker exists;
                     .staging/ holds a checkpoint while it is written
    adapter/         the final LoRA adapter (safetensors + adapter config + tokenizer), on completion
    STOP             present while a stop has been requested
"""

from __future__ import annotations

import re
from pathlib import Path

RECIPE_FILE = "recipe.toml"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
STOP_FILE = "STOP"
WORKER_LOG = "worker.log"
"""The worker's own stdout/stderr: library warnings and, if all else fails, a traceback."""
CHECKPOINT_MARKER = "COMPLETE.json"
"""The file that seals a checkpoint: written last, it lists every file's size and sha256."""
STAGING = ".staging"
"""Where a checkpoint is written before it is sealed and renamed into place."""
RUN_STATE = "run_state.json"
"""Our own file in each checkpoint: the recipe, data hash and effective batch it was trained with."""
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: Path) -> int:
    """The step of a ``step-NNNNNN`` folder; -1 for any other name."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1
