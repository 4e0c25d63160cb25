"""Turn a data path into tokenized train and eval ``datasets.Dataset`` objects for the Trainer.

Order of work: validate every row (streaming, refuses before any model work), hash the files,
render and tokenize each usable row into an Arrow file on disk (``Dataset.from_generator``, so
a large dataset is never held in Python lists), then split train/eval deterministically from the
seed. Rows that can't be rendered (the prompt alone over ``seq_len``, a template that refuses a
conversation) count as dropped, under the same limit as validation (``data.max_drop_fraction``).
The column mapping is the recipe's ``data.columns``, so a resumed run reads the file the same way.

The columns are ``input_ids``, ``labels`` (-100 on masked tokens), ``length`` (tokens after
truncation) and ``sample_id`` (the source row's position among all rows read, stable while the
files don't change, so a resumed run can tell which samples it has seen).
"""

from __future__ import annotations

import atexit
import hashlib
import random
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.errors import DataError, Problem, format_problems
from tui_finetune.data.loading import MAX_LINE_BYTES, find_data_files
from tui_finetune.data.render import RenderProblem, TemplateChoice, render_example, resolve_template
from tui_finetune.data.formats import parse_columns
from tui_finetune.data.validate import (ValidationReport, drop_limit, drop_refusal, iter_examples, new_report,
                                        open_source, raise_if_refused)

_CHUNK = 1 << 20


@dataclass
class RenderStats:
    """What rendering found: truncations and rows it had to drop."""

    rows: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    eos: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class PreparedData:
    train: Any
    """``datasets.Dataset`` with input_ids, labels, length, sample_id."""
    eval: Any | None
    data_hash: str
    report: ValidationReport
    truncated: int
    template: TemplateChoice
    eval_report: ValidationReport | None = None
    stats: RenderStats = field(default_factory=RenderStats)
    warnings: list[str] = field(default_factory=list)
    """Things a run should log (truncations, missing EOS, no eval split); never fatal."""
    packing: Any = None
    """``data/packing.PackedBins`` once ``train`` holds bins instead of rows (``data.packing`` or
    ``data.group_by_length``); else None."""
    train_rows: Any = None
    """The training rows themselves once ``train`` holds bins: a regroup after an OOM starts from them."""


def hash_data_files(data_path: str | Path, validation_path: str | Path | None = None) -> str:
    """sha256 of the data files' names and bytes, streamed in 1 MiB chunks (hex)."""
    digest = hashlib.sha256()
    for tag, path in (("train", data_path), ("validation", validation_path)):
        if path is None:
            continue
        source = find_data_files(path)
        for file in source.files:
            digest.update(f"{tag}\0{file.name}\0{file.stat().st_size}\0".encode())
            with file.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()


def prepare_datasets(data_path: str | Path, tokenizer: Any, data_spec: DataSpec, seed: int, *,
                     validation_path: str | Path | None = None, columns: dict[str, str] | None = None,
                     allow_drop: bool = False, cache_dir: str | Path | None = None,
                     max_line_bytes: int = MAX_LINE_BYTES) -> PreparedData:
    """Validate, render, tokenize and split. Raises DataError (the full file:line message) when refused.

    ``columns`` (default: the spec's ``data.columns``) maps the file's columns; ``allow_drop`` lifts the
    spec's ``data.max_drop_fraction``."""
    columns = parse_columns(data_spec.columns) if columns is None else columns
    limit = drop_limit(allow_drop, data_spec.max_drop_fraction)
    try:
        template = resolve_template(tokenizer, data_spec.template)
    except ValueError as err:
        raise DataError(str(err)) from None
    report = _validated(data_path, data_spec, columns, limit, max_line_bytes)
    eval_report = _validated(validation_path, data_spec, columns, limit, max_line_bytes) if validation_path else None
    data_hash = hash_data_files(data_path, validation_path)
    cache = Path(cache_dir) if cache_dir else temporary_cache_dir()

    stats = RenderStats()
    dataset = _build(data_path, tokenizer, template, data_spec, columns, cache, stats, max_line_bytes)
    _refuse_if_too_many_dropped(report, stats, limit)
    warnings = _warnings(stats, data_spec)
    if eval_report is not None:
        eval_stats = RenderStats()
        eval_set = _build(validation_path, tokenizer, template, data_spec, columns, cache, eval_stats, max_line_bytes)
        _refuse_if_too_many_dropped(eval_report, eval_stats, limit)
        train = dataset
    else:
        train, eval_set = split_train_eval(dataset, data_spec.eval_split, seed)
        if data_spec.eval_split > 0 and eval_set is None:
            warnings.append(f"only {len(dataset)} usable row(s): no evaluation split")
    return PreparedData(train, eval_set, data_hash, report, stats.truncated, template, eval_report, stats, warnings)


def _validated(path: str | Path, spec: DataSpec, columns: dict[str, str] | None, limit: float,
               max_line_bytes: int) -> ValidationReport:
    from tui_finetune.data.validate import validate_dataset

    report = validate_dataset(path, spec.format, columns, max_drop_fraction=limit, max_line_bytes=max_line_bytes)
    raise_if_refused(report)
    return report


def temporary_cache_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tui-finetune-data-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _build(path: str | Path, tokenizer: Any, template: TemplateChoice, spec: DataSpec,
           columns: dict[str, str] | None, cache: Path, stats: RenderStats, max_line_bytes: int) -> Any:
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32"), "sample_id": datasets.Value("int64")})

    def rows() -> Iterator[dict[str, Any]]:
        source, decision = open_source(path, spec.format, columns, max_line_bytes=max_line_bytes)
        for example, rendered in iter_rendered(iter_examples(source, decision, new_report(source, decision),
                                                             max_line_bytes=max_line_bytes),
                                               tokenizer, template, spec, stats):
            yield {"input_ids": rendered.input_ids, "labels": rendered.labels,
                   "length": len(rendered.input_ids), "sample_id": example.sample_id}

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:  # a fresh fingerprint: ``stats`` fills while the generator runs, so a cached build would leave it empty
        return datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache),
                                               fingerprint=uuid.uuid4().hex)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def iter_rendered(examples: Iterator[Any], tokenizer: Any, template: TemplateChoice, spec: DataSpec,
                  stats: RenderStats) -> Iterator[tuple[Any, Any]]:
    """(example, rendered) for each row that renders; the rest become problems in ``stats``."""
    for example in examples:
        stats.rows += 1
        try:
            rendered = render_example(example, tokenizer, template, train_on_prompt=spec.train_on_prompt,
                                      seq_len=spec.seq_len)
        except RenderProblem as bad:
            stats.dropped[bad.kind] += 1
            if len(stats.problems) < 20:
                stats.problems.append(Problem(example.path, example.line, bad.message, bad.fix, bad.kind))
            continue
        stats.truncated += rendered.truncated
        stats.tokens += len(rendered.input_ids)
        stats.trained_tokens += rendered.trained_tokens
        stats.eos[rendered.eos] += 1
        yield example, rendered


def _refuse_if_too_many_dropped(report: ValidationReport, stats: RenderStats, limit: float) -> None:
    dropped = report.dropped + sum(stats.dropped.values())
    if stats.rows and stats.rows == sum(stats.dropped.values()):
        refusal = "no row can be rendered for training: fix the problems above"
    else:
        refusal = drop_refusal(dropped, report.rows, limit)
    if not refusal:
        return
    lines = format_problems(report.problems + stats.problems, report.problem_count + sum(stats.dropped.values()))
    why = ", ".join(f"{k}: {n}" for k, n in sorted({**report.drop_reasons, **stats.dropped}.items()))
    lines += [f"{report.source}: kept {report.rows - dropped} of {report.rows} rows; dropped {dropped} ({why})",
              f"refused: {refusal}"]
    raise DataError("\n".join(lines), report.problems + stats.problems, report)


def _warnings(stats: RenderStats, spec: DataSpec) -> list[str]:
    out = []
    if stats.truncated:
        out.append(f"{stats.truncated} row(s) are longer than data.seq_len = {spec.seq_len} tokens and were "
                   "truncated (their ends, EOS included, are cut): raise seq_len or shorten them")
    if stats.eos.get("missing"):
        out.append("the tokenizer has no EOS token: the model can't learn to stop; set eos_token in its "
                   "tokenizer_config.json")
    return out


def split_train_eval(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Hold out ``fraction`` of the rows (at least one), chosen by ``seed``; both keep file order."""
    n = len(dataset)
    if fraction <= 0 or n < 2:
        return dataset, None
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(seed).sample(range(n), k))
    train = dataset.select([i for i in range(n) if i not in held])
    return train, dataset.select(sorted(held))
