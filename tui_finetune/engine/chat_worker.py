"""The chat process: ``python -m tui_finetune.engine.chat_worker RUN_DIR``, JSON lines in and out.

The UI starts it (core/chat_client.py) so that torch, the model and any CUDA crash stay out of the
UI process, as with training. It loads the fine-tune once and then answers requests read from
stdin, one JSON object a line::

    {"messages": [{"role": "user", "content": "hi"}], "base": false, "max_new_tokens": 256, "temperature": 0}

For each it writes ``{"type": "token", "text": ...}`` lines as the reply streams, then
``{"type": "done", "text", "tokens", "stopped", "base"}``. It starts with ``{"type": "ready", ...}``
(or ``{"type": "error", ...}`` if the run can't load) and exits at end of input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _send(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(run_dir: Path, lines: Any = None) -> int:
    from tui_finetune.engine.chat import ChatSession, Reply

    try:
        session = ChatSession.open(run_dir)
    except Exception as err:  # the UI shows the message; the traceback would only say where
        _send(type="error", message=str(err))
        return 1
    device = str(next(session.model.parameters()).device)
    _send(type="ready", run=run_dir.name, device=device, template=session.run.template.source)
    for line in lines if lines is not None else sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            messages = request["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            _send(type="error", message=f"bad request ({err}): send {{\"messages\": [...]}} on one line")
            continue
        base = bool(request.get("base", False))
        try:
            for item in session.stream(messages, base=base, max_new_tokens=int(request.get("max_new_tokens", 256)),
                                       temperature=float(request.get("temperature", 0.0))):
                if isinstance(item, Reply):
                    _send(type="done", text=item.text, tokens=item.tokens, stopped=item.stopped, base=base)
                else:
                    _send(type="token", text=item, base=base)
        except Exception as err:
            _send(type="error", message=f"generation failed: {err}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tui_finetune.engine.chat_worker RUN_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return serve(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
