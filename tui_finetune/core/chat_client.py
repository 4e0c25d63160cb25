"""The UI's side of chat: start engine/chat_worker.py and read its JSON lines, without importing torch.

``ChatClient(run_dir)`` starts the worker; ``ready()`` waits for the model to load; ``ask(messages,
base=...)`` yields the worker's events (dicts with ``type`` token / done / error) as they arrive.
The TUI calls ``ask`` from a thread worker and posts each token as a message; the CLI prints them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from tui_finetune.core.gpu_allocator import allocator_env


class ChatClientError(RuntimeError):
    """The chat worker failed to start or died; the message carries its last words."""


class ChatClient:
    def __init__(self, run_dir: Path, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tui_finetune.engine.chat_worker", str(run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env=allocator_env({**os.environ, **(env or {})}))
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                err = self.process.stderr.read() if self.process.stderr else ""
                raise ChatClientError(f"the chat worker exited ({self.process.wait()}): {err.strip()[-800:]}")
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printed to stdout; only our JSON lines matter

    def ready(self) -> dict[str, Any]:
        """Wait for the model to load; the ``ready`` event (run, device, template) or ChatClientError."""
        event = self._read()
        if event.get("type") == "error":
            raise ChatClientError(event.get("message", "the chat worker failed"))
        self.info = event
        return event

    def ask(self, messages: list[dict[str, str]], base: bool = False, max_new_tokens: int = 256,
            temperature: float = 0.0) -> Iterator[dict[str, Any]]:
        """Send one conversation and yield token events, ending with a ``done`` or ``error`` event."""
        assert self.process.stdin is not None
        request = {"messages": messages, "base": base, "max_new_tokens": max_new_tokens, "temperature": temperature}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        while True:
            event = self._read()
            yield event
            if event.get("type") in ("done", "error"):
                return

    def close(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
