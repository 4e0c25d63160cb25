"""``tui-finetune export RUN --to adapter|merged|gguf|ollama``: write an export, check it, say how to use it.

The engine (engine/export/) writes to a temporary name, reloads the result and compares it with the
fine-tune; this module prints its progress on stderr and, at the end, each check and the commands
that use the output. The exit code is 0 only when every check passed (or was skipped with a reason).
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.text import Text

from tui_finetune.core.export_spec import ExportError, ExportResult, ExportSpec
from tui_finetune.core.export_usage import usage_lines
from tui_finetune.core.run_folder.info import RunError
from tui_finetune.core.run_folder.listing import find_run

console = Console(highlight=False, soft_wrap=True)
"""soft_wrap: paths and commands stay on one line, so they can be copied."""
progress_console = Console(highlight=False, stderr=True, soft_wrap=True)


def run_export_command(args: argparse.Namespace) -> int:
    from tui_finetune.engine.export import run_export

    try:
        run_dir = find_run(args.run)
        spec = ExportSpec(args.to, quant=args.quant, out_dir=args.out or "", check=not args.no_check)
        progress_console.print(f"exporting {run_dir.name} to {spec.target}"
                               f"{' ' + spec.quant if spec.uses_gguf else ''} in {spec.folder(run_dir)}")
        result = run_export(run_dir, spec, progress=lambda message: progress_console.print(f"  {message}"))
    except (ExportError, RunError) as err:
        console.print(Text.assemble(("error:", "red"), f" {err}"))
        return 1
    print_export_result(result)
    return 0 if result.passed else 1


def print_export_result(result: ExportResult) -> None:
    """Where the export is, each check as ok / FAIL / skip, and the commands that use it."""
    verdict = ("passed its checks", "green") if result.passed else ("FAILED a check", "red")
    quant = "" if result.target in ("adapter", "merged") else f" {result.quant}"
    console.print(Text.assemble((f"{result.target}{quant}", "bold"), f": {result.path} (", verdict,
                                f", {result.seconds:.0f}s)"))
    for check in result.checks:
        mark = ("skip", "yellow") if check.skipped else (("ok", "green") if check.passed else ("FAIL", "red"))
        console.print(Text.assemble("  [", mark, f"] {check.name}: {check.detail}"))
    if not result.checks:
        console.print("  [yellow]not checked[/] (--no-check)")
    for line in usage_lines(result):
        console.print(Text.assemble(("  use it: ", "dim"), line))
