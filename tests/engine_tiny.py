"""A tiny Llama and a character-level tokenizer built locally, for engine tests that must stay offline.

The tokenizer has a chat template (ChatML-style, with ``<|im_end|>`` as the end of a turn), so the
data pipeline renders conversations exactly as it would for a real chat model.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - {" "}) + ["▁", "÷", "×", "á", "í", "é", "ó", "ú", "ñ"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Replace("▁", " ")
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with hidden size 64 and random weights, saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_alpaca(path: Path, rows: int = 24) -> Path:
    """Arithmetic in a fixed answer shape: easy to learn, so the loss falls within a few steps."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            a, b = 3 + i, 7 + 2 * i
            handle.write(json.dumps({"instruction": f"What is {a} + {b}?", "input": "",
                                     "output": f"{a} + {b} = {a + b}"}) + "\n")
    return path
