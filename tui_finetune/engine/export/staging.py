"""Write to a temporary name, then rename: an interrupted export never leaves a half-written file
where a complete one is expected (the same rule as the checkpoints' completion marker)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """Yield a scratch folder next to ``dest``; on success it replaces ``dest``, on any error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_file(dest: Path) -> Iterator[Path]:
    """Yield a scratch file name next to ``dest``; renamed onto ``dest`` on success, deleted on error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(dest)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
