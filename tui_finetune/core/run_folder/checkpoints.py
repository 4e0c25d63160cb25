"""Checkpoints that are either complete or absent, which ones to keep, and room on disk for them.

Trainer writes a checkpoint into a staging folder (``checkpoints/.staging/checkpoint-N``). Once it is
written, ``finalize_checkpoint`` fsyncs every file, writes a marker listing each file's size and
sha256 (the last file written), and renames the folder to ``checkpoints/step-NNNNNN`` in one step.
A kill or a power cut therefore leaves either no ``step-`` folder or one whose marker vouches for
every byte; HF Trainer alone would resume from the highest ``checkpoint-N``, half-written or not.
Which checkpoint a resume takes is resume.py's. Plain Python (no torch): the CLI checks checkpoints too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tui_finetune.core.run_folder.layout import CHECKPOINT_MARKER, RUN_STATE, STAGING, step_dir_name, step_of

RMTREE_TRIES = 4

FaultPoint = Callable[..., None]
"""``fault_point(point, step, arg=None)``: a hook for the fault-injection tests (engine/faults.py), called
between the stages of a save so a test can kill the process at each; real runs pass none."""


def _no_fault(point: str, step: int, arg: int | None = None) -> None:
    """The default ``FaultPoint``: nothing is injected."""


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or no room to write one; the message says what to do."""


@dataclass
class CheckpointCheck:
    """Whether a checkpoint folder can be trusted, and why not."""

    path: Path
    step: int
    ok: bool
    reason: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk; folders can't be opened on Windows, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def finalize_checkpoint(staged: Path, checkpoints_dir: Path, step: int,
                        fault_point: FaultPoint = _no_fault) -> Path:
    """Seal a fully written checkpoint: fsync, size and hash into the marker (written last), rename.

    ``fault_point`` exists for the fault-injection tests: the worker passes engine/faults.py's, which
    dies or raises ENOSPC between the stages when a test asked for it, and does nothing otherwise.
    """
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != CHECKPOINT_MARKER)
    listed = {}
    for count, path in enumerate(files, 1):
        _fsync_path(path)
        listed[path.relative_to(staged).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        fault_point("save-after-file", step, count)
    fault_point("save-before-marker", step)
    fault_point("save", step)  # an injected ENOSPC fails the marker write, as a full disk would
    write_json_atomic(staged / CHECKPOINT_MARKER, {"step": step, "time": time.time(), "files": listed})
    _fsync_path(staged)
    fault_point("save-before-rename", step)
    final = checkpoints_dir / step_dir_name(step)
    if final.exists():  # the same step saved again (a resume that stopped before its next step)
        if check_checkpoint(final).ok:
            remove_tree(staged)
            return final
        remove_tree(final)
    os.replace(staged, final)
    _fsync_path(checkpoints_dir)
    fault_point("save-after-rename", step)
    return final


def check_checkpoint(path: Path) -> CheckpointCheck:
    """Verify the marker exists and every file it lists is present with the same size and sha256."""
    step = step_of(path)
    marker_path = path / CHECKPOINT_MARKER
    if not marker_path.is_file():
        return CheckpointCheck(path, step, False, "no completion marker: the save was cut short")
    try:
        files = json.loads(marker_path.read_text(encoding="utf-8"))["files"]
        expected = {name: (v["size"], v["sha256"]) for name, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return CheckpointCheck(path, step, False, f"unreadable marker: {err}")
    if not expected:
        return CheckpointCheck(path, step, False, "the marker lists no files")
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return CheckpointCheck(path, step, False, f"{name} is missing")
        actual = file.stat().st_size
        if actual != size:
            return CheckpointCheck(path, step, False, f"{name} is {actual} bytes, the marker says {size}")
        if _sha256(file) != digest:
            return CheckpointCheck(path, step, False, f"{name} hash mismatch")
    return CheckpointCheck(path, step, True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """``step-`` folders, oldest first (staging and stray folders ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and step_of(p) >= 0]
    return sorted(found, key=step_of)


def read_run_state(path: Path) -> dict:
    """A checkpoint's ``run_state.json`` ({} for a checkpoint written before it existed)."""
    try:
        return json.loads((path / RUN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def remove_tree(path: Path, warn: Callable[[str], None] | None = None, tries: int = RMTREE_TRIES,
                pause_s: float = 0.25) -> bool:
    """Delete a folder; on Windows a file held open (an antivirus scan, Explorer) raises PermissionError,
    so retry a few times, then leave it, warn, and let the next rotation try again."""
    for attempt in range(tries):
        try:
            shutil.rmtree(path)
            return True
        except FileNotFoundError:
            return True
        except PermissionError as err:
            if attempt == tries - 1:
                if warn:
                    warn(f"could not delete {path} ({err}); it will be retried at the next save")
                return False
            time.sleep(pause_s * (attempt + 1))
    return False


def rotate_checkpoints(checkpoints_dir: Path, keep_last: int, known_good: Path | None = None,
                       warn: Callable[[str], None] | None = None) -> list[Path]:
    """Keep the newest ``keep_last`` sealed checkpoints and the best by eval loss; delete the rest.

    Nothing is deleted unless a kept checkpoint verifies (``known_good`` was just hashed while sealing),
    so the only valid checkpoint is never lost. Unsealed ``step-`` folders older than the newest are
    deleted too.
    """
    paths = list_checkpoints(checkpoints_dir)
    sealed = [p for p in paths if (p / CHECKPOINT_MARKER).is_file()]
    keep = set(sealed[-keep_last:]) if keep_last > 0 else set(sealed)
    scored = [(read_run_state(p).get("eval_loss"), p) for p in sealed]
    scored = [(loss, p) for loss, p in scored if isinstance(loss, (int, float))]
    if scored:
        keep.add(min(scored, key=lambda item: (item[0], -step_of(item[1])))[1])
    if not any(p == known_good or check_checkpoint(p).ok for p in sorted(keep, key=step_of, reverse=True)):
        return []
    newest = max((step_of(p) for p in keep), default=-1)
    doomed = [p for p in paths if p not in keep and ((p / CHECKPOINT_MARKER).is_file() or step_of(p) < newest)]
    return [p for p in doomed if remove_tree(p, warn)]


def clear_staging(checkpoints_dir: Path, keep: Path | None = None, warn: Callable[[str], None] | None = None) -> None:
    """Remove half-written checkpoints left by a crash mid-save (all of them but ``keep``)."""
    staging = checkpoints_dir / STAGING
    if not staging.is_dir():
        return
    for path in staging.iterdir():
        if path != keep:
            if path.is_dir():
                remove_tree(path, warn)
            else:
                path.unlink(missing_ok=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def estimate_checkpoint_bytes(trainable_params: int, optimizer: str) -> int:
    """Adapter weights (fp32) plus the optimizer's two moments: 8 bytes a parameter, 2 for 8-bit ones."""
    moments = 2 if "8bit" in optimizer else 8
    return trainable_params * (4 + moments) + (1 << 20)


def check_free_disk(checkpoints_dir: Path, checkpoint_bytes: int) -> None:
    """Refuse to train when the disk can't hold two checkpoints (the new one is written before the old goes)."""
    needed = 2 * checkpoint_bytes
    free = shutil.disk_usage(checkpoints_dir).free
    if free < needed:
        raise CheckpointError(f"not enough disk space for checkpoints in {checkpoints_dir}: "
                              f"{_mb(needed)} needed (2 x {_mb(checkpoint_bytes)} a checkpoint), {_mb(free)} free. "
                              "Free some space, or move the runs folder (TUI_FINETUNE_HOME) to a bigger disk")


def disk_full_message(err: OSError, checkpoints_dir: Path, checkpoint_bytes: int) -> str | None:
    """The message for ENOSPC during a save (None for any other error)."""
    if err.errno != errno.ENOSPC:
        return None
    try:
        free = _mb(shutil.disk_usage(checkpoints_dir).free)
    except OSError:
        free = "unknown"
    return (f"the disk filled up while saving a checkpoint in {checkpoints_dir}: a checkpoint needs about "
            f"{_mb(checkpoint_bytes)}, and {_mb(2 * checkpoint_bytes)} free keeps the previous one safe while "
            f"the next is written ({free} free now)")


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"
