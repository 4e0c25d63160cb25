"""Bytes to text for the data readers: binary files told apart, UTF-8 decoded with the likely encoding
named when it isn't, and lines read one at a time with a cap, so an over-long line is reported and
skipped without being held in memory. A UTF-8 byte order mark and Windows line ends are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tui_finetune.data.errors import Problem

BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark some Windows editors write at a file's start; it is skipped."""


def looks_binary(head: bytes) -> bool:
    """True for the start of a file that is not text in any encoding: NUL bytes (other than UTF-16's
    every-other-byte pattern) or many control characters. Such a file is refused as a whole, rather
    than with a guessed encoding for every line."""
    if not head:
        return False
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return False
    if b"\x00" in head:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        utf16 = min(even, odd) == 0 and max(even, odd) > len(head) // 4
        return not utf16
    control = sum(b < 32 and b not in b"\t\n\r\f\b\x1b" for b in head)
    return control > len(head) // 10


def guess_encoding(raw: bytes) -> tuple[str, str]:
    """(description, iconv name) of the likely encoding of bytes that are not UTF-8."""
    if b"\x00" in raw:
        return "UTF-16", "UTF-16"
    try:
        raw.decode("cp1252")
        return "Windows-1252 (cp1252)", "CP1252"
    except UnicodeDecodeError:
        return "Latin-1 (ISO-8859-1)", "LATIN1"


def decode_utf8(raw: bytes, name: str, line: int) -> str | Problem:
    """The text of ``raw``, or a Problem at ``name:line`` naming the bad byte and how to re-save the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start]
        column = len(raw[:err.start].decode("utf-8", "replace")) + 1
        described, iconv = guess_encoding(raw)
        return Problem(name, line, f"not UTF-8: byte 0x{bad:02X} at column {column}",
                       f"the file looks like {described}; re-save it as UTF-8 "
                       f"(e.g. iconv -f {iconv} -t UTF-8 in.txt > out.txt)", "not-utf8")


def read_lines(file: Path, name: str, max_bytes: int) -> Iterator[tuple[int, str | Problem]]:
    """(line number, text without its line end) for each physical line; problems for bad ones."""
    with file.open("rb") as f:
        number = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_bytes:
                size = len(raw)
                while not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                    if not raw:
                        break
                    size += len(raw)
                yield number, Problem(name, number, f"line is {_size_words(size)}, over the {_size_words(max_bytes)} limit",
                                      "split the row or remove it", "line-too-long")
                continue
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            text = decode_utf8(raw.rstrip(b"\r\n"), name, number)
            yield number, text


def _size_words(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
