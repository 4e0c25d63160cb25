"""Before/after generations on a held-out prompt: the quickest proof that training changed the model.

The prompt is the first validation example cut where its labels begin (the part the model did not
train on), so it is rendered with the same chat template and never seen in training.
"""

from __future__ import annotations

from typing import Any

import torch

from tui_finetune.engine import regional_compile

STOP_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>")


def held_out_prompt(eval_dataset: Any) -> list[int] | None:
    """Token ids of the first validation example's prompt (before its first trained label)."""
    if eval_dataset is None or len(eval_dataset) == 0:
        return None
    row = eval_dataset[0]
    ids, labels = list(row["input_ids"]), list(row["labels"])
    cut = next((i for i, label in enumerate(labels) if label != -100), None)
    if not cut:
        return None
    return ids[:cut]


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """EOS of the tokenizer and generation config, plus the chat end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in STOP_TOKENS if token in vocab)
    return sorted(ids)


@torch.no_grad()
def generate_sample(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int = 40) -> str:
    """Greedy continuation of the prompt, special tokens kept so the stop token shows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    try:
        with regional_compile.eager():  # a compiled backend's layers would recompile on every new cache length
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 eos_token_id=stop_token_ids(tokenizer, model),
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        if was_training:
            model.train()
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=False)
