"""``tui-finetune data check``: the dataset doctor's report on every sample file, and on bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from rich.console import Console

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.check import check_dataset, length_stats
from tui_finetune.cli.data import print_result, run_data_check_command

REPO = Path(__file__).resolve().parents[1]
SAMPLES = {
    "instructions.alpaca.jsonl": "alpaca", "instructions.alpaca.json": "alpaca", "instructions.alpaca.tsv": "alpaca",
    "instructions.sharegpt.json": "sharegpt", "instructions.messages.jsonl": "messages",
    "instructions.messages.parquet": "messages", "instructions.prompt_completion.csv": "prompt_completion",
    "instructions.txt": "text", "instructions.md": "text",
}


def args(file: Path, **kw: object) -> Namespace:
    base = {"file": str(file), "model": None, "seq": 1024, "format": "auto", "columns": None, "validation": None,
            "allow_drop": False}
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_data_check_reports_each_sample_file_in_under_5_seconds(data_dir: Path, name: str, capsys) -> None:
    model = str(data_dir / "tokenizers" / "qwen2.5-chatml")
    start = time.perf_counter()
    rc = run_data_check_command(args(data_dir / "samples" / name, model=model))
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 0, out
    assert elapsed < 5
    assert f"Format    {SAMPLES[name]} (" in out
    assert "Rows      kept 240 of 240; dropped none" in out
    assert "Lengths   tokens per row over 240 rows: min " in out
    assert "cutoff 1024: above the longest row" in out and "0 row(s) over the 1024-token cutoff" in out
    first_line = {"instructions.alpaca.tsv": 2, "instructions.prompt_completion.csv": 2,  # after the header
                  "instructions.sharegpt.json": 2, "instructions.alpaca.json": 3}.get(name, 1)  # first element
    assert f"First example ({data_dir / 'samples' / name}:{first_line})" in out
    assert "EOS       ✓ 240 row(s)" in out and "it is trained, so the model learns to stop" in out
    assert out.rstrip().endswith("✓ usable: 240 rows ready for training")


def test_the_cli_runs_data_check_end_to_end_quickly_without_torch(data_dir: Path) -> None:
    sample = data_dir / "samples" / "instructions.txt"
    code = ("import sys; from tui_finetune.cli import main; rc = main(sys.argv[1:]); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "data", "check", str(sample), "--model",
                           str(data_dir / "tokenizers" / "llama-3"), "--seq", "30"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert elapsed < 5, elapsed
    assert "◀ cutoff 30: longer rows are truncated" in done.stdout
    assert "36 row(s) over the 30-token cutoff (will be truncated)" in done.stdout
    assert ("EOS       ! 240 row(s) get EOS '<|eot_id|>' (id 4) appended after the reply; it is trained, so the "
            "model learns to stop. 36 row(s) are over the cutoff and lose their EOS when truncated") in done.stdout
    assert done.stdout.rstrip().endswith("no torch")


def test_without_a_model_the_byte_level_stand_in_is_named(data_dir: Path, capsys) -> None:
    assert run_data_check_command(args(data_dir / "samples" / "instructions.txt")) == 0
    out = capsys.readouterr().out
    assert "Tokenizer byte-level stand-in (1 token = 1 byte; pass --model for real token counts)" in out
    assert "Template  chatml (default: the tokenizer has no chat template)" in out


def test_a_model_missing_from_the_cache_says_how_to_get_it_and_falls_back(data_dir: Path, tmp_path: Path) -> None:
    from tui_finetune.core.catalog import CATALOG

    key = next(iter(CATALOG))
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tui_finetune.cli", "data", "check",
                           str(data_dir / "samples" / "instructions.alpaca.jsonl"), "--model", key],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    hub_id = CATALOG[key].hub_id
    assert done.stdout.startswith(f"warning: {key}: the tokenizer of {hub_id} is not in the Hugging Face cache: "
                                  f"download it with 'hf download {hub_id}")
    assert "Tokenizer byte-level stand-in" in done.stdout and done.returncode == 0


def test_broken_data_prints_the_problems_and_is_refused(data_dir: Path, capsys) -> None:
    path = data_dir / "broken" / "unknown_role.jsonl"
    assert run_data_check_command(args(path)) == 1
    out = capsys.readouterr().out
    assert (f"  {path}:2: turn 1 has an unknown role 'narrator': use system, user or assistant "
            "(ShareGPT: system, human, gpt)") in out
    assert "Rows      kept 1 of 2; dropped 1 (unknown-role 1)" in out
    assert "✗ refused: 50.0% of the rows would be dropped" in out
    assert run_data_check_command(args(path, allow_drop=True)) == 0


def test_unreadable_paths_and_folders_are_refused_with_the_message(data_dir: Path, capsys) -> None:
    folder = data_dir / "broken" / "mixed_folder"
    assert run_data_check_command(args(folder)) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{folder}: mixed file types in one folder (.csv: 1 file, .jsonl: 1 file)")
    assert run_data_check_command(args(data_dir / "nope.jsonl")) == 1
    assert "nope.jsonl: no such file or folder: check the path" in capsys.readouterr().out


def test_columns_and_a_validation_file_are_used(data_dir: Path, tmp_path: Path, capsys) -> None:
    path = data_dir / "broken" / "wrong_columns.jsonl"
    held_out = tmp_path / "val.jsonl"
    held_out.write_text('{"question": "What is 3 + 3?", "answer": "6", "id": 1}\n', encoding="utf-8")
    rc = run_data_check_command(args(path, columns="prompt=question,reply=answer", validation=str(held_out)))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Columns   prompt=question, reply=answer\n" in out
    assert "Eval rows kept 1 of 1; dropped none" in out
    rc = run_data_check_command(args(path, columns="prompt=question,reply=answer",
                                     validation=str(data_dir / "broken" / "bom_crlf.jsonl")))
    out = capsys.readouterr().out
    assert rc == 1 and "✗ refused: the validation file: no usable rows: fix the problems above" in out


def test_trained_and_masked_tokens_are_styled_differently(data_dir: Path, data_qwen_tokenizer) -> None:
    result = check_dataset(data_dir / "samples" / "instructions.alpaca.jsonl", data_qwen_tokenizer, "qwen",
                           DataSpec(seq_len=1024))
    console = Console(record=True, force_terminal=True, color_system="standard", width=200, file=open(os.devnull, "w"))
    print_result(console, result)
    styled = console.export_text(styles=True)
    assert "\x1b[1;32m64 ÷ 4 = 16<|im_end|>" in styled  # trained: bold green
    assert "\x1b[2m<|im_start|>system" in styled  # masked: dim
    assert result.example is not None and [t for t, trained in result.example.segments if trained] == [
        "64 ÷ 4 = 16<|im_end|>\n"]


def test_length_histogram_bins_cover_every_row_and_count_rows_over_the_cutoff() -> None:
    lengths = [3, 5, 5, 8, 13, 21, 34, 55]
    stats = length_stats(lengths, cutoff=20)
    assert sum(c for _, _, c in stats.bins) == len(lengths)
    assert stats.bins[0][0] == 3 and stats.bins[-1][1] >= 55
    assert all(low <= n <= high for n in lengths for low, high, c in stats.bins if c and low <= n <= high)
    assert (stats.over, stats.min, stats.max, stats.median) == (3, 3, 55, 10)


def test_the_wizard_and_the_cli_give_one_verdict_on_prompts_longer_than_the_sequence(tmp_path: Path, capsys) -> None:
    """The wizard's old check (check_json) had no prompt-too-long rule and passed this file, which the
    command line refused: every prompt outgrows 64 tokens, so nothing would be left to train on."""
    from tui_finetune.data.check_json import check

    path = tmp_path / "long_prompts.jsonl"
    rows = [{"instruction": f"question {i}: " + "tell me more about this " * 12, "input": "", "output": "ok"}
            for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    wizard = check(str(path), DataSpec(seq_len=64), None)
    assert run_data_check_command(args(path, seq=64)) == 1
    cli_out = capsys.readouterr().out
    assert wizard["refused"] and wizard["refusal"]
    assert " ".join(wizard["refusal"].split()) in " ".join(cli_out.split())
    assert any("the prompt alone is longer than the 64-token sequence length" in p for p in wizard["problems"])
