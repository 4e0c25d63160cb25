"""The tokenizer as GGUF metadata: tokens, scores, types, merges, special ids and the chat template.

Two tokenizer shapes cover the supported models, both read from the run's ``tokenizer.json``:
byte-level BPE (Llama 3, Qwen2, Phi-2: ``tokenizer.ggml.model = gpt2``) and sentencepiece-style
BPE with byte fallback (Gemma, Llama 2, Mistral: ``llama``). The merges, add-BOS/EOS flags and special
ids come from gguf.vocab.SpecialVocab (the code llama.cpp's converter uses); the chat template is the
one the run trained with, and the end-of-turn token is written as EOT so llama.cpp stops there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tui_finetune.core.export_spec import ExportError
from tui_finetune.engine.export.gguf_arch import ArchSpec

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
"""The pre-tokenizer regexes of Llama 3 and Qwen2, by llama.cpp's ``tokenizer.ggml.pre`` name."""


def tokenizer_model(tokenizer_json: dict[str, Any]) -> str:
    """``gpt2`` or ``llama`` (see the module docstring), or ExportError for any other tokenizer."""
    model = tokenizer_json.get("model", {})
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    pre = json.dumps(tokenizer_json.get("pre_tokenizer") or {})
    if model.get("type") == "BPE" and not model.get("byte_fallback") and (decoder == "ByteLevel" or "ByteLevel" in pre):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError(f"GGUF export can't describe this tokenizer ({model.get('type')} model, {decoder} decoder) "
                      "for llama.cpp: export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def bpe_pre(tokenizer_json: dict[str, Any], arch: ArchSpec) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE: read from its own pre-tokenizer
    (a tokenizer's regex decides its tokens, whatever the architecture), else the architecture's usual one."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            pattern = (part.get("pattern") or {}).get("Regex")
            return next((name for name, regex in _SPLITS.items() if regex == pattern), arch.bpe_pre)
    if any(part.get("type") == "ByteLevel" and part.get("use_regex", True) for part in parts):
        return "gpt-2"
    return arch.bpe_pre


def write_vocab(writer: Any, arch: ArchSpec, folder: Path, tokenizer: Any, chat_template: str,
                stop_ids: list[int], vocab_size: int) -> None:
    """Add the tokenizer metadata; ``folder`` holds the run's saved tokenizer files."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    kind = tokenizer_model(data)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    special_ids = set(tokenizer.all_special_ids)
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding is larger than the vocabulary (padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            if i in special_ids or added.get(token):
                types.append(gguf.TokenType.CONTROL)
            elif token in added:
                types.append(gguf.TokenType.USER_DEFINED)
            elif kind == "llama" and _BYTE_TOKEN.match(token):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))  # sentencepiece order: earlier pieces merge first
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(bpe_pre(data, arch) if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.chat_template = chat_template
    if tokenizer.pad_token_id is not None:
        special.special_token_ids.setdefault("pad", tokenizer.pad_token_id)
    special.add_to_gguf(writer, quiet=True)
    eot = _end_of_turn(tokenizer, stop_ids)
    if eot is not None:
        writer.add_eot_token_id(eot)


def _end_of_turn(tokenizer: Any, stop_ids: list[int]) -> int | None:
    """The stop token other than EOS that the template ends a turn with (``<|im_end|>``, ``<end_of_turn>``)."""
    others = [i for i in stop_ids if i != tokenizer.eos_token_id]
    return others[0] if others else None
