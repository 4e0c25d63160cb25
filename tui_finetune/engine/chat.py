"""Talk to a fine-tune: render the conversation with the run's chat template, stream the reply, stop at
the end of the turn.

The stop set is engine/samples.py's (EOS plus every end-of-turn token the vocabulary has), the
same the training samples and the exports' "does it stop" check use. The base model is the same
weights with the adapter switched off (peft's ``disable_adapter``), so a side-by-side chat loads the
model once. The UI never imports this: it talks to engine/chat_worker.py through core/chat_client.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import Any, Iterator

import torch

from tui_finetune.engine.run_model import RunFinetune, load_chat_model, open_run
from tui_finetune.engine.samples import stop_token_ids


@dataclass
class Reply:
    text: str
    tokens: int
    stopped: bool
    """True when the reply ended at an end token, False when it ran into max_new_tokens."""


class ChatSession:
    """A loaded fine-tune that answers conversations; ``base=True`` answers with the adapter off."""

    def __init__(self, run: RunFinetune, model: Any) -> None:
        self.run, self.model = run, model
        self.stop_ids = stop_token_ids(run.tokenizer, model)

    @classmethod
    def open(cls, run_dir: Path) -> ChatSession:
        run = open_run(run_dir)
        return cls(run, load_chat_model(run))

    def stream(self, messages: list[dict[str, str]], *, base: bool = False, max_new_tokens: int = 256,
               temperature: float = 0.0) -> Iterator[str | Reply]:
        """Yield text pieces as they are generated, then one final :class:`Reply`."""
        from transformers import TextIteratorStreamer

        tokenizer = self.run.tokenizer
        prompt = self.run.render_prompt(messages)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt], device=device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output: dict[str, Any] = {}

        def generate() -> None:
            with torch.no_grad(), _adapter_off(self.model, base):
                output["ids"] = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                    eos_token_id=self.stop_ids, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                    use_cache=True, **sampling)

        thread = Thread(target=generate, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if piece:
                yield piece
        thread.join()
        new = output["ids"][0, len(prompt):].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        yield Reply("".join(pieces).strip(), len(new), stopped)

    def reply(self, messages: list[dict[str, str]], **kwargs: Any) -> Reply:
        final = None
        for item in self.stream(messages, **kwargs):
            if isinstance(item, Reply):
                final = item
        assert final is not None
        return final


class _adapter_off:
    """``model.disable_adapter()`` when asked for the base, else nothing."""

    def __init__(self, model: Any, off: bool) -> None:
        self.context = model.disable_adapter() if off else None

    def __enter__(self) -> None:
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def chat_once(run_dir: Path, prompt: str, base: bool = False, max_new_tokens: int = 256) -> Reply:
    """One answer to one user message: ``tui-finetune chat RUN --prompt TEXT [--base]``."""
    session = ChatSession.open(run_dir)
    return session.reply([{"role": "user", "content": prompt}], base=base, max_new_tokens=max_new_tokens)
