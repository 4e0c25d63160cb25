"""``tui-finetune chat`` and ``tui-finetune export`` on a tiny finished run (tests/export_support.py):
one answer that stops, each export target written, checked and reported with how to use it, and a
run without an adapter refused with the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export_support import make_finished_run
from tui_finetune.cli import main
from tui_finetune.core.export_spec import read_exports
from tui_finetune.core.run_folder.info import update_run_info
from tui_finetune.core.run_folder.layout import ADAPTER_DIR


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    return make_finished_run(tmp_path_factory.mktemp("cli-run"), "llama")


def test_chat_prompt_prints_one_answer_that_stops(cli_run, capsys):
    assert main(["chat", str(cli_run), "--prompt", "What is 3 + 2?", "--max-new-tokens", "40"]) == 0
    tuned = capsys.readouterr()
    assert tuned.out.strip()
    assert "cut at" not in tuned.err  # it reached an end token before 40 tokens
    assert main(["chat", str(cli_run), "--base", "--prompt", "What is 3 + 2?", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out != tuned.out  # the base (adapter off) answers differently


@pytest.mark.parametrize("target, quant, uses", [
    ("adapter", "f16", "PeftModel.from_pretrained"),
    ("merged", "f16", "AutoModelForCausalLM.from_pretrained"),
    ("gguf", "f16", "llama-cli -m"),
    ("ollama", "q8_0", "ollama create"),
])
def test_export_writes_checks_and_says_how_to_use_each_target(cli_run, capsys, target, quant, uses):
    assert main(["export", str(cli_run), "--to", target, "--quant", quant]) == 0
    out = capsys.readouterr()
    result = next(r for r in read_exports(cli_run) if r.target == target)
    assert result.passed and result.checks and Path(result.path).exists()
    assert "passed its checks" in out.out and result.path in out.out
    for check in result.checks:  # every recorded check is shown with its verdict
        assert f"[{'skip' if check.skipped else 'ok'}] {check.name}: {check.detail}" in out.out
    assert uses in out.out
    assert "measuring the fine-tune" in out.err  # progress went to stderr


def test_a_run_without_an_adapter_is_refused_with_the_fix(cli_run, tmp_path, capsys):
    unfinished = Path(shutil.copytree(cli_run, tmp_path / "unfinished"))
    shutil.rmtree(unfinished / ADAPTER_DIR)
    shutil.rmtree(unfinished / "exports", ignore_errors=True)  # the earlier tests exported cli_run
    update_run_info(unfinished, state="interrupted")
    assert main(["chat", str(unfinished), "--prompt", "hi"]) == 1
    out = capsys.readouterr()
    assert "has no adapter yet" in out.err and not out.out  # stdout carries only answers
    assert main(["export", str(unfinished), "--to", "merged"]) == 1
    out = capsys.readouterr()
    assert "has no adapter yet" in out.out and "resume" in out.out
    assert not (unfinished / "exports").exists()


def test_gpu_chat_export_script_runs_each_step_and_prints_export_json(tmp_path):
    """benchmarks/chat_export_gpu.sh on the CPU with a tiny run: the lead's GPU script works before the GPU."""
    import json
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    run = make_finished_run(home, "llama")  # its runs/ folder is home/runs, as under TUI_FINETUNE_HOME
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TUI_FINETUNE_HOME": str(home), "PYTHON": sys.executable, "PYTHONPATH": str(root),
           "LOG": str(tmp_path / "log.txt")}
    done = subprocess.run(["bash", str(root / "benchmarks" / "chat_export_gpu.sh"), "last", "What is 3 + 2?"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("chat (fine-tune)", "chat (base)", "export merged"):
        assert f"### {step}: exit 0, " in done.stdout
    recorded = json.loads(done.stdout.split("export.json\n", 1)[1])["exports"]
    assert [(r["target"], r["passed"]) for r in recorded] == [("merged", True)]
    assert (tmp_path / "log.txt").read_text() == done.stdout
    assert (run / "exports" / "merged").is_dir()


def test_a_run_trained_by_the_worker_chats_and_exports_a_checked_gguf(tmp_path, capsys):
    """Issue 12's Done-means on a run our own worker trained (the other tests use a hand-made adapter):
    what the trainer leaves in adapter/ is all that chat and export need."""
    from engine_runs import start, tiny_recipe, wait_for_end
    from export_support import build_tiny_model, write_chat_data

    base = build_tiny_model(tmp_path / "base", "llama")
    # a gentle rate: the tiny model's end-of-turn channel is a lever training pulls first (2e-3 ends every turn at once)
    recipe = tiny_recipe(base, train={"max_steps": 4, "learning_rate": 1e-4})
    run = start(recipe, write_chat_data(tmp_path / "chat.jsonl", rows=16), tmp_path / "home")
    assert wait_for_end(run, timeout=300) == "completed", (run / "worker.log").read_text()[-3000:]

    assert main(["chat", str(run), "--prompt", "What is 3 + 2?", "--max-new-tokens", "40"]) == 0
    answer = capsys.readouterr()
    assert answer.out.strip() and "cut at" not in answer.err
    assert main(["export", str(run), "--to", "gguf"]) == 0
    result = next(r for r in read_exports(run) if r.target == "gguf")
    checks = {c.name: c for c in result.checks}
    assert result.passed and not checks["transformers reload: greedy replies match"].skipped
    assert checks["transformers reload: greedy replies match"].passed and checks["does it stop"].passed
