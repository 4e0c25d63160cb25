"""``tui-finetune chat RUN [--base] [--prompt TEXT]``: talk to a finished run's fine-tune (or its base).

With ``--prompt`` it prints one answer and exits, for scripts and tests; without, it reads one user
turn a line from the terminal and streams each reply (an empty line or Ctrl-D ends). The model runs
in this process through engine/chat.py, imported only when the command runs, so ``--help`` stays light and
the CUDA allocator setting (core/gpu_allocator.py) can be made before torch starts.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from tui_finetune.core.export_spec import ExportError
from tui_finetune.core.gpu_allocator import apply_here
from tui_finetune.core.run_folder.info import RunError
from tui_finetune.core.run_folder.listing import find_run

console = Console(highlight=False, stderr=True, soft_wrap=True)
"""Status lines and errors go to stderr, so stdout carries only the model's answers."""


def run_chat_command(args: argparse.Namespace) -> int:
    apply_here()  # the model loads in this process: the allocator setting must be in place before torch starts
    try:
        run_dir = find_run(args.run)
        if args.prompt is not None:
            return answer_once(run_dir, args)
        return chat_interactively(run_dir, args)
    except (ExportError, RunError) as err:
        console.print(Text.assemble(("error:", "red"), f" {err}"))
        return 1


def answer_once(run_dir, args: argparse.Namespace) -> int:
    from tui_finetune.engine.chat import chat_once

    reply = chat_once(run_dir, args.prompt, base=args.base, max_new_tokens=args.max_new_tokens)
    print(reply.text)
    if not reply.text:
        console.print("[yellow](an empty reply: the model ended its turn at once)[/]")
    if not reply.stopped:
        console.print(f"[yellow]cut at {args.max_new_tokens} tokens[/] (it did not reach an end token)")
    return 0


def chat_interactively(run_dir, args: argparse.Namespace) -> int:
    from tui_finetune.engine.chat import ChatSession, Reply

    side = "base model (adapter off)" if args.base else "fine-tune"
    console.print(f"loading {run_dir.name} ...")
    session = ChatSession.open(run_dir)
    console.print(f"chatting with the [b]{side}[/] of {run_dir.name} "
                  f"(template: {session.run.template.source}); an empty line or Ctrl-D ends")
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        for item in session.stream(messages, base=args.base, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature):
            if isinstance(item, Reply):
                print(flush=True)
                messages.append({"role": "assistant", "content": item.text})
                if not item.stopped:
                    console.print(f"[yellow]cut at {args.max_new_tokens} tokens[/]")
            else:
                sys.stdout.write(item)
                sys.stdout.flush()
