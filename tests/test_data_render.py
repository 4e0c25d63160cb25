"""Rendering and masking against real chat templates (Qwen2.5-Instruct's and Llama-3-Instruct's).

The tokenizers are tiny BPEs built locally (tests/data/tokenizers, made by make_tokenizers.py);
their chat templates are the published ones, copied verbatim into tests/data/templates/.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tui_finetune.data.formats import Example
from tui_finetune.data.render import (IGNORE_INDEX, RenderProblem, TemplateChoice, render_example,
                                      resolve_template, token_segments)
from tui_finetune.data.tokenizer import byte_level_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Reverse the letters of this word.\n\nplanet"},
    {"role": "assistant", "content": "tenalp"},
]
GENERATION_CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>\n' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def chat(messages: list[dict[str, str]]) -> Example:
    return Example(7, "f.jsonl", 3, "chat", messages=messages)


def expected_mask(tokenizer, text: str, trained_spans: list[str]) -> list[bool]:
    """Independent expectation: a token is trained when it starts inside one of the given substrings."""
    spans, start = [], 0
    for piece in trained_spans:
        at = text.index(piece, start)
        spans.append((at, at + len(piece)))
        start = at + len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]


def test_the_qwen_template_is_the_published_text(data_dir: Path, data_qwen_tokenizer) -> None:
    published = json.loads((data_dir / "templates" / "qwen2.5-instruct.json").read_text(encoding="utf-8"))
    assert data_qwen_tokenizer.chat_template == published["chat_template"]
    text = data_qwen_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen_labels_are_minus_100_exactly_on_non_assistant_tokens(data_qwen_tokenizer) -> None:
    tok = data_qwen_tokenizer
    template = resolve_template(tok)
    assert (template.name, template.masking) == ("tokenizer", "prefix rendering")
    rendered = render_example(chat(CONVERSATION), tok, template)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    trained = ["The capital of France is Paris.<|im_end|>\n", "tenalp<|im_end|>\n"]
    mask = expected_mask(tok, text, trained)
    assert rendered.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert rendered.labels == [i if m else IGNORE_INDEX for i, m in zip(rendered.input_ids, mask)]
    segments = token_segments(tok, rendered.input_ids, rendered.labels)
    assert [t for t, is_trained in segments if is_trained] == trained
    assert "".join(t for t, _ in segments) == text
    assert rendered.eos == "template" and rendered.labels[-2] == tok.eos_token_id  # <|im_end|> then "\n"


def test_llama3_labels_cover_the_trimmed_reply_and_eot(data_llama3_tokenizer) -> None:
    tok = data_llama3_tokenizer
    messages = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "  Lima.  "}]
    rendered = render_example(chat(messages), tok, resolve_template(tok))
    segments = token_segments(tok, rendered.input_ids, rendered.labels)
    assert segments == [("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of Peru?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("Lima.<|eot_id|>", True)]
    assert rendered.input_ids[0] == tok.bos_token_id and rendered.input_ids.count(tok.bos_token_id) == 1
    assert rendered.input_ids[-1] == tok.eos_token_id and rendered.eos == "template"


def test_generation_markers_and_prefix_rendering_give_the_same_labels(data_qwen_tokenizer) -> None:
    tok = data_qwen_tokenizer
    messages = CONVERSATION[1:]
    with_markers = TemplateChoice("tokenizer", GENERATION_CHATML, "test", "generation markers")
    by_prefix = TemplateChoice("tokenizer", GENERATION_CHATML, "test", "prefix rendering")
    assert resolve_template(_with_template(tok, GENERATION_CHATML)).masking == "generation markers"
    a = render_example(chat(messages), tok, with_markers)
    b = render_example(chat(messages), tok, by_prefix)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert [t for t, trained in token_segments(tok, a.input_ids, a.labels) if trained] == [
        "The capital of France is Paris.<|im_end|>\n", "tenalp<|im_end|>\n"]


def _with_template(tok, template: str):
    clone = copy.deepcopy(tok)
    clone.chat_template = template
    return clone


def test_train_on_prompt_trains_every_token(data_qwen_tokenizer) -> None:
    rendered = render_example(chat(CONVERSATION), data_qwen_tokenizer, resolve_template(data_qwen_tokenizer),
                              train_on_prompt=True)
    assert rendered.labels == rendered.input_ids


def test_completion_masks_the_prompt_and_appends_a_trained_eos(data_llama3_tokenizer) -> None:
    tok = data_llama3_tokenizer
    example = Example(1, "f.csv", 2, "completion", prompt="Question: What is 2 + 3?\nAnswer:", completion=" 2 + 3 = 5")
    rendered = render_example(example, tok, resolve_template(tok))
    assert token_segments(tok, rendered.input_ids, rendered.labels) == [
        ("Question: What is 2 + 3?\nAnswer:", False), (" 2 + 3 = 5<|eot_id|>", True)]
    assert rendered.eos == "appended"


def test_plain_text_is_all_trained_and_ends_with_eos(data_qwen_tokenizer) -> None:
    rendered = render_example(Example(0, "t.txt", 1, "text", text="Once upon a time."), data_qwen_tokenizer,
                              resolve_template(data_qwen_tokenizer))
    assert rendered.labels == rendered.input_ids
    assert rendered.input_ids[-1] == data_qwen_tokenizer.eos_token_id and rendered.eos == "appended"


def test_truncation_is_flagged_and_a_prompt_over_the_limit_is_refused(data_qwen_tokenizer) -> None:
    tok, template = data_qwen_tokenizer, resolve_template(data_qwen_tokenizer)
    full = render_example(chat(CONVERSATION), tok, template)
    cut = render_example(chat(CONVERSATION), tok, template, seq_len=full.full_length - 3)
    assert cut.truncated and len(cut.input_ids) == full.full_length - 3 and cut.full_length == full.full_length
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(RenderProblem) as err:
        render_example(chat(CONVERSATION), tok, template, seq_len=first_trained)
    assert err.value.kind == "prompt-too-long"
    assert not render_example(chat(CONVERSATION), tok, template, seq_len=full.full_length).truncated


def test_a_template_that_rewrites_history_is_refused_not_mismasked(data_qwen_tokenizer) -> None:
    last_two = ("{%- for m in messages[-2:] %}{{- m['role'] + ': ' + m['content'] + '\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    with pytest.raises(RenderProblem) as err:
        render_example(chat(CONVERSATION), data_qwen_tokenizer,
                       TemplateChoice("tokenizer", last_two, "test", "prefix rendering"))
    assert err.value.kind == "template-not-prefix"


def test_a_template_that_raises_becomes_a_row_problem(data_qwen_tokenizer) -> None:
    strict = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    with pytest.raises(RenderProblem) as err:
        render_example(chat(CONVERSATION), data_qwen_tokenizer, TemplateChoice("tokenizer", strict, "t", "prefix rendering"))
    assert err.value.kind == "template-error" and "roles must alternate" in err.value.message


def test_default_templates_when_the_tokenizer_has_none() -> None:
    tok = byte_level_tokenizer()
    auto = resolve_template(tok)
    assert auto.name == "chatml" and "no chat template" in auto.source
    messages = CONVERSATION[1:3]
    rendered = render_example(chat(messages), tok, auto)
    assert token_segments(tok, rendered.input_ids, rendered.labels) == [
        ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("The capital of France is Paris.<|im_end|><|endoftext|>\n", True)]
    alpaca = render_example(chat(messages), tok, resolve_template(tok, "alpaca"))
    assert token_segments(tok, alpaca.input_ids, alpaca.labels)[1:] == [("The capital of France is Paris."
                                                                          "<|endoftext|>\n\n", True)]
    with pytest.raises(ValueError, match="not a known template"):
        resolve_template(tok, "vicuna")


def test_a_tokenizer_without_eos_is_reported_missing() -> None:
    tok = byte_level_tokenizer()
    tok.eos_token = None
    rendered = render_example(Example(0, "t.txt", 1, "text", text="hi"), tok, resolve_template(tok))
    assert rendered.eos == "missing" and rendered.input_ids == rendered.labels
