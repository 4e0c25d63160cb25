"""Checkpoints that are either complete or absent, and the choice of which one to resume from.

Trainer writes a checkpoint into a staging folder (``checkpoints/.staging/checkpoint-N``). Once it is
written, ``finalize_checkpoint`` fsyncs every file, records each file's sha256 in a marker written
last, and renames the folder to ``checkpoints/step-NNNNNN`` in one step. A power cut therefore leaves
either no ``step-`` folder or one whose marker vouches for every byte. Resume walks the
``step-`` folders newest first and takes the first whose files still match their marker, saying
why it skipped the others.
Plain Python (no torch): the CLI and the UI can check checkpoints too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "COMPLETE.json"
STAGING = ".staging"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class CheckpointCheck:
    """Whether a checkpoint folder can be trusted, and why not."""

    path: Path
    step: int
    ok: bool
    reason: str = ""


@dataclass
class ResumeChoice:
    """The checkpoint to resume from (None: start fresh) and the broken ones passed over."""

    path: Path | None
    skipped: list[CheckpointCheck] = field(default_factory=list)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


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


def finalize_checkpoint(staged: Path, checkpoints_dir: Path, step: int) -> Path:
    """Seal a fully written checkpoint: fsync, hash into the marker (written last), rename into place."""
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MARKER)
    hashes = {}
    for path in files:
        _fsync_path(path)
        hashes[path.relative_to(staged).as_posix()] = _sha256(path)
    marker = {"step": step, "time": time.time(), "files": hashes}
    tmp = staged / f".{MARKER}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, staged / MARKER)
    _fsync_path(staged)
    final = checkpoints_dir / step_dir_name(step)
    if final.exists():  # the same step saved twice (a stop right after a scheduled save)
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_path(checkpoints_dir)
    return final


def check_checkpoint(path: Path) -> CheckpointCheck:
    """Verify the marker exists and every file it lists is present with the same sha256."""
    match = _STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else -1
    marker_path = path / MARKER
    if not marker_path.is_file():
        return CheckpointCheck(path, step, False, "no completion marker (the save was cut short)")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files: dict[str, str] = marker["files"]
    except (ValueError, KeyError, TypeError) as err:
        return CheckpointCheck(path, step, False, f"unreadable marker ({err})")
    if not files:
        return CheckpointCheck(path, step, False, "the marker lists no files")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return CheckpointCheck(path, step, False, f"{name} is missing")
        if _sha256(file) != expected:
            return CheckpointCheck(path, step, False, f"{name} does not match its hash (corrupted)")
    return CheckpointCheck(path, step, True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """``step-`` folders, oldest first (staging and stray folders ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def find_resume_checkpoint(checkpoints_dir: Path) -> ResumeChoice:
    """The newest complete and valid checkpoint, and the broken newer ones skipped on the way."""
    skipped = []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        check = check_checkpoint(path)
        if check.ok:
            return ResumeChoice(path, skipped)
        skipped.append(check)
    return ResumeChoice(None, skipped)


def rotate_checkpoints(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` valid checkpoints; never delete the only good one."""
    paths = list_checkpoints(checkpoints_dir)
    valid = [p for p in paths if (p / MARKER).is_file()]
    removed = []
    for path in valid[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def clear_staging(checkpoints_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash mid-save."""
    shutil.rmtree(checkpoints_dir / STAGING, ignore_errors=True)
