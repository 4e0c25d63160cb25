"""What an export is asked to make, and what it reports: ExportSpec in, ExportResult out, export.json on disk.

Plain Python (no torch), so the CLI and the TUI can build a spec, show the choices and read past
results without loading the engine. The engine (engine/export/) does the work and writes the result
through :func:`record_export`, which keeps one entry per (target, quant) in the run's export.json.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("adapter", "merged", "gguf", "ollama")
"""adapter: the peft folder; merged: 16-bit safetensors; gguf: one .gguf file; ollama: a GGUF plus a Modelfile."""
QUANTS = ("f16", "q8_0", "q4_k_m")
"""GGUF tensor formats: f16 and q8_0 are written in plain Python; q4_k_m needs llama-quantize on PATH."""
PYTHON_QUANTS = ("f16", "q8_0")
EXPORT_FILE = "export.json"
EXPORTS_DIR = "exports"


class ExportError(RuntimeError):
    """An export that can't be made; the message says why and what to do."""


@dataclass
class ExportSpec:
    """One export request: ``tui-finetune export RUN --to TARGET [--quant Q] [--out DIR]``."""

    target: str
    quant: str = "f16"
    """GGUF and Ollama only: f16 (exact), q8_0 (half the size, near-exact) or q4_k_m (llama-quantize)."""
    out_dir: str = ""
    """Where to write; empty means ``<run>/exports/<target>[-<quant>]``."""
    check: bool = True
    """Reload the export and compare it with the fine-tune before reporting it done."""
    max_new_tokens: int = 48
    """Length limit of the greedy generations the checks compare and of the "does it stop" test."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ExportError(f"--to {self.target}: not a target; choose one of {', '.join(TARGETS)}")
        if self.quant not in QUANTS:
            raise ExportError(f"--quant {self.quant}: not a format; choose one of {', '.join(QUANTS)}")

    @property
    def uses_gguf(self) -> bool:
        return self.target in ("gguf", "ollama")

    def folder(self, run_dir: Path) -> Path:
        """The output folder: ``--out`` or the default inside the run."""
        if self.out_dir:
            return Path(self.out_dir).expanduser()
        suffix = f"-{self.quant}" if self.uses_gguf else ""
        return run_dir / EXPORTS_DIR / f"{self.target}{suffix}"


@dataclass
class CheckResult:
    """One check of an export: its name, whether it passed, and the numbers behind it."""

    name: str
    passed: bool
    detail: str
    skipped: bool = False
    """True when the check could not run here (e.g. transformers can't read this GGUF architecture);
    a skipped check doesn't fail the export, and its detail says why."""


@dataclass
class ExportResult:
    """What an export made and how its checks went; one entry of export.json."""

    target: str
    quant: str
    path: str
    """The folder (adapter, merged, ollama) or the .gguf file."""
    files: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    """Commands that use the export (``ollama create ...``, ``llama-cli -m ...``), to print."""
    created_at: float = field(default_factory=time.time)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed or c.skipped for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportResult:
        checks = [CheckResult(**c) for c in data.get("checks", [])]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "checks"}
        return cls(**known, checks=checks)

    def summary(self) -> str:
        """Lines for a terminal: where it is, each check, and what to run next."""
        verdict = "passed its checks" if self.passed else "FAILED a check"
        lines = [f"{self.target}{'' if self.target in ('adapter', 'merged') else ' ' + self.quant}: "
                 f"{self.path} ({verdict})"]
        for check in self.checks:
            mark = "skip" if check.skipped else ("ok" if check.passed else "FAIL")
            lines.append(f"  [{mark}] {check.name}: {check.detail}")
        lines += [f"  next: {step}" for step in self.next_steps]
        return "\n".join(lines)


def read_exports(run_dir: Path) -> list[ExportResult]:
    """Every export recorded for this run, oldest first; an unreadable file reads as none."""
    try:
        data = json.loads((run_dir / EXPORT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [ExportResult.from_dict(item) for item in data.get("exports", [])]


def record_export(run_dir: Path, result: ExportResult) -> Path:
    """Add or replace the entry for (target, quant, path) in export.json, by atomic replace."""
    kept = [r for r in read_exports(run_dir)
            if (r.target, r.quant, r.path) != (result.target, result.quant, result.path)]
    path = run_dir / EXPORT_FILE
    tmp = run_dir / f".{EXPORT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"exports": [r.to_dict() for r in kept + [result]]}, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path
