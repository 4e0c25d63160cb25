"""The wizard and ``tui-finetune train`` launch through ``core.run_folder.control.launch_run``, which settles the
recipe (precision for this machine, an absolute local model path) for both: the same choices store
the same recipe.toml, wherever the run was started. The worker is not started here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui_finetune.cli import main
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.run_folder import control
from tui_finetune.core.run_folder.layout import RECIPE_FILE
from tui_finetune.core.run_folder.listing import list_runs
from test_ui_snapshots import SIZE, to_dataset, wait_for
from ui_support import REPO, build_app, no_gpu_report, run_async, ui_home  # noqa: F401 - ui_home is a fixture


@pytest.fixture
def no_worker(monkeypatch):
    monkeypatch.setattr(control, "start_worker_detached", lambda run_dir, env=None: 0)


def stored_recipe(run_dir: Path) -> str:
    """recipe.toml without its header comment (that names the run)."""
    text = (run_dir / RECIPE_FILE).read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


@run_async
async def test_the_wizard_and_the_cli_store_the_same_recipe(ui_home, no_worker):
    data = "recipes/demo-cpu.jsonl"
    app = build_app(hardware=no_gpu_report(), launcher=control.launch_run)
    async with app.run_test(size=SIZE) as pilot:
        await to_dataset(pilot, data)  # the CPU demo, as the model screen offers it
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "LaunchScreen")
        app.screen.action_next()
        await wait_for(pilot, lambda: len(list_runs()) == 1)
    [wizard_run] = list_runs()

    assert main(["train", "demo-cpu", "--data", data, "--detach"]) == 0
    [cli_run] = [r for r in list_runs() if r.run_id != wizard_run.run_id]
    assert stored_recipe(wizard_run.run_dir) == stored_recipe(cli_run.run_dir)
    stored = load_recipe(cli_run.run_dir / RECIPE_FILE)
    assert stored.train.precision != "auto"  # resolved for this machine, in both


def test_a_relative_local_model_folder_is_stored_absolute(ui_home, no_worker, tmp_path):
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.toml")
    recipe.model = "tests/data/tokenizers/qwen2.5-chatml"  # relative to the repository (the working folder)
    run_dir = control.launch_run(recipe, REPO / "recipes" / "demo-cpu.jsonl")
    stored = load_recipe(run_dir / RECIPE_FILE)
    assert stored.model == str(REPO / "tests/data/tokenizers/qwen2.5-chatml")
