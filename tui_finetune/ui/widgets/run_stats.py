"""Step and epoch progress, speed, ETA, learning rate, the batch in effect and the last checkpoint of a run."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from tui_finetune.ui.durations import format_duration
from tui_finetune.ui.run_tail import MonitorSnapshot, checkpoint_age


class RunStats(Vertical):
    DEFAULT_CSS = """
    RunStats { height: auto; border: round $primary; padding: 0 1; }
    RunStats Horizontal { height: 1; }
    RunStats Label.bar-label { width: 7; }
    RunStats ProgressBar { width: 1fr; }
    RunStats ProgressBar Bar { width: 1fr; }
    """

    def compose(self) -> ComposeResult:
        self.border_title = "progress"
        with Horizontal():
            yield Label("step", classes="bar-label")
            yield ProgressBar(total=1, show_eta=False, id="step-bar")
        with Horizontal(id="epoch-row"):
            yield Label("epoch", classes="bar-label")
            yield ProgressBar(total=1, show_eta=False, id="epoch-bar")
        yield Static("", id="stats-line")

    def show(self, snap: MonitorSnapshot, now: float) -> None:
        steps = self.query_one("#step-bar", ProgressBar)
        steps.update(total=max(snap.total_steps, 1), progress=snap.step)
        epochs = self.query_one("#epoch-bar", ProgressBar)
        total_epochs = snap.total_epochs or (snap.epoch * snap.total_steps / snap.step if snap.step else 1.0)
        epochs.update(total=max(total_epochs, 1e-9), progress=min(snap.epoch, total_epochs))
        line = Text()
        line.append(f"step {snap.step}/{snap.total_steps or '?'}", style="bold")
        line.append(f" · epoch {snap.epoch:.2f}")
        line.append(f" · loss {snap.loss:.4f}" if snap.loss is not None else " · loss -")
        line.append(f" · {snap.tokens_per_s:,.0f} tok/s" if snap.tokens_per_s else " · - tok/s")
        line.append(f" · ETA {format_duration(snap.eta_s)}")
        line.append(f" · lr {snap.lr:.2e}" if snap.lr is not None else " · lr -")
        if snap.micro_batch:  # as recipe.toml has it: an OOM's smaller micro-batch shows here
            line.append(f"\nmicro-batch {snap.micro_batch} × accumulation {snap.grad_accum}")
            if snap.devices > 1:  # a multi-GPU run: every process trains its share of each step
                unit = "GPUs" if snap.gpu_rows else "processes"
                line.append(f" × {snap.devices} {unit} = {snap.effective_batch} sequences a step")
        line.append(f"\ncheckpoint: {checkpoint_age(snap, now)}")
        self.query_one("#stats-line", Static).update(line)
