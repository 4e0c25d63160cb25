"""The layer rules, checked statically: import-linter's contracts and ruff, as configured in pyproject.toml.

CI runs ``pytest -q`` only, so the linters run here as subprocesses and a violation fails this test.
The runtime side (no torch or textual in sys.modules after an import) is test_import_hygiene.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The linter next to this Python (the venv's bin), else one on PATH; skip when neither is installed."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]'")
    return found


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)  # this checkout
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_import_contracts_are_kept():
    out = _run([_tool("lint-imports"), "--no-cache"])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_ruff_finds_nothing():
    out = _run([_tool("ruff"), "check", "--no-cache", "."])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
