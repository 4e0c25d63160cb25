"""Find the data files and read them as raw rows, each with its file and line.

This is the streaming half of the data path: every reader goes line by line (or row group by row
group for Parquet), so validating a 1 GB JSONL file never holds more than one line in memory.
Readers never raise on bad data: they yield a :class:`Problem` for the row or file and go on.
A UTF-8 byte order mark and Windows line ends (CRLF) are accepted silently (bytes to text is
text_lines.py's).

The only whole-file reader is ``.json`` (an array can't be split without a streaming parser);
convert a large one to ``.jsonl`` to stream it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tui_finetune.core.events import first_line
from tui_finetune.data.errors import DataError, Problem
from tui_finetune.data.text_lines import BOM, decode_utf8, looks_binary, read_lines

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "text", ".md": "text"}
SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet, .txt or .md"
MAX_LINE_BYTES = 8 * 1024 * 1024
"""Longest line (or text document) accepted; longer ones are reported and skipped unread."""
SNIFF_BYTES = 8192
"""Bytes read from a file's start to tell text from binary."""
_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class DataSource:
    """The files behind a data path: one file, or every data file in one folder (one kind only)."""

    given: str
    files: tuple[Path, ...]
    kind: str
    """jsonl, json, csv, tsv, parquet or text."""
    is_folder: bool

    def display(self, file: Path) -> str:
        """How a file is named in messages: the path as the user gave it, plus the name in a folder."""
        return os.path.join(self.given, file.name) if self.is_folder else self.given


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    path: str
    line: int
    record: Any


def find_data_files(path: str | os.PathLike[str]) -> DataSource:
    """The data files at ``path``; raises DataError for a missing path, an unknown type or a mixed folder."""
    given = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{given}: no such file or folder: check the path")
    if p.is_file():
        kind = FILE_KINDS.get(p.suffix.lower())
        if kind is None:
            hint = " (export it from the spreadsheet as CSV)" if p.suffix.lower() in (".xlsx", ".xls", ".ods") else ""
            raise DataError(f"{given}: unsupported file type '{p.suffix or p.name}': use {SUPPORTED}{hint}")
        return DataSource(given, (p,), kind, False)
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    by_ext = Counter(f.suffix.lower() for f in files)
    unknown = sorted(e or "(none)" for e in by_ext if e not in FILE_KINDS)
    kinds = {FILE_KINDS[e] for e in by_ext if e in FILE_KINDS}
    if not kinds:
        raise DataError(f"{given}: no data files in this folder: put {SUPPORTED} files in it")
    if unknown or len(kinds) > 1:
        counts = ", ".join(f"{e or '(none)'}: {n} file{'s' if n != 1 else ''}" for e, n in sorted(by_ext.items()))
        raise DataError(f"{given}: mixed file types in one folder ({counts}): "
                        "keep one kind of file per folder, or point at a single file")
    return DataSource(given, tuple(files), kinds.pop(), True)


def iter_rows(source: DataSource, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Row | Problem]:
    """Every raw row of every file, in order, with row- and file-level problems in between."""
    for file in source.files:
        name = source.display(file)
        if file.stat().st_size == 0:
            yield Problem(name, None, "file is empty", "add rows or remove the file", "empty-file", row=False)
            continue
        with file.open("rb") as f:
            head = f.read(SNIFF_BYTES)
        if source.kind != "parquet" and looks_binary(head):
            yield Problem(name, None, "binary, not text (it holds bytes no text file has, such as NUL)",
                          f"point at the text export of your data ({SUPPORTED})", "binary", row=False)
            continue
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            yield Problem(name, 1, f"file is UTF-16 (it starts with the byte order mark 0x{head[0]:02X} 0x{head[1]:02X})",
                          "re-save it as UTF-8 (in Notepad: Save as, Encoding: UTF-8)", "not-utf8", row=False)
            continue
        if source.kind == "jsonl":
            items = _iter_jsonl(file, name, max_line_bytes)
        elif source.kind == "json":
            items = _iter_json(file, name)
        elif source.kind in ("csv", "tsv"):
            items = _iter_csv(file, name, "\t" if source.kind == "tsv" else ",", max_line_bytes)
        elif source.kind == "parquet":
            items = _iter_parquet(file, name)
        else:
            items = _iter_text(file, name, max_line_bytes, whole_file=source.is_folder)
        anything = False
        for item in items:
            anything = True
            yield item
        if not anything:
            yield Problem(name, None, "file has no rows", "add rows or remove the file", "empty-file", row=False)


# ---------------------------------------------------------------- readers

def _iter_jsonl(file: Path, name: str, max_bytes: int) -> Iterator[Row | Problem]:
    for number, text in read_lines(file, name, max_bytes):
        if isinstance(text, Problem):
            yield text
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield Problem(name, number, f"invalid JSON ({err.msg}) at column {err.colno}",
                          "fix the line or delete it", "invalid-json")
            continue
        except (RecursionError, ValueError) as err:  # nesting, or an integer over Python's digit limit
            what = "nested too deeply" if isinstance(err, RecursionError) else "a number with too many digits"
            yield Problem(name, number, f"invalid JSON ({what})", "fix the line or delete it", "invalid-json")
            continue
        if isinstance(value, dict):
            yield Row(name, number, value)
        elif isinstance(value, list):
            yield Problem(name, number, "a JSON array where a row object was expected",
                          "write one {...} object per line, or rename the file to .json", "not-an-object")
        else:
            yield Problem(name, number, f"expected a JSON object per line, found {_json_type(value)}",
                          "write one {...} object per line", "not-an-object")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _iter_json(file: Path, name: str) -> Iterator[Row | Problem]:
    raw = file.read_bytes()
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    text = decode_utf8(raw, name, 1)
    if isinstance(text, Problem):  # name the real line and column of the first bad byte
        bad = _first_bad(raw)
        start = raw.rfind(b"\n", 0, bad) + 1
        end = raw.find(b"\n", bad)
        problem = decode_utf8(raw[start:end if end >= 0 else len(raw)].rstrip(b"\r"), name, raw.count(b"\n", 0, bad) + 1)
        assert isinstance(problem, Problem)
        yield Problem(problem.path, problem.line, problem.message, problem.fix, problem.kind, row=False)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        yield Problem(name, err.lineno, f"invalid JSON ({err.msg}) at column {err.colno}",
                      "fix the file (a JSON checker such as 'python -m json.tool FILE' shows the spot)",
                      "invalid-json", row=False)
        return
    except (RecursionError, ValueError) as err:
        what = "nested too deeply" if isinstance(err, RecursionError) else "a number with too many digits"
        yield Problem(name, 1, f"invalid JSON ({what})", "fix the file", "invalid-json", row=False)
        return
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        start = _find_data_array(text)
    elif isinstance(value, list):
        start = _WS.match(text, 0).end()
    else:
        found = (f"an object with keys {', '.join(map(repr, list(value)[:8]))}" if isinstance(value, dict)
                 else _json_type(value))
        yield Problem(name, 1, f"expected a JSON array of rows or {{\"data\": [...]}}, found {found}",
                      "put the rows in a top-level array, or under a \"data\" key", "bad-structure", row=False)
        return
    yield from _scan_array(text, start, name)


def _first_bad(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
        return len(raw)
    except UnicodeDecodeError as err:
        return err.start


def _find_data_array(text: str) -> int:
    """Offset of the ``[`` of the top-level ``"data"`` array (the text is known-good JSON; like
    ``json.loads``, the last of repeated keys wins)."""
    decoder = json.JSONDecoder()
    found = -1
    i = _WS.match(text, 0).end() + 1  # past '{'
    while True:
        i = _WS.match(text, i).end()
        if text[i] == "}":
            return found
        key, i = decoder.raw_decode(text, i)
        i = _WS.match(text, i).end() + 1  # past ':'
        i = _WS.match(text, i).end()
        if key == "data":
            found = i
        _, i = decoder.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i += 1


def _scan_array(text: str, start: int, name: str) -> Iterator[Row | Problem]:
    """Each element of the array at ``start``, with the line it starts on."""
    decoder = json.JSONDecoder()
    i, line, counted = start + 1, 1, 0
    while True:
        i = _WS.match(text, i).end()
        if text[i] == "]":
            return
        line += text.count("\n", counted, i)
        counted = i
        value, i = decoder.raw_decode(text, i)
        if isinstance(value, dict):
            yield Row(name, line, value)
        else:
            yield Problem(name, line, f"expected an object for each row, found {_json_type(value)}",
                          "make every element of the array a {...} object", "not-an-object")
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i += 1


def _iter_csv(file: Path, name: str, delimiter: str, max_bytes: int) -> Iterator[Row | Problem]:
    pending: list[Problem] = []
    state: dict[str, int | None] = {"first": None}

    def lines() -> Iterator[str]:
        for number, text in read_lines(file, name, max_bytes):
            if isinstance(text, Problem):
                pending.append(text)
                continue
            if state["first"] is None:
                state["first"] = number
            yield text + "\n"

    csv.field_size_limit(max(csv.field_size_limit(), max_bytes))
    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        try:
            fields = next(reader)
            error = None
        except StopIteration:
            break
        except csv.Error as err:
            fields, error = None, str(err)
        yield from pending
        pending.clear()
        line, state["first"] = state["first"] or 0, None
        if error is not None:
            yield Problem(name, line, f"unreadable {'TSV' if delimiter == chr(9) else 'CSV'} row ({error})",
                          "fix the quoting on this row", "bad-row")
            continue
        if not fields or all(not f.strip() for f in fields):
            continue
        if header is None:
            header = [f.strip() for f in fields]
            continue
        if len(fields) != len(header):
            sep = "tabs" if delimiter == "\t" else "commas"
            yield Problem(name, line, f"row has {len(fields)} fields but the header has {len(header)}",
                          f"quote fields that contain {sep} (\"...\") or fix the row", "bad-row")
            continue
        yield Row(name, line, dict(zip(header, fields)))
    yield from pending


def _iter_parquet(file: Path, name: str) -> Iterator[Row | Problem]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        batches = parquet.iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield Row(name, number, record)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError and others for a damaged file
        yield Problem(name, None, f"not a readable Parquet file ({type(err).__name__}: {first_line(err, 120)})",
                      "re-export it, or convert it to .jsonl", "unreadable-file", row=False)


def _iter_text(file: Path, name: str, max_bytes: int, whole_file: bool) -> Iterator[Row | Problem]:
    """Plain text: the whole file as one document (in a folder), or one document per blank-line block."""
    block: list[str] = []
    first = 0
    for number, text in read_lines(file, name, max_bytes):
        if isinstance(text, Problem):
            yield text
            continue
        if not whole_file and not text.strip():
            if block:
                yield Row(name, first, {"text": "\n".join(block)})
                block = []
            continue
        if not block:
            if not text.strip():
                continue
            first = number
        block.append(text)
    while whole_file and block and not block[-1].strip():
        block.pop()
    if block:
        yield Row(name, first, {"text": "\n".join(block)})
