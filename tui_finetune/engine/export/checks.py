"""The checks every export passes before it is reported done: an export nobody checked is a guess.

1. Same behaviour: the export's logits on a fixed prompt, and its greedy replies, against the
   adapter-on-base reference, within a tolerance that fits the format.
2. Template round-trip: one training conversation rendered by the run's template and tokenizer and
   by the template and tokenizer stored in the export gives the same token ids.
3. Does it stop: three prompts each end at an end token the export itself declares, before
   ``max_new_tokens``. This is the check that catches a Modelfile or GGUF missing a stop token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tui_finetune.core.export_spec import CheckResult
from tui_finetune.engine.run_model import RunFinetune

FIXED_PROMPTS = ("Say hello in one short sentence.", "What is 2 + 3?")
TOLERANCE = {"fp32": 1e-4, "f16": 2e-2, "bf16": 4e-2, "q8_0": 8e-2}
"""Largest logit difference allowed, relative to the reference's largest absolute logit."""
FALLBACK_CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@dataclass
class Behaviour:
    """What a model does on the check prompts: logits of the first, and greedy replies to all."""

    logits: torch.Tensor
    replies: list[list[int]]
    stopped: list[bool]
    margins: list[list[float]] = field(default_factory=list)
    """Per reply, the gap between the top two logits at each generated token: where it is tiny, a
    format's rounding may flip the greedy pick without anything being wrong."""


def training_conversation(run: RunFinetune) -> list[dict[str, str]]:
    """The run's first chat example (its data file's first usable row), or a fixed one."""
    from tui_finetune.core.run_folder.info import read_run_info
    from tui_finetune.data.validate import iter_examples, open_source

    try:
        source, decision = open_source(read_run_info(run.run_dir).data_path, run.recipe.data.format)
        for example in iter_examples(source, decision):
            if example.messages:
                return example.messages
            break
    except Exception:  # the data file moved or is gone: the check still needs a conversation
        pass
    return FALLBACK_CONVERSATION


def check_prompts(run: RunFinetune) -> list[list[int]]:
    """Three prompts rendered with the run's template: the first training question and two fixed ones."""
    first = next((m["content"] for m in training_conversation(run) if m["role"] == "user"), FIXED_PROMPTS[0])
    return [run.render_prompt([{"role": "user", "content": text}]) for text in (first, *FIXED_PROMPTS)]


@torch.no_grad()
def measure(model: Any, prompts: list[list[int]], stop_ids: list[int], pad_id: int | None,
            max_new_tokens: int) -> Behaviour:
    model.eval()
    device = next(model.parameters()).device
    first = torch.tensor([prompts[0]], device=device)
    logits = model(input_ids=first).logits[0].float().cpu()
    replies, stopped, margins = [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id if pad_id is not None
                             else stop_ids[0], use_cache=True, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(prompt):].tolist()
        replies.append(new)
        stopped.append(bool(new) and new[-1] in stop_ids)
        top2 = [step[0].float().topk(2).values for step in out.logits]
        margins.append([float(t[0] - t[1]) for t in top2])
    return Behaviour(logits, replies, stopped, margins)


def compare_logits(reference: Behaviour, export: Behaviour, fmt: str) -> CheckResult:
    tolerance = TOLERANCE[fmt]
    scale = reference.logits.abs().max().item() or 1.0
    worst = (reference.logits - export.logits).abs().max().item() / scale
    same_top = int((reference.logits.argmax(-1) == export.logits.argmax(-1)).sum().item())
    return CheckResult("logits match the fine-tune", worst <= tolerance,
                       f"largest difference {worst:.2e} of the largest logit (allowed {tolerance:.0e} for {fmt}); "
                       f"same top token at {same_top} of {len(reference.logits)} positions")


def compare_replies(reference: Behaviour, export: Behaviour, required: bool, fmt: str = "fp32") -> CheckResult:
    """Greedy replies token for token. A reply that parts from the fine-tune's where the fine-tune's own top
    two tokens are closer than the two models' logits differ (4x the largest difference measured on the
    first prompt, capped by the format's tolerance) is a near-tie rounding flipped: reported, not failed.
    For lossy formats (``required`` False) no divergence fails."""
    measured = (reference.logits - export.logits).abs().max().item()
    allowed = min(4 * measured, 2 * TOLERANCE[fmt] * (reference.logits.abs().max().item() or 1.0))
    same = ties = 0
    for index, (want, got) in enumerate(zip(reference.replies, export.replies)):
        if want == got:
            same += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        margins = reference.margins[index] if index < len(reference.margins) else []
        ties += at < len(margins) and margins[at] <= allowed
    detail = f"{same} of {len(reference.replies)} greedy replies identical to the fine-tune's"
    if ties:
        detail += (f"; {ties} part{'s' if ties == 1 else ''} from it where its top two tokens nearly tie "
                   f"(closer than {allowed:.2g}, 4x the largest logit difference measured, which {fmt} rounding "
                   "may flip)")
    if not required and same + ties < len(reference.replies):
        detail += " (a quantized format may pick differently where two tokens nearly tie)"
    return CheckResult("greedy replies match", same + ties == len(reference.replies) or not required, detail)


def check_stops(export: Behaviour, max_new_tokens: int, stop_names: list[str]) -> CheckResult:
    lengths = [len(r) for r in export.replies]
    return CheckResult("does it stop", all(export.stopped),
                       f"{sum(export.stopped)} of {len(export.stopped)} prompts ended at an end token "
                       f"({', '.join(stop_names) or 'none declared'}) before {max_new_tokens} tokens "
                       f"(reply lengths {lengths})")


def check_template_roundtrip(run: RunFinetune, export_template: str | None, export_tokenizer: Any) -> CheckResult:
    """Render one training conversation through the run's template and through the export's."""
    name = "chat template round-trip"
    if not export_template:
        return CheckResult(name, False, "the export carries no chat template")
    conversation = training_conversation(run)
    want = run.tokenizer(run.tokenizer.apply_chat_template(conversation, chat_template=run.template.jinja,
                                                           tokenize=False), add_special_tokens=False)["input_ids"]
    text = export_tokenizer.apply_chat_template(conversation, chat_template=export_template, tokenize=False)
    got = export_tokenizer(text, add_special_tokens=False)["input_ids"]
    if list(want) == list(got):
        return CheckResult(name, True, f"one training conversation gives the same {len(want)} tokens")
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return CheckResult(name, False, f"token {at} differs ({len(want)} tokens from the run's template, "
                                    f"{len(got)} from the export's)")


def stop_names(tokenizer: Any, stop_ids: list[int]) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
