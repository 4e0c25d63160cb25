"""The Textual app: ``tui-finetune`` with no arguments. ``make_app`` builds it, so tests and benchmarks
pass their own hardware report, clock, launcher and data checker (posting's ``make_posting`` pattern).

Two modes with their own screen stacks: ``wizard`` (hardware -> model -> recipe -> dataset -> launch)
and ``runs`` (the runs list, with a run's monitor or logs on top). Imports core only: never torch and
never the engine; training runs in a detached worker process that outlives the app.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from tui_finetune.core.chat_client import ChatClient
from tui_finetune.core.hardware import GpuInfo, HardwareReport
from tui_finetune.core.run_folder.control import launch_run, resume_run
from tui_finetune.core.preferences import Preferences, load_preferences, save_preferences
from tui_finetune.core.recipe import DataSpec, RecipeSpec
from tui_finetune.core.event_text import resume_wording
from tui_finetune.core.run_folder.listing import list_runs
from tui_finetune.core.run_folder.resume import resume_step
from tui_finetune.core.suggest import CardSpec, RecipePlan
from tui_finetune.ui.run_tail import GpusSampler, VramSampler
from tui_finetune.ui.screens.dataset import run_data_check
from tui_finetune.ui.screens.hardware import HardwareScreen
from tui_finetune.ui.screens.runs import RunsScreen


def nvml_sampler() -> tuple[float, float] | None:
    """The best GPU's used and total memory in MB, from NVML; None without a GPU."""
    from tui_finetune.core.hardware import best_gpu, detect_hardware

    gpu = best_gpu(detect_hardware())
    return None if gpu is None else (gpu.used_bytes / 2**20, gpu.total_bytes / 2**20)


def nvml_gpus() -> list[GpuInfo]:
    """Every NVIDIA card NVML sees now (none without a GPU): a multi-GPU run's monitor rows."""
    from tui_finetune.core.hardware import detect_hardware

    return detect_hardware().gpus


@dataclass
class AppContext:
    """Everything the app reaches outside itself; tests replace any part."""

    hardware: HardwareReport | None = None
    """A fixed report (tests, snapshots); None asks NVML in a worker."""
    clock: Callable[[], float] = time.time
    vram_sampler: VramSampler | None = nvml_sampler
    gpus_sampler: GpusSampler | None = nvml_gpus
    """Asked instead of ``vram_sampler`` while a run on several GPUs is live."""
    launcher: Callable[[RecipeSpec, str], Path] = launch_run
    resumer: Callable[[Path], int] = resume_run
    data_checker: Callable[[str, DataSpec, str], dict] = run_data_check
    """(data path, the recipe's [data] table, model) -> the data check's JSON object."""
    chat_client: Callable[[Path], ChatClient] = ChatClient
    """Starts the chat worker process for a run (screens/chat.py); snapshots pass a scripted one."""
    poll_interval: float = 0.25
    offer_on_start: bool = True
    """Offer to reattach to a running run, or resume an interrupted one, on start-up."""


@dataclass
class WizardState:
    """The choices made so far; the wizard's screens read and write it."""

    report: HardwareReport | None = None
    planned_gb: float | None = None
    card: CardSpec | None = None
    recipe: RecipeSpec | None = None
    base_recipe: RecipeSpec | None = None
    plan: RecipePlan | None = None
    recipe_problem: str = ""
    data_path: str = ""
    data_result: dict | None = field(default=None)


class TuiFinetuneApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "tui-finetune"
    SUB_TITLE = "fine-tune an LLM on your own GPU"
    MODES = {"wizard": HardwareScreen, "runs": RunsScreen}
    BINDINGS = [Binding("f2", "show_runs", "Runs"), Binding("f3", "new_finetune", "New"),
                Binding("ctrl+t", "toggle_theme", "Theme"), Binding("ctrl+q", "quit", "Quit", priority=True),
                Binding("q", "quit", "Quit", show=False)]
    """``ctrl+q`` quits anywhere and every footer shows it; ``q`` quits wherever no text field has focus
    (a focused Input takes the letter as typing before any non-priority binding sees it)."""

    def __init__(self, context: AppContext | None = None, preferences: Preferences | None = None) -> None:
        super().__init__()
        self.context = context or AppContext()
        self.preferences = preferences or load_preferences()
        self.state = WizardState(report=self.context.hardware)

    def on_mount(self) -> None:
        self.theme = self.preferences.theme
        self.switch_mode("wizard")
        if self.context.offer_on_start:
            self.offer_runs()

    # ------------------------------------------------------------ start-up offer

    def offer_runs(self) -> None:
        """Reattach to the newest running run, or else offer to resume the newest interrupted one."""
        from tui_finetune.ui.screens.dialogs import ConfirmDialog

        runs = list_runs()
        running = [r for r in runs if r.state in ("running", "stopping")]
        interrupted = [r for r in runs if r.state == "interrupted"]
        if running:
            run = running[-1]
            question = (f"Run [b]{run.run_id}[/b] is training (step {run.step} of {run.total_steps or '?'}).\n"
                        "Reattach to its live view?")
            self.push_screen(ConfirmDialog(question, yes="Reattach", no="Not now"),
                             lambda yes: self.open_monitor(run.run_dir) if yes else None)
        elif interrupted and interrupted[-1].run_id not in self.preferences.declined_resumes:
            run = interrupted[-1]
            question = (f"Run [b]{run.run_id}[/b] was interrupted. Resume it now? It "
                        f"{resume_wording(resume_step(run.run_dir))}.")
            self.push_screen(ConfirmDialog(question, yes="Resume", no="Not now", default_yes=False),
                             lambda yes: self.answer_resume_offer(run.run_dir, bool(yes)))

    def answer_resume_offer(self, run_dir: Path, yes: bool) -> None:
        """Resume, or remember "Not now" for this run so the offer doesn't come back on every start."""
        if yes:
            self.resume_and_open(run_dir)
            return
        if run_dir.name not in self.preferences.declined_resumes:
            self.preferences.declined_resumes.append(run_dir.name)
            save_preferences(self.preferences)
        self.notify(f"Not resuming {run_dir.name}; resume it any time from the Runs list (F2, then r).")

    # ------------------------------------------------------------ navigation

    def open_monitor(self, run_dir: Path, from_wizard: bool = False) -> None:
        """Show a run's monitor on top of the runs list; a launch also resets the wizard for next time."""
        from tui_finetune.ui.screens.monitor import MonitorScreen

        self.show_runs()
        if from_wizard:
            self.remove_mode("wizard")
            self.add_mode("wizard", HardwareScreen)
            self.state = WizardState(report=self.state.report, planned_gb=self.state.planned_gb)
        self.push_screen(MonitorScreen(run_dir))

    def resume_and_open(self, run_dir: Path) -> None:
        step = resume_step(run_dir)
        try:
            self.context.resumer(run_dir)
        except Exception as err:  # noqa: BLE001 - a failed resume is a message
            self.notify(f"Could not resume {run_dir.name}: {err}", severity="error")
            return
        self.notify(f"Resuming {run_dir.name}: it {resume_wording(step)}")
        self.open_monitor(run_dir)

    def show_runs(self) -> None:
        self.switch_mode("runs")
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def new_finetune(self) -> None:
        self.switch_mode("wizard")

    def action_show_runs(self) -> None:
        self.show_runs()

    def action_new_finetune(self) -> None:
        self.new_finetune()

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"
        self.preferences.theme = self.theme
        save_preferences(self.preferences)

    async def action_quit(self) -> None:
        """Quit; training runs on in its own process, and the message on exit says so."""
        running = [r.run_id for r in list_runs() if r.state in ("running", "stopping")]
        message = None
        if running:
            message = (f"Training continues in the background: {', '.join(running)}.\n"
                       "Run tui-finetune again to reattach, or 'tui-finetune runs' to list runs.")
        self.exit(message=message)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Runs", "All runs, with their state (F2)", self.show_runs)
        yield SystemCommand("New fine-tune", "Start the wizard (F3)", self.new_finetune)
        yield SystemCommand("Toggle light/dark", "Switch theme and remember it (Ctrl+T)", self.action_toggle_theme)


def make_app(context: AppContext | None = None, preferences: Preferences | None = None) -> TuiFinetuneApp:
    """Build the app; tests pass a context with fake hardware, a fixed clock and their own launcher."""
    return TuiFinetuneApp(context, preferences)


def run_app() -> int:
    """``tui-finetune`` with no arguments."""
    app = make_app()
    app.run()
    return app.return_code or 0
