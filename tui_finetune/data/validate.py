"""Validate a dataset in one streaming pass, before any model or GPU work.

``validate_dataset`` reads every row once, keeps only counters and the first problems, and
returns a :class:`ValidationReport`: the format and its evidence, kept/dropped counts and why,
and whether the data is refused (no usable rows, an unreadable file, or more of the rows dropped
than the recipe's ``data.max_drop_fraction``, 5% unless changed). ``iter_examples`` is the same pass yielding the normalized
rows, for rendering. Nothing here prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.errors import SHOW_PROBLEMS, DataError, Problem, format_problems
from tui_finetune.data.formats import DETECT_ROWS, Example, FormatDecision, detect_format, parse_columns
from tui_finetune.data.loading import MAX_LINE_BYTES, DataSource, Row, _json_type, find_data_files, iter_rows

MAX_DROP_FRACTION = 0.05
"""The default of ``DataSpec.max_drop_fraction``, for callers that pass no spec."""
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant"}


@dataclass
class ValidationReport:
    """What validation found. The TUI's dataset screen and ``data check`` both show it."""

    source: str
    files: list[str]
    file_kind: str
    format: str = ""
    format_description: str = ""
    evidence: str = ""
    mapping: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    kept: int = 0
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    """The first problems found (``SHOW_PROBLEMS`` of them); ``problem_count`` counts them all."""
    problem_count: int = 0
    columns_seen: list[str] = field(default_factory=list)
    """Every column name met in the rows, in order of first appearance (at most 100)."""
    refused: bool = False
    refusal: str = ""

    @property
    def drop_fraction(self) -> float:
        return self.dropped / self.rows if self.rows else 0.0

    def summary(self) -> str:
        """``kept 190 of 200 rows; dropped 10 (invalid-json: 6, empty-reply: 4)``."""
        why = ", ".join(f"{k}: {n}" for k, n in sorted(self.drop_reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        dropped = f"; dropped {self.dropped} ({why})" if self.dropped else "; dropped none"
        return f"{self.source}: kept {self.kept} of {self.rows} rows{dropped}"

    def message(self) -> str:
        """The full human message: problems (the first 20, then a count), the summary, the refusal."""
        lines = format_problems(self.problems, self.problem_count)
        lines.append(self.summary())
        if self.refused:
            lines.append(f"refused: {self.refusal}")
        return "\n".join(lines)


class _Scan:
    """Counters and the first problems of one pass; turns raw rows into Examples."""

    def __init__(self, report: ValidationReport, decision: FormatDecision | None) -> None:
        self.report = report
        self.decision = decision
        self.reasons: Counter[str] = Counter()
        self.text_seen: dict[str, int] = {}
        """column -> first line where it held text, to name the line when a later row changes type."""
        self.file_problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if problem.row:
            self.report.dropped += 1
            self.report.rows += 1
            self.reasons[problem.kind] += 1
        else:
            self.file_problems.append(problem)
        self.report.problem_count += 1
        if len(self.report.problems) < SHOW_PROBLEMS:
            self.report.problems.append(problem)

    def run(self, items: Iterator[Row | Problem]) -> Iterator[Example]:
        for item in items:
            if isinstance(item, Problem):
                self.add(item)
                continue
            sample_id = self.report.rows
            if len(self.report.columns_seen) < 100:
                seen = self.report.columns_seen
                seen.extend(k for k in item.record if isinstance(k, str) and k not in seen)
            example = self.normalize(item, sample_id) if self.decision else None
            if isinstance(example, Example):
                self.report.rows += 1
                self.report.kept += 1
                yield example
            elif isinstance(example, Problem):
                self.add(example)
        self.report.drop_reasons = dict(self.reasons)

    # ------------------------------------------------------------ one row

    def normalize(self, row: Row, sample_id: int) -> Example | Problem:
        assert self.decision is not None
        kind = self.decision.kind
        try:
            if kind == "text":
                text = self.field(row, "text", required=True)
                return Example(sample_id, row.path, row.line, "text", text=text)
            if kind == "completion":
                prompt = self.field(row, "prompt", required=True)
                reply = self.field(row, "reply", required=True, reply=True)
                return Example(sample_id, row.path, row.line, "completion", prompt=prompt, completion=reply)
            system = self.field(row, "system", required=False)
            if "messages" in self.decision.mapping and self.decision.name in ("messages", "sharegpt"):
                messages = self.turns(row)
            else:
                prompt = self.field(row, "prompt", required=True)
                extra = self.field(row, "input", required=False)
                reply = self.field(row, "reply", required=True, reply=True)
                messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
                            {"role": "assistant", "content": reply}]
            if system.strip() and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system})
            return Example(sample_id, row.path, row.line, "chat", messages=messages)
        except _RowProblem as bad:
            return Problem(row.path, row.line, bad.message, bad.fix, bad.kind)

    def field(self, row: Row, name: str, *, required: bool, reply: bool = False) -> str:
        assert self.decision is not None
        column = self.decision.mapping.get(name, name)
        record = row.record
        if record.get(column) is None or (not required and record.get(column) == ""):
            if not required:
                return ""
            found = ", ".join(repr(k) for k in list(record)[:12]) or "none"
            state = "is null" if column in record else "is missing"
            raise _RowProblem(f"field '{column}' {state} (found {found})",
                              f"add it, or map another column with --columns {name}=COLUMN", "missing-field")
        value = record[column]
        if not isinstance(value, str):
            first = self.text_seen.get(column)
            if first is not None:
                raise _RowProblem(f"field '{column}' is {_json_type(value)} here but text on line {first}",
                                  f"make '{column}' a string in every row (put it in quotes)", "type-changed")
            raise _RowProblem(f"field '{column}' is {_json_type(value)}, expected text",
                              f"make '{column}' a string (put it in quotes)", "wrong-type")
        self.text_seen.setdefault(column, row.line)
        _check_encodable(value, f"field '{column}'")
        if (required or reply) and not value.strip():
            kind = "empty-reply" if reply else "empty-field"
            raise _RowProblem(f"field '{column}' is empty", "write it, or remove the row", kind)
        return value

    def turns(self, row: Row) -> list[dict[str, str]]:
        assert self.decision is not None
        column = self.decision.mapping["messages"]
        value = row.record.get(column)
        if value is None:
            found = ", ".join(repr(k) for k in list(row.record)[:12]) or "none"
            raise _RowProblem(f"field '{column}' is missing (found {found})",
                              "add it, or map another column with --columns messages=COLUMN", "missing-field")
        if not isinstance(value, list):
            raise _RowProblem(f"field '{column}' is {_json_type(value)}, expected a list of turns",
                              "write the conversation as a list: [{\"role\": \"user\", \"content\": \"...\"}, ...]",
                              "wrong-type")
        if not value:
            raise _RowProblem(f"field '{column}' is an empty list", "add the turns, or remove the row", "empty-field")
        messages = [self.turn(turn, i + 1) for i, turn in enumerate(value)]
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowProblem("no assistant turn", "add the reply the model should learn, or remove the row",
                              "no-assistant")
        if messages[-1]["role"] != "assistant":
            raise _RowProblem(f"the conversation ends with a {messages[-1]['role']} turn",
                              "add the assistant's reply, or remove the last turn", "no-final-reply")
        return messages

    def turn(self, turn: Any, number: int) -> dict[str, str]:
        if not isinstance(turn, dict):
            raise _RowProblem(f"turn {number} is {_json_type(turn)}, expected an object with role and content",
                              "write each turn as {\"role\": ..., \"content\": ...}", "bad-turn")
        sharegpt = "from" in turn or "value" in turn
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise _RowProblem(f"turn {number} has no '{role_key}'",
                              f"give every turn a '{role_key}' (system, user or assistant)", "bad-turn")
        if role.lower() not in ROLES:
            raise _RowProblem(f"turn {number} has an unknown role {role!r}",
                              "use system, user or assistant (ShareGPT: system, human, gpt)", "unknown-role")
        role = ROLES[role.lower()]
        content = turn.get(content_key)
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                              and isinstance(p.get("text"), str))
        if content is None:
            raise _RowProblem(f"turn {number} ({role}) has no '{content_key}'",
                              f"give every turn a '{content_key}'", "bad-turn")
        if not isinstance(content, str):
            raise _RowProblem(f"turn {number} ({role}) content is {_json_type(content)}, expected text",
                              "make the content a string (put it in quotes)", "wrong-type")
        _check_encodable(content, f"turn {number}")
        if role == "assistant" and not content.strip():
            raise _RowProblem(f"turn {number} (assistant) is empty", "write the reply, or remove the row",
                              "empty-reply")
        return {"role": role, "content": content}


class _RowProblem(Exception):
    def __init__(self, message: str, fix: str, kind: str) -> None:
        super().__init__(message)
        self.message, self.fix, self.kind = message, fix, kind


def _check_encodable(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        raise _RowProblem(f"{what} has an unpaired surrogate escape (\\u{code:04x})",
                          "fix the escape, or remove the row", "bad-text") from None


# ---------------------------------------------------------------- the pass

def open_source(data_path: str | Path, data_format: str = "auto", columns: dict[str, str] | None = None,
                *, max_line_bytes: int = MAX_LINE_BYTES) -> tuple[DataSource, FormatDecision | None]:
    """Find the files and decide the format from the first rows (None when there are no rows at all)."""
    source = find_data_files(data_path)
    head = list(islice((i for i in iter_rows(source, max_line_bytes) if isinstance(i, Row)), DETECT_ROWS))
    if not head and source.kind != "text":
        return source, None
    text_mode = "one document per file" if source.is_folder else "one document per blank-line-separated block"
    where = f"{head[0].path}:{head[0].line}" if head else source.given
    decision = detect_format([r.record for r in head], source.kind, data_format, columns, where=where,
                             text_mode=text_mode)
    return source, decision


def new_report(source: DataSource, decision: FormatDecision | None) -> ValidationReport:
    report = ValidationReport(source.given, [source.display(f) for f in source.files], source.kind)
    if decision is not None:
        report.format, report.format_description = decision.name, decision.spec.description
        report.evidence, report.mapping = decision.evidence, dict(decision.mapping)
    return report


def iter_examples(source: DataSource, decision: FormatDecision | None, report: ValidationReport | None = None,
                  *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Example]:
    """The usable rows, normalized, in file order; problems are counted into ``report``."""
    report = report if report is not None else new_report(source, decision)
    scan = _Scan(report, decision)
    yield from scan.run(iter_rows(source, max_line_bytes))
    _decide(report, scan.file_problems, limit=1.0)


def validate_dataset(data_path: str | Path, data_format: str = "auto", columns: dict[str, str] | None = None,
                     *, allow_drop: bool = False, max_drop_fraction: float = MAX_DROP_FRACTION,
                     max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    """Stream every row once and report; never raises for bad rows (DataError only for a bad path,
    an unknown format name or columns no format fits). More than ``max_drop_fraction`` of the rows
    dropped refuses the data, unless ``allow_drop``."""
    source, decision = open_source(data_path, data_format, columns, max_line_bytes=max_line_bytes)
    report = new_report(source, decision)
    scan = _Scan(report, decision)
    for _ in scan.run(iter_rows(source, max_line_bytes)):
        pass
    _decide(report, scan.file_problems, drop_limit(allow_drop, max_drop_fraction))
    return report


def refuse_unusable_data(data_path: str | Path, spec: DataSpec) -> ValidationReport:
    """Validate with the recipe's format, columns and drop limit; raise DataError (file:line lines and the
    fix) when the data is refused. Needs no tokenizer, so ``train`` runs it before it creates anything."""
    report = validate_dataset(data_path, spec.format, parse_columns(spec.columns),
                              max_drop_fraction=spec.max_drop_fraction)
    raise_if_refused(report)
    return report


def drop_limit(allow_drop: bool, max_drop_fraction: float = MAX_DROP_FRACTION) -> float:
    """The fraction of dropped rows that is still accepted: everything with ``allow_drop``."""
    return 1.0 if allow_drop else max_drop_fraction


def drop_refusal(dropped: int, rows: int, limit: float) -> str:
    """Why the data is refused for the rows it loses, or '' when the loss is within ``limit``."""
    if not rows or dropped / rows <= limit:
        return ""
    return (f"{dropped / rows:.1%} of the rows would be dropped (the limit is {limit:.0%}): fix the lines above, "
            "or pass --allow-drop to train on the rest")


def _decide(report: ValidationReport, file_problems: list[Problem], limit: float) -> None:
    fatal = [p for p in file_problems if p.kind != "empty-file"]
    if fatal:
        report.refused, report.refusal = True, "a file could not be read: fix the problem above"
    elif report.kept == 0:
        report.refused = True
        report.refusal = "no usable rows: fix the problems above" if report.problem_count else \
            "no usable rows: the data has no rows"
    elif drop_refusal(report.dropped, report.rows, limit):
        report.refused, report.refusal = True, drop_refusal(report.dropped, report.rows, limit)
    else:
        report.refused, report.refusal = False, ""


def raise_if_refused(report: ValidationReport) -> None:
    if report.refused:
        raise DataError(report.message(), report.problems, report)
