"""Dataset formats: what each looks like, how to tell them apart, and the column mapping.

Every format is read into the same few *fields*: ``prompt``, ``input``, ``reply``, ``system``
(instruction pairs), ``messages`` (conversations) and ``text`` (plain documents). A format is a
default mapping from those fields to the file's columns; ``--columns prompt=question,reply=answer``
overrides it. Detection looks at the keys of the first rows and says what it saw.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from tui_finetune.data.errors import DataError


@dataclass(frozen=True)
class FormatSpec:
    name: str
    kind: str
    """chat (rendered with a chat template), completion (prompt + completion) or text."""
    columns: dict[str, str]
    """field -> default column name."""
    required: tuple[str, ...]
    description: str


FORMATS: dict[str, FormatSpec] = {
    "alpaca": FormatSpec("alpaca", "chat", {"prompt": "instruction", "input": "input", "reply": "output",
                                            "system": "system"}, ("prompt", "reply"),
                         "Alpaca instruction/input/output"),
    "sharegpt": FormatSpec("sharegpt", "chat", {"messages": "conversations", "system": "system"}, ("messages",),
                           "ShareGPT conversations with from/value turns"),
    "messages": FormatSpec("messages", "chat", {"messages": "messages"}, ("messages",),
                           "OpenAI-style messages with role/content turns"),
    "prompt_completion": FormatSpec("prompt_completion", "completion", {"prompt": "prompt", "reply": "completion"},
                                    ("prompt", "reply"), "prompt/completion pairs"),
    "text": FormatSpec("text", "text", {"text": "text"}, ("text",), "plain text"),
}
FIELDS = ("prompt", "input", "reply", "system", "messages", "text")
FIELD_ALIASES = {"instruction": "prompt", "question": "prompt", "output": "reply", "completion": "reply",
                 "response": "reply", "answer": "reply", "conversations": "messages"}
PROMPT_LIKE = ("instruction", "prompt", "question", "query", "input_text", "request", "user", "human", "q", "source")
REPLY_LIKE = ("output", "completion", "response", "answer", "reply", "target", "assistant", "gpt", "a", "label")
TEXT_LIKE = ("text", "content", "body", "document", "passage", "story", "article")
DETECT_ROWS = 100
"""Rows looked at to detect the format."""


@dataclass(frozen=True)
class FormatDecision:
    """The format in use, the columns it reads, and the evidence for it."""

    spec: FormatSpec
    mapping: dict[str, str]
    """field -> column actually read."""
    evidence: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass
class Example:
    """One usable row, normalized: a conversation, a prompt/completion pair, or a text."""

    sample_id: int
    """Position of the source row among all rows read (stable while the files don't change)."""
    path: str
    line: int
    kind: str
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""


def parse_columns(text: str | None) -> dict[str, str]:
    """``prompt=instruction,reply=output`` -> {"prompt": "instruction", "reply": "output"}."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise DataError(f"--columns {text}: '{part.strip()}' is not FIELD=COLUMN: "
                            "write it like --columns prompt=question,reply=answer")
        key, column = (s.strip() for s in part.split("=", 1))
        key = FIELD_ALIASES.get(key.lower(), key.lower())
        if key not in FIELDS:
            close = get_close_matches(key, FIELDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(f"--columns {text}: unknown field '{key}': use {', '.join(FIELDS)}.{hint}")
        if not column:
            raise DataError(f"--columns {text}: '{key}=' names no column: give the column name after '='")
        mapping[key] = column
    return mapping


def check_format_name(name: str) -> str:
    if name == "auto" or name in FORMATS:
        return name
    close = get_close_matches(name, list(FORMATS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"--format {name}: unknown format: use auto, {', '.join(FORMATS)}.{hint}")


def detect_format(rows: list[dict[str, Any]], file_kind: str, forced: str = "auto",
                  columns: dict[str, str] | None = None, *, where: str = "", text_mode: str = "") -> FormatDecision:
    """Pick the format from the first rows' keys (or from --format / --columns), with the evidence."""
    forced = check_format_name(forced)
    columns = dict(columns or {})
    if file_kind == "text":
        if forced not in ("auto", "text"):
            raise DataError(f"{where}: --format {forced} does not fit plain text files: use --format text, "
                            "or convert the data to .jsonl")
        return FormatDecision(FORMATS["text"], {"text": "text"}, f"{file_kind} files are plain text ({text_mode})")
    keys = Counter(k for row in rows for k in row)
    n = len(rows)
    if forced != "auto":
        spec = FORMATS[forced]
        mapping = {**spec.columns, **columns}
        if spec.name == "messages" and "messages" not in columns and "messages" not in keys and "conversations" in keys:
            mapping["messages"] = "conversations"
        return FormatDecision(spec, mapping, f"forced with --format {forced}" + _mapping_note(columns))
    if columns:
        return _decide_from_mapping(rows, columns)
    for key in ("messages", "conversations"):
        if keys.get(key):
            shape = _turn_shape(rows, key)
            spec = FORMATS["sharegpt" if shape == "from/value" else "messages"]
            return FormatDecision(spec, {**spec.columns, "messages": key},
                                  f'key "{key}" holds lists of {{{shape.replace("/", ", ")}}} turns '
                                  f"in {keys[key]} of the first {n} rows")
    for name, need in (("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion")),
                       ("text", ("text",))):
        if all(keys.get(k) for k in need):
            spec = FORMATS[name]
            seen = [c for c in spec.columns.values() if keys.get(c)]
            return FormatDecision(spec, dict(spec.columns),
                                  f"keys {', '.join(repr(c) for c in seen)} in {keys[need[0]]} of the first {n} rows")
    found = ", ".join(repr(k) for k, _ in keys.most_common(12)) or "none"
    suggestion = suggest_mapping(list(keys))
    fix = (f"map your columns with --columns {suggestion}" if suggestion else
           "rename the columns (instruction/output, prompt/completion, messages, conversations or text) "
           "or map them with --columns prompt=COLUMN,reply=COLUMN")
    raise DataError(f"{where}: no known format in these columns (found {found}): {fix}")


def _mapping_note(columns: dict[str, str]) -> str:
    return (" and --columns " + ",".join(f"{k}={v}" for k, v in columns.items())) if columns else ""


def _decide_from_mapping(rows: list[dict[str, Any]], columns: dict[str, str]) -> FormatDecision:
    note = "mapped with --columns " + ",".join(f"{k}={v}" for k, v in columns.items())
    if "messages" in columns:
        shape = _turn_shape(rows, columns["messages"])
        spec = FORMATS["sharegpt" if shape == "from/value" else "messages"]
        return FormatDecision(spec, {**spec.columns, **columns}, note)
    if "text" in columns and not ({"prompt", "reply"} & set(columns)):
        return FormatDecision(FORMATS["text"], dict(columns), note)
    spec = FORMATS["alpaca"]
    mapping = {k: v for k, v in spec.columns.items() if k not in ("prompt", "reply")}
    return FormatDecision(spec, {**mapping, **columns}, note + " (instruction/reply pairs)")


def _turn_shape(rows: list[dict[str, Any]], key: str) -> str:
    for row in rows:
        turns = row.get(key)
        if isinstance(turns, list):
            for turn in turns:
                if isinstance(turn, dict) and ("from" in turn or "value" in turn):
                    return "from/value"
                if isinstance(turn, dict) and ("role" in turn or "content" in turn):
                    return "role/content"
    return "role/content"


def suggest_mapping(found: list[str]) -> str | None:
    """A ``--columns`` value that maps the found columns, when the names make it guessable."""
    lower = {c.lower(): c for c in found if isinstance(c, str)}

    def pick(names: tuple[str, ...], taken: set[str]) -> str | None:
        for name in names:
            if name in lower and lower[name] not in taken:
                return lower[name]
        return None

    prompt = pick(PROMPT_LIKE, set())
    reply = pick(REPLY_LIKE, {prompt} if prompt else set())
    if prompt and reply:
        return f"prompt={prompt},reply={reply}"
    text = pick(TEXT_LIKE, set())
    if text:
        return f"text={text}"
    if len(found) == 2 and all(isinstance(c, str) for c in found):
        return f"prompt={found[0]},reply={found[1]}"
    return None
