"""The ``tui-finetune`` command line: headless commands that share the app's core, data and engine.

Heavy imports (torch, datasets) happen inside each command, so ``tui-finetune --help`` and the
TUI start instantly.
"""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tui-finetune",
        description="Fine-tune an LLM on your own GPU. With no command, opens the wizard.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("doctor", help="report GPUs, driver, torch/CUDA, bitsandbytes, disk and folders")

    plan = sub.add_parser("plan", help="which models and recipes fit a card, with the VRAM breakdown")
    plan.add_argument("--vram", type=float, help="plan for a card with this many GB (default: the GPU here)")
    plan.add_argument("--model", help="only this model (catalog key, Hub id or local folder)")
    plan.add_argument("--recipe", help="plan this recipe file or preset name")
    plan.add_argument("--seq", type=int, help="sequence length to plan for (overrides the recipe)")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    check = data_sub.add_parser("check", help="the dataset doctor: format, problems, token lengths, a rendered example")
    check.add_argument("file", help="a data file or a folder of data files")
    check.add_argument("--model", help="tokenizer to measure with: catalog key, Hub id or local folder")
    check.add_argument("--seq", type=int, default=1024, help="sequence length cutoff (default 1024)")
    check.add_argument("--format", default="auto", help="force a format: alpaca, sharegpt, messages, prompt_completion, text")
    check.add_argument("--columns", help="column mapping, e.g. prompt=instruction,reply=output")
    check.add_argument("--validation", help="a separate validation file")
    check.add_argument("--allow-drop", action="store_true", help="accept dropping more than 5%% of the rows")

    from tui_finetune.run_commands import add_run_commands

    add_run_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "doctor":
        from tui_finetune.engine.doctor import run_doctor_command

        return run_doctor_command(args)
    if args.command == "plan":
        from tui_finetune.plan_command import run_plan_command

        return run_plan_command(args)
    if args.command == "data":
        if args.data_command != "check":
            _build_parser().parse_args(["data", "--help"])
        from tui_finetune.data.report import run_data_check_command

        return run_data_check_command(args)
    if args.command in ("train", "runs", "logs", "stop", "resume"):
        from tui_finetune.run_commands import run_command

        return run_command(args)
    from tui_finetune.ui.app import run_app

    return run_app()


if __name__ == "__main__":
    sys.exit(main())
