"""The dataset check as one JSON object, for the wizard: ``python -m tui_finetune.data.check_json FILE
--spec '{"seq_len": 1024, ...}' [--model M]``.

The wizard's dataset screen runs this in a subprocess: tokenizing can take seconds, and the UI must
never import tokenizers or transformers itself. It is a thin serializer: the verdict, the problems,
the token lengths, the first example and the EOS check are ``check.check_dataset``'s, the same
check ``tui-finetune data check`` prints, called with the recipe's ``DataSpec``. So a file the wizard
accepts is a file the command line accepts. Exit status: 0 when the data can train, 1 when it is
refused, 2 when it can't be read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, fields
from typing import Any

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.check import DataCheckResult, check_dataset
from tui_finetune.data.errors import DataError, format_problems


WIZARD_WORDS = (
    (re.compile(r"pass --allow-drop"), "switch on 'Allow dropping rows'"),
    (re.compile(r"(?:with )?--columns (\S+?)([.,;:)]?(?:\s|$))"), r"with \1 in the Columns field\2"),
    (re.compile(r"--columns"), "the Columns field"),
    (re.compile(r"--format (\w+)"), r"data.format = \1 in the recipe"),
    (re.compile(r"; pass --model for real token counts"), ""),
)
"""The data layer's advice names the command line's options (which ``train`` and ``data check`` take);
the wizard has fields instead, and advice may only name what the place showing it accepts."""
WORDED_KEYS = ("error", "refusal", "summary", "evidence", "tokenizer")


def wizard_wording(text: str) -> str:
    """Advice in the wizard's terms: its Columns field and its 'Allow dropping rows' switch."""
    for pattern, replacement in WIZARD_WORDS:
        text = pattern.sub(replacement, text)
    return text


def check(path: str, spec: DataSpec, model: str | None) -> dict[str, Any]:
    """The whole check as a JSON-ready dict (an ``error`` key when the path or format is unusable),
    its advice worded for the wizard."""
    from tui_finetune.data.tokenizer import tokenizer_for_check

    out: dict[str, Any] = {"path": path, "seq_len": spec.seq_len, "spec": asdict(spec), "model": model or ""}
    loaded, note = tokenizer_for_check(model)
    try:
        result = check_dataset(path, loaded.tokenizer, loaded.name, spec)
    except DataError as err:
        out = {**out, "error": str(err), "refused": True, "problems": [str(p) for p in err.problems]}
    else:
        out = {**out, **result_json(result), "tokenizer": loaded.name + (f": {note}" if note else ""),
               "tokenizer_stand_in": loaded.is_fallback}
    for key in WORDED_KEYS:
        if isinstance(out.get(key), str):
            out[key] = wizard_wording(out[key])
    out["problems"] = [wizard_wording(p) for p in out.get("problems", [])]
    if "eos" in out:
        out["eos"]["message"] = wizard_wording(out["eos"]["message"])
    return out


def result_json(result: DataCheckResult) -> dict[str, Any]:
    """What the dataset screen shows, from the one check's result."""
    report = result.report
    problems = format_problems(report.problems, report.problem_count)
    if result.render_problems:
        problems += format_problems(result.render_problems, sum(result.render_dropped.values()))
    out: dict[str, Any] = {
        "format": report.format, "format_description": report.format_description, "evidence": report.evidence,
        "rows": report.rows, "kept": report.kept, "dropped": report.dropped + sum(result.render_dropped.values()),
        "summary": report.summary(), "problems": problems, "problem_count": report.problem_count,
        "refused": not result.usable, "refusal": result.refusal}
    if result.template is not None:
        out["template"] = f"{result.template.source}; {result.template.masking}"
    if result.lengths is not None:
        n = result.lengths
        out["lengths"] = {"count": n.count, "min": n.min, "median": n.median, "mean": n.mean, "p95": n.p95, "max": n.max,
                          "over": n.over, "sampled": n.sampled, "histogram": [list(b) for b in n.bins]}
    if result.example is not None:
        e = result.example
        out["example"] = {"where": e.where, "tokens": e.tokens, "trained_tokens": e.trained_tokens,
                          "segments": [{"text": text, "trained": trained} for text, trained in e.segments]}
    if result.eos is not None:
        out["eos"] = {"ok": result.eos.ok, "message": result.eos.message}
    return out


def spec_from_json(text: str | None) -> DataSpec:
    """A ``DataSpec`` from the wizard's JSON; keys this version doesn't know are ignored."""
    known = {f.name for f in fields(DataSpec)}
    return DataSpec(**{k: v for k, v in json.loads(text or "{}").items() if k in known})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui_finetune.data.check_json", description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--spec", help="the recipe's [data] table as JSON (DataSpec fields)")
    parser.add_argument("--seq", type=int, help="override the spec's seq_len")
    parser.add_argument("--model")
    args = parser.parse_args(argv)
    try:
        spec = spec_from_json(args.spec)
        if args.seq:
            spec.seq_len = args.seq
        result = check(args.file, spec, args.model)
    except Exception as err:  # noqa: BLE001 - the UI must get JSON, never a traceback
        result = {"path": args.file, "error": f"{type(err).__name__}: {err}", "refused": True, "problems": []}
    print(json.dumps(result, ensure_ascii=False))
    if "error" in result:
        return 2
    return 1 if result.get("refused") else 0


if __name__ == "__main__":
    sys.exit(main())
