"""Problems found in a dataset, and the error that refuses it.

Every problem reads ``file:line: problem: how to fix``, so a hobbyist can open the file at the
line and mend it. A row-level problem drops that row; a file-level one (no line, or a whole
file unreadable) can refuse the dataset on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

SHOW_PROBLEMS = 20
"""How many problems a message lists before it only counts the rest."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, where it is, and the fix."""

    path: str
    line: int | None
    """1-based line (jsonl, csv, txt, json), or row number for parquet; None for a whole file or folder."""
    message: str
    fix: str
    kind: str
    """Short reason used in the kept/dropped summary, e.g. ``invalid-json``, ``missing-field``."""
    row: bool = True
    """True when the problem drops one row; False for a file- or folder-level problem."""

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}: {self.fix}"


class DataError(ValueError):
    """The dataset is refused. ``str()`` is the full human message, with the file:line lines."""

    def __init__(self, message: str, problems: list[Problem] | None = None, report: object = None) -> None:
        super().__init__(message)
        self.problems = problems or []
        self.report = report


def format_problems(problems: list[Problem], total: int | None = None, limit: int = SHOW_PROBLEMS) -> list[str]:
    """The first ``limit`` problems as lines, then ``... and N more problems`` when there are more."""
    total = len(problems) if total is None else total
    lines = [str(p) for p in problems[:limit]]
    if total > len(lines):
        more = total - len(lines)
        lines.append(f"... and {more} more problem{'s' if more != 1 else ''}")
    return lines
