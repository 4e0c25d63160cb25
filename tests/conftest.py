"""Shared pytest fixtures. Each group of tests names its fixtures with its own prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"


# ---------------------------------------------------------------- data_ fixtures (tests/test_data_*.py)

@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: samples/, broken/, tokenizers/, templates/."""
    return DATA_DIR


@pytest.fixture(scope="session")
def data_qwen_tokenizer():
    """Tiny local BPE with Qwen2.5-Instruct's real chat template (eos <|im_end|>)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(DATA_DIR / "tokenizers" / "qwen2.5-chatml"), local_files_only=True)


@pytest.fixture(scope="session")
def data_llama3_tokenizer():
    """Tiny local BPE with Meta-Llama-3-Instruct's real chat template (bos <|begin_of_text|>, eos <|eot_id|>)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(DATA_DIR / "tokenizers" / "llama-3"), local_files_only=True)
