"""``tui-finetune data check FILE``: print the dataset doctor's findings (data/check.py) with rich.

The data package decides and never prints; this module only renders. Exit status: 0 when the data
is usable, 1 when it is refused (or can't be read).
"""

from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any

from rich.console import Console
from rich.text import Text

from tui_finetune.cli.data_options import data_overrides
from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.check import DataCheckResult, LengthStats, check_dataset
from tui_finetune.data.errors import DataError, format_problems
from tui_finetune.data.validate import ValidationReport

TRAINED = "bold green"
MASKED = "dim"
BAR = 40


def run_data_check_command(args: Namespace) -> int:
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    from tui_finetune.core.recipe import RecipeError
    from tui_finetune.data.tokenizer import tokenizer_for_check

    try:
        spec = data_spec_from_args(args)
    except RecipeError as err:
        console.print(Text(f"error: {err}", style="red"))
        return 2
    try:
        loaded, note = tokenizer_for_check(getattr(args, "model", None))
        if note:
            console.print(Text(f"warning: {note}", style="yellow"))
        tokenizer, name = loaded.tokenizer, loaded.name
        result = check_dataset(args.file, tokenizer, name, spec, validation_path=getattr(args, "validation", None))
    except DataError as err:
        console.print(Text(str(err), style="red"))
        console.print(Text("✗ refused", style="bold red"))
        return 1
    print_result(console, result)
    return 0 if result.usable else 1


def data_spec_from_args(args: Namespace) -> DataSpec:
    """The [data] table ``train`` would use with the same options: defaults, ``--seq``, ``--set data.*``,
    then the shorthands ``--columns``, ``--format``, ``--allow-drop`` (cli/data_options.py)."""
    from tui_finetune.core.recipe import RecipeError
    from tui_finetune.core.recipe_io import apply_override, recipe_from_dict

    items = data_overrides(args)
    raw: dict[str, Any] = {"model": "data-check", "data": {"seq_len": getattr(args, "seq", None) or 1024}}
    for item in items:
        if not item.strip().startswith("data."):
            raise RecipeError(f"--set {item}: data check takes only data.* keys, e.g. --set data.columns=prompt=q,reply=a")
        apply_override(raw, item, "data check")
    return recipe_from_dict(raw, "data check").data


def print_result(console: Console, result: DataCheckResult) -> None:
    report = result.report
    _field(console, "Dataset", f"{report.source} ({_files(report)})")
    if report.format:
        _field(console, "Format", f"{report.format} ({report.format_description}): {report.evidence}")
        used = [f"{k}={v}" for k, v in report.mapping.items() if v in report.columns_seen]
        ignored = [c for c in report.columns_seen if c not in report.mapping.values()]
        _field(console, "Columns", ", ".join(used) + (f"; ignored: {', '.join(ignored)}" if ignored else ""))
    _field(console, "Tokenizer", result.tokenizer_name)
    if result.template is not None:
        _field(console, "Template", f"{result.template.source}; assistant tokens found by {result.template.masking}")
    console.print()
    _print_rows(console, report, "Rows")
    if result.eval_report is not None:
        _print_rows(console, result.eval_report, "Eval rows")
    if result.render_problems:
        console.print(Text("Rendering problems:", style="bold"))
        for line in format_problems(result.render_problems, sum(result.render_dropped.values())):
            console.print(Text("  " + line, style="yellow"))
    if result.lengths is not None:
        console.print()
        _print_histogram(console, result.lengths)
    if result.example is not None:
        console.print()
        _print_example(console, result)
    if result.eos is not None:
        console.print()
        mark, style = ("✓", "green") if result.eos.ok else ("!", "yellow")
        console.print(Text.assemble(("EOS       ", "bold"), (f"{mark} {result.eos.message}", style)))
    console.print()
    if result.usable:
        console.print(Text(f"✓ usable: {report.kept} rows ready for training", style="bold green"))
    else:
        console.print(Text(f"✗ refused: {result.refusal}", style="bold red"))


def _field(console: Console, name: str, value: str) -> None:
    console.print(Text.assemble((f"{name:<10}", "bold"), value))


def _files(report: ValidationReport) -> str:
    n = len(report.files)
    return f"{report.file_kind}, {n} file{'s' if n != 1 else ''}"


def _print_rows(console: Console, report: ValidationReport, title: str) -> None:
    why = ", ".join(f"{k} {n}" for k, n in sorted(report.drop_reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    dropped = f"dropped {report.dropped} ({why})" if report.dropped else "dropped none"
    console.print(Text.assemble((f"{title:<10}", "bold"), f"kept {report.kept} of {report.rows}; {dropped}"))
    if report.problem_count:
        console.print(Text(f"Problems ({report.problem_count}):", style="bold"))
        for line in format_problems(report.problems, report.problem_count):
            console.print(Text("  " + line, style="yellow"))


def _print_histogram(console: Console, lengths: LengthStats) -> None:
    sample = " (the first rows only)" if lengths.sampled else ""
    console.print(Text.assemble(("Lengths   ", "bold"), f"tokens per row over {lengths.count} rows{sample}: "
                                f"min {lengths.min}, median {lengths.median}, 95% {lengths.p95}, max {lengths.max}"))
    peak = max(c for _, _, c in lengths.bins) or 1
    label_width = len(f"{lengths.bins[-1][0]}-{lengths.bins[-1][1]}")
    for low, high, count in lengths.bins:
        bar = "█" * max(1 if count else 0, round(BAR * count / peak))
        line = Text(f"  {f'{low}-{high}':>{label_width}} ")
        line.append(f"{bar:<{BAR}}", style="red" if low > lengths.cutoff else "cyan")
        line.append(f" {count}")
        if low <= lengths.cutoff <= high and lengths.cutoff < lengths.max:
            line.append(f"   ◀ cutoff {lengths.cutoff}: longer rows are truncated", style="bold yellow")
        console.print(line)
    if lengths.cutoff >= lengths.max:
        console.print(Text(f"  cutoff {lengths.cutoff}: above the longest row", style="bold green"))
    elif lengths.cutoff < lengths.min:
        console.print(Text(f"  cutoff {lengths.cutoff}: below the shortest row", style="bold red"))
    style = "yellow" if lengths.over else "green"
    console.print(Text(f"  {lengths.over} row(s) over the {lengths.cutoff}-token cutoff "
                       f"({'will be truncated' if lengths.over else 'none truncated'})", style=style))


def _print_example(console: Console, result: DataCheckResult) -> None:
    example = result.example
    assert example is not None
    console.print(Text.assemble(("First example", "bold"), f" ({example.where}), {example.tokens} tokens, "
                                f"{example.trained_tokens} trained: ", ("trained", TRAINED), " / ",
                                ("masked (-100)", MASKED)))
    body = Text()
    for text, trained in example.segments:
        body.append(text, style=TRAINED if trained else MASKED)
    console.print(body)


def format_result_plain(result: DataCheckResult) -> str:
    """The printed report without colours (for logs and tests)."""
    console = Console(record=True, width=120, highlight=False, soft_wrap=True, file=_Null())
    print_result(console, result)
    return console.export_text()


class _Null:
    def write(self, _: Any) -> int:
        return 0

    def flush(self) -> None:
        pass
