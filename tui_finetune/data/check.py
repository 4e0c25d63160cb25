"""The dataset doctor's findings, as dataclasses: no printing here.

``check_dataset`` validates the data, renders the rows with the template a run would use, and
returns a :class:`DataCheckResult`: the validation report, a token-length histogram against the
sequence-length cutoff, the first example split into trained and masked segments, and an EOS
check. ``tui-finetune data check`` prints it (cli/data.py); the wizard shows it through check_json.py.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.errors import SHOW_PROBLEMS, Problem
from tui_finetune.data.prepare import RenderStats, iter_rendered
from tui_finetune.data.render import IGNORE_INDEX, TemplateChoice, resolve_template, token_segments
from tui_finetune.data.formats import parse_columns
from tui_finetune.data.validate import (ValidationReport, drop_limit, drop_refusal, iter_examples, new_report,
                                        open_source, validate_dataset)

MAX_RENDERED = 20_000
"""Rows rendered for the histogram; a bigger file is sampled from its start, and the result says so."""
BINS = 10


@dataclass
class LengthStats:
    """Token lengths of the rendered rows (before truncation) against the cutoff."""

    count: int
    min: int
    median: int
    p95: int
    max: int
    cutoff: int
    over: int
    """Rows longer than the cutoff: they will be truncated."""
    bins: list[tuple[int, int, int]]
    """(low, high, rows) with low <= length <= high, from the shortest row to the longest."""
    sampled: bool
    """True when only the first MAX_RENDERED rows were measured."""
    mean: float = 0.0


@dataclass
class ExamplePreview:
    where: str
    segments: list[tuple[str, bool]]
    """(text, trained) runs in order: trained text carries the loss, the rest is masked (-100)."""
    tokens: int
    trained_tokens: int


@dataclass
class EosCheck:
    ok: bool
    message: str


@dataclass
class DataCheckResult:
    report: ValidationReport
    tokenizer_name: str
    template: TemplateChoice | None = None
    eval_report: ValidationReport | None = None
    lengths: LengthStats | None = None
    example: ExamplePreview | None = None
    eos: EosCheck | None = None
    render_problems: list[Problem] = field(default_factory=list)
    render_dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    usable: bool = False
    refusal: str = ""


def check_dataset(data_path: str | Path, tokenizer: Any, tokenizer_name: str, spec: DataSpec, *,
                  columns: dict[str, str] | None = None, validation_path: str | Path | None = None,
                  allow_drop: bool = False, max_rendered: int = MAX_RENDERED) -> DataCheckResult:
    """Everything ``data check`` shows. Raises DataError only for a bad path, format name or columns.

    The column mapping and the drop limit are the spec's (``data.columns``, ``data.max_drop_fraction``),
    as a run uses them; ``columns`` replaces the spec's mapping, ``allow_drop`` lifts its limit."""
    columns = parse_columns(spec.columns) if columns is None else columns
    limit = drop_limit(allow_drop, spec.max_drop_fraction)
    report = validate_dataset(data_path, spec.format, columns, max_drop_fraction=limit)
    result = DataCheckResult(report, tokenizer_name)
    if validation_path:
        result.eval_report = validate_dataset(validation_path, spec.format, columns, max_drop_fraction=limit)
    try:
        result.template = resolve_template(tokenizer, spec.template)
    except ValueError as err:
        result.refusal = str(err)
        return result
    if report.kept:
        _render(result, data_path, tokenizer, spec, columns, max_rendered)
    result.refusal = _refusal(result, limit)
    result.usable = not result.refusal
    return result


def _render(result: DataCheckResult, data_path: str | Path, tokenizer: Any, spec: DataSpec,
            columns: dict[str, str] | None, max_rendered: int) -> None:
    assert result.template is not None
    source, decision = open_source(data_path, spec.format, columns)
    stats = RenderStats()
    measure = replace(spec, seq_len=1 << 30)  # measure whole rows; truncation is counted below
    lengths: list[int] = []
    for example, rendered in islice(iter_rendered(iter_examples(source, decision, new_report(source, decision)),
                                                  tokenizer, result.template, measure, stats), max_rendered):
        first_trained = next(i for i, label in enumerate(rendered.labels) if label != IGNORE_INDEX)
        if first_trained >= spec.seq_len:  # what prepare_datasets will drop: nothing left to train on
            stats.dropped["prompt-too-long"] += 1
            if len(stats.problems) < SHOW_PROBLEMS:
                stats.problems.append(Problem(example.path, example.line, f"the prompt alone is longer than the "
                                              f"{spec.seq_len}-token sequence length, so nothing is left to train on",
                                              "shorten the prompt or raise data.seq_len", "prompt-too-long"))
        lengths.append(rendered.full_length)
        if result.example is None:
            result.example = ExamplePreview(f"{example.path}:{example.line}",
                                            token_segments(tokenizer, rendered.input_ids, rendered.labels),
                                            len(rendered.input_ids), rendered.trained_tokens)
    result.render_problems = stats.problems
    result.render_dropped = dict(stats.dropped)
    result.truncated = sum(n > spec.seq_len for n in lengths)
    if lengths:
        result.lengths = length_stats(lengths, spec.seq_len, sampled=len(lengths) < result.report.kept)
    result.eos = eos_check(tokenizer, stats, result.truncated)


def length_stats(lengths: list[int], cutoff: int, *, sampled: bool = False, bins: int = BINS) -> LengthStats:
    """Summary numbers and equal-width bins from the shortest to the longest row."""
    ordered = sorted(lengths)
    low, top = ordered[0], ordered[-1]
    width = max(1, -(-(top - low + 1) // bins))
    counts = [0] * -(-(top - low + 1) // width)
    for n in ordered:
        counts[(n - low) // width] += 1
    edges = [(low + i * width, low + (i + 1) * width - 1, c) for i, c in enumerate(counts)]
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return LengthStats(len(ordered), low, int(statistics.median(ordered)), p95, top, cutoff,
                       sum(n > cutoff for n in ordered), edges, sampled, statistics.fmean(ordered))


def eos_check(tokenizer: Any, stats: RenderStats, truncated: int) -> EosCheck:
    token, token_id = tokenizer.eos_token, tokenizer.eos_token_id
    if token_id is None or stats.eos.get("missing"):
        return EosCheck(False, "the tokenizer has no EOS token, so the model can't learn to stop: "
                               "set eos_token in its tokenizer_config.json")
    parts = []
    if stats.eos.get("template"):
        parts.append(f"{stats.eos['template']} row(s) end with EOS {token!r} (id {token_id}) from the template")
    if stats.eos.get("appended"):
        parts.append(f"{stats.eos['appended']} row(s) get EOS {token!r} (id {token_id}) appended after the reply")
    message = "; ".join(parts) + "; it is trained, so the model learns to stop"
    if truncated:
        message += f". {truncated} row(s) are over the cutoff and lose their EOS when truncated"
    return EosCheck(truncated == 0, message)


def _refusal(result: DataCheckResult, limit: float) -> str:
    report = result.report
    if report.refused:
        return report.refusal
    if result.eval_report is not None and result.eval_report.refused:
        return f"the validation file: {result.eval_report.refusal}"
    lost = sum(result.render_dropped.values())
    if report.kept and lost >= report.kept:
        return "no row can be rendered for training: fix the problems above"
    return drop_refusal(report.dropped + lost, report.rows, limit)
