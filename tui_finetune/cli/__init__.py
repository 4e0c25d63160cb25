"""The ``tui-finetune`` command line: headless commands on the app's core, data and engine.

One parser (``parser.py``) and this one ``main``; each command group is a module of its own
(``doctor``, ``plan``, ``data``, ``runs`` for train/runs/logs/stop/resume, ``chat``, ``export``) that
does the rendering, while probes and logic stay in their layers. A command's module is imported only
when it runs, so ``tui-finetune --help`` and the TUI start without torch, datasets or transformers.
"""

from __future__ import annotations

from tui_finetune.cli.parser import build_parser

RUN_COMMANDS = ("train", "runs", "logs", "stop", "resume")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from tui_finetune.cli.doctor import run_doctor_command

        return run_doctor_command(args)
    if args.command == "plan":
        from tui_finetune.cli.plan import run_plan_command

        return run_plan_command(args)
    if args.command == "data":
        if args.data_command != "check":
            parser.parse_args(["data", "--help"])
        from tui_finetune.cli.data import run_data_check_command

        return run_data_check_command(args)
    if args.command == "chat":
        from tui_finetune.cli.chat import run_chat_command

        return run_chat_command(args)
    if args.command == "export":
        from tui_finetune.cli.export import run_export_command

        return run_export_command(args)
    if args.command in RUN_COMMANDS:
        from tui_finetune.cli.runs import run_command

        return run_command(args)
    from tui_finetune.ui.app import run_app

    return run_app()
