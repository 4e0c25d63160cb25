"""Render a normalized example into ``input_ids`` and ``labels`` for training.

* Chat rows go through a chat template: the tokenizer's own (``template = "auto"``, when it has
  one) or one of ours, named in the recipe (``chatml``, ``alpaca``).
* Only the assistant (or completion) tokens carry loss by default; everything else is -100.
  How the assistant tokens are found, per template:
    - a template with ``{% generation %}`` markers: ``apply_chat_template(...,
      return_assistant_tokens_mask=True)``, the mask transformers computes from the markers;
    - any other template (most shipped ones, Qwen2.5's and Llama-3's included): *prefix
      rendering*. For assistant turn k, the text of ``messages[:k]`` with the generation prompt is
      a prefix of the text of ``messages[:k+1]``; the characters between the two are that turn.
      The full text is tokenized once with offsets, and a token is trained when its first
      character lies in an assistant span.
* The sequence always ends with the EOS token, and that EOS is trained, so the model learns to
  stop. Trailing whitespace after a template's own EOS (ChatML's ``<|im_end|>\\n``) is accepted.
* Rows longer than ``seq_len`` are truncated and flagged; a row left with nothing to train on is
  refused with a :class:`RenderProblem`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tui_finetune.core.events import first_line
from tui_finetune.data.formats import Example

IGNORE_INDEX = -100
_BOS = "{%- if bos_token %}{{ bos_token }}{% endif %}"
CHATML_TEMPLATE = (
    _BOS + "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{%- if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{- eos_token }}{%- endif %}"
    "{{- '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
"""ChatML; where the tokenizer's EOS is not ``<|im_end|>``, EOS follows each assistant turn too."""
ALPACA_TEMPLATE = (
    _BOS + "{%- if messages and messages[0]['role'] != 'system' %}"
    "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{%- else %}{{- '### Response:\n' + message['content'] + (eos_token or '') + '\n\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}")
"""The Stanford Alpaca prompt, with EOS after each response."""
TEMPLATES = {"chatml": CHATML_TEMPLATE, "alpaca": ALPACA_TEMPLATE}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TemplateChoice:
    name: str
    """``tokenizer`` (its own template), ``chatml`` or ``alpaca``."""
    jinja: str
    source: str
    """Human words: where the template comes from and why."""
    masking: str
    """``generation markers`` or ``prefix rendering``: how assistant tokens are found."""


class RenderProblem(Exception):
    """A row that can't be rendered for training; becomes a ``file:line`` problem."""

    def __init__(self, message: str, fix: str, kind: str) -> None:
        super().__init__(message)
        self.message, self.fix, self.kind = message, fix, kind


@dataclass
class RenderedExample:
    sample_id: int
    input_ids: list[int]
    labels: list[int]
    full_length: int
    """Tokens before truncation (what the length histogram counts)."""
    truncated: bool
    eos: str
    """``template`` (the template ends the reply with EOS), ``appended`` (we added it) or ``missing``
    (the tokenizer has no EOS token)."""

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def resolve_template(tokenizer: Any, name: str = "auto") -> TemplateChoice:
    """The chat template to use: ``auto`` prefers the tokenizer's own, else ChatML."""
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if name == "auto":
        if own:
            return TemplateChoice("tokenizer", own, "the tokenizer's own chat template", _masking(own))
        return TemplateChoice("chatml", CHATML_TEMPLATE, "chatml (default: the tokenizer has no chat template)",
                              "prefix rendering")
    if name in ("tokenizer", "own"):
        if not own:
            raise ValueError("data.template = 'tokenizer', but this tokenizer has no chat template: "
                             "use 'auto', 'chatml' or 'alpaca'")
        return TemplateChoice("tokenizer", own, "the tokenizer's own chat template", _masking(own))
    if name in TEMPLATES:
        return TemplateChoice(name, TEMPLATES[name], f"{name} (named in the recipe)", "prefix rendering")
    raise ValueError(f"data.template = '{name}' is not a known template: use auto, chatml or alpaca")


def _masking(template: str) -> str:
    return "generation markers" if _GENERATION.search(template) else "prefix rendering"


def render_example(example: Example, tokenizer: Any, template: TemplateChoice, *, train_on_prompt: bool = False,
                   seq_len: int | None = None) -> RenderedExample:
    """Token ids and labels for one example; raises RenderProblem for a row that can't be trained on."""
    if example.kind == "chat":
        ids, trained = _render_chat(example.messages, tokenizer, template)
    elif example.kind == "completion":
        ids, trained = _render_spans(example.prompt + example.completion, tokenizer,
                                     [(len(example.prompt), len(example.prompt) + len(example.completion))], True)
    else:
        enc = tokenizer(example.text, add_special_tokens=True)
        ids, trained = list(enc["input_ids"]), [True] * len(enc["input_ids"])
    labels = [i if (t or train_on_prompt) else IGNORE_INDEX for i, t in zip(ids, trained)]
    if not any(trained):
        raise RenderProblem("the template rendered no assistant tokens for this row",
                            "check the chat template, or set data.template = \"chatml\"", "nothing-to-train")
    eos = _ensure_eos(ids, labels, tokenizer)
    full = len(ids)
    truncated = seq_len is not None and full > seq_len
    if truncated:
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            raise RenderProblem(f"the prompt alone is longer than the {seq_len}-token sequence length, so "
                                "nothing is left to train on", "shorten the prompt or raise data.seq_len",
                                "prompt-too-long")
    return RenderedExample(example.sample_id, ids, labels, full, truncated, eos)


def _apply(tokenizer: Any, messages: list[dict[str, str]], template: TemplateChoice, generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as err:  # jinja2 TemplateError, or raise_exception() inside the template
        raise RenderProblem(f"the chat template refused this conversation ({first_line(err, 160)})",
                            "make the turns alternate user/assistant, or set data.template = \"chatml\"",
                            "template-error") from None


def _render_chat(messages: list[dict[str, str]], tokenizer: Any, template: TemplateChoice) -> tuple[list[int], list[bool]]:
    if template.masking == "generation markers":
        try:
            out = tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
        except Exception as err:
            raise RenderProblem(f"the chat template refused this conversation ({first_line(err, 160)})",
                                "make the turns alternate user/assistant, or set data.template = \"chatml\"",
                                "template-error") from None
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    full = _apply(tokenizer, messages, template, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _apply(tokenizer, messages[:k], template, True) if k else ""
        except RenderProblem:
            before = ""
        upto = _apply(tokenizer, messages[:k + 1], template, False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise RenderProblem("the chat template renders earlier turns differently once later turns are added, "
                                "so the assistant tokens can't be found", "use a template with {% generation %} "
                                "markers, or set data.template = \"chatml\"", "template-not-prefix")
        spans.append((len(before), len(upto)))
    return _render_spans(full, tokenizer, spans, False)


def _render_spans(text: str, tokenizer: Any, spans: list[tuple[int, int]],
                  special: bool) -> tuple[list[int], list[bool]]:
    """Tokenize once with offsets; a token is trained when its first character is inside a span."""
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    trained = []
    for start, end in enc["offset_mapping"]:
        inside = end > start and any(a <= start < b for a, b in spans)
        trained.append(inside)
    return list(enc["input_ids"]), trained


def _ensure_eos(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    eos = tokenizer.eos_token_id
    if eos is None:
        return "missing"
    j = len(ids) - 1
    while j >= 0 and ids[j] != eos and not tokenizer.decode([ids[j]]).strip():
        j -= 1
    if j >= 0 and ids[j] == eos:
        labels[j] = eos
        return "template"
    ids.append(eos)
    labels.append(eos)
    return "appended"


def token_segments(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """(text, trained) runs of consecutive tokens, decoded together so characters stay whole."""
    segments: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            segments.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return segments
