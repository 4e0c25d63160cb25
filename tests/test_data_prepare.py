"""prepare_datasets: tokenized Arrow datasets, a seeded split, sample ids and the data hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.errors import DataError
from tui_finetune.data.prepare import hash_data_files, prepare_datasets
from tui_finetune.data.render import IGNORE_INDEX


def test_prepare_gives_masked_tokenized_rows_with_stable_sample_ids(data_dir: Path, data_qwen_tokenizer,
                                                                    tmp_path: Path) -> None:
    path = data_dir / "samples" / "instructions.messages.jsonl"
    data = prepare_datasets(path, data_qwen_tokenizer, DataSpec(seq_len=512, eval_split=0.05), seed=3, cache_dir=tmp_path)
    assert set(data.train.column_names) == {"input_ids", "labels", "length", "sample_id"}
    assert (len(data.train), len(data.eval)) == (228, 12)
    ids = sorted(list(data.train["sample_id"]) + list(data.eval["sample_id"]))
    assert ids == list(range(240))
    row = data.train[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert IGNORE_INDEX in row["labels"] and any(label != IGNORE_INDEX for label in row["labels"])
    assert data.truncated == 0 and data.report.kept == 240 and data.template.name == "tokenizer"
    assert data.stats.eos == {"template": 240}


def test_the_split_is_deterministic_from_the_seed(data_dir: Path, data_qwen_tokenizer, tmp_path: Path) -> None:
    path = data_dir / "samples" / "instructions.alpaca.jsonl"
    spec = DataSpec(seq_len=512, eval_split=0.1)
    a = prepare_datasets(path, data_qwen_tokenizer, spec, seed=1, cache_dir=tmp_path)
    b = prepare_datasets(path, data_qwen_tokenizer, spec, seed=1, cache_dir=tmp_path)
    c = prepare_datasets(path, data_qwen_tokenizer, spec, seed=2, cache_dir=tmp_path)
    assert list(a.eval["sample_id"]) == list(b.eval["sample_id"]) != list(c.eval["sample_id"])
    assert list(a.train["input_ids"]) == list(b.train["input_ids"])
    no_eval = prepare_datasets(path, data_qwen_tokenizer, DataSpec(seq_len=512, eval_split=0.0), seed=1, cache_dir=tmp_path)
    assert no_eval.eval is None and len(no_eval.train) == 240


def test_a_separate_validation_file_is_the_eval_set(data_dir: Path, data_qwen_tokenizer, tmp_path: Path) -> None:
    data = prepare_datasets(data_dir / "samples" / "instructions.alpaca.jsonl", data_qwen_tokenizer, DataSpec(),
                            seed=1, validation_path=data_dir / "broken" / "bom_crlf.jsonl", cache_dir=tmp_path)
    assert (len(data.train), len(data.eval)) == (240, 4)
    assert data.eval_report is not None and data.eval_report.kept == 4


def test_truncation_is_counted_and_warned(data_dir: Path, data_qwen_tokenizer, tmp_path: Path) -> None:
    path = data_dir / "samples" / "instructions.sharegpt.json"
    data = prepare_datasets(path, data_qwen_tokenizer, DataSpec(seq_len=80), seed=0, cache_dir=tmp_path)
    assert data.truncated == 56
    assert max(data.train["length"]) == 80
    assert data.warnings[0].startswith("56 row(s) are longer than data.seq_len = 80 tokens and were truncated")


def test_refused_data_raises_the_full_file_line_message(data_dir: Path, data_qwen_tokenizer, tmp_path: Path) -> None:
    path = data_dir / "broken" / "type_change.jsonl"
    with pytest.raises(DataError) as err:
        prepare_datasets(path, data_qwen_tokenizer, DataSpec(), seed=0, cache_dir=tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0] == (f"{path}:3: field 'output' is a number here but text on line 1: "
                        "make 'output' a string in every row (put it in quotes)")
    assert lines[-1].startswith("refused: 33.3% of the rows would be dropped")
    assert isinstance(err.value, ValueError)
    data = prepare_datasets(path, data_qwen_tokenizer, DataSpec(eval_split=0), seed=0, allow_drop=True, cache_dir=tmp_path)
    assert list(data.train["sample_id"]) == [0, 1]


def test_rows_whose_prompt_fills_the_sequence_count_as_dropped(data_dir: Path, data_qwen_tokenizer,
                                                                 tmp_path: Path) -> None:
    path = data_dir / "samples" / "instructions.sharegpt.json"
    with pytest.raises(DataError) as err:
        prepare_datasets(path, data_qwen_tokenizer, DataSpec(seq_len=64), seed=0, cache_dir=tmp_path)
    assert "dropped 22 (prompt-too-long: 22)" in str(err.value)
    assert str(err.value).splitlines()[0].endswith("the prompt alone is longer than the 64-token sequence length, "
                                                   "so nothing is left to train on: shorten the prompt or raise data.seq_len")
    data = prepare_datasets(path, data_qwen_tokenizer, DataSpec(seq_len=64), seed=0, allow_drop=True, cache_dir=tmp_path)
    assert len(data.train) + len(data.eval) == 218


def test_the_data_hash_follows_the_content_not_the_path(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "samples" / "instructions.alpaca.jsonl"
    copy = tmp_path / "instructions.alpaca.jsonl"
    shutil.copy(source, copy)
    assert hash_data_files(source) == hash_data_files(copy)
    assert len(hash_data_files(source)) == 64
    with copy.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "One more.", "output": "Done."}) + "\n")
    assert hash_data_files(source) != hash_data_files(copy)
    assert hash_data_files(source) != hash_data_files(source, validation_path=copy)


def test_an_unknown_template_name_is_a_data_error(data_dir: Path, data_qwen_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.template = 'vicuna' is not a known template"):
        prepare_datasets(data_dir / "samples" / "instructions.txt", data_qwen_tokenizer, DataSpec(template="vicuna"),
                         seed=0, cache_dir=tmp_path)
