"""Step 1: what this machine has. Each GPU with its memory bar, plain-words warnings, and a card size
to plan for instead (for users choosing a GPU, or planning from a laptop)."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Static

from tui_finetune.core.hardware import HardwareReport, detect_hardware
from tui_finetune.ui.messages import HardwareDetected
from tui_finetune.ui.wizard_start import card_from_report
from tui_finetune.ui.screens.base import WizardScreen


class HardwareScreen(WizardScreen):
    """The card-size field has focus from the start: typing goes there, Enter goes on (empty: this machine)."""

    STEP = 0
    BINDINGS = [Binding("ctrl+n", "next", "Next · type GB to plan one", priority=True)]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="hardware-body", classes="wizard-body"):
            yield Static("Looking for GPUs…", id="hw-status")
            yield VerticalScroll(id="gpus")
            yield Static("", id="hw-warnings")
            with Horizontal(classes="form-row"):
                yield Label("Plan for another card (GB):")
                yield Input(placeholder="e.g. 8, 12, 24; empty = this machine", id="plan-gb", type="number")
            yield Static("", id="plan-target")
            yield Button("Next: pick a model (Ctrl+N)", id="next", variant="primary")

    def on_mount(self) -> None:
        if self.state.report is not None:
            self.show_report(self.state.report)
        elif self.context.hardware is not None:
            self.show_report(self.context.hardware)
        else:
            self.detect()

    @work(thread=True, exclusive=True, group="hardware")
    def detect(self) -> None:
        """NVML can take a moment to wake the driver: never on the UI thread."""
        self.post_message(HardwareDetected(detect_hardware()))

    def on_hardware_detected(self, message: HardwareDetected) -> None:
        self.show_report(message.report)

    def show_report(self, report: HardwareReport) -> None:
        from tui_finetune.ui.widgets.gpu_panel import GpuPanel

        self.state.report = report
        status = self.query_one("#hw-status", Static)
        if report.gpus:
            status.update(f"[b]{len(report.gpus)} NVIDIA GPU{'s' if len(report.gpus) > 1 else ''}[/b] · driver "
                          f"{report.driver_version or '?'} · CUDA {report.cuda_driver_version or '?'}")
        else:
            status.update(f"[yellow b]{report.problem or 'No NVIDIA GPU found.'}[/]\nYou can still train the CPU "
                          "demo model, or plan for a card below.")
        gpus = self.query_one("#gpus", VerticalScroll)
        gpus.remove_children()
        gpus.mount_all([GpuPanel(gpu, report) for gpu in report.gpus])
        gpus.display = bool(report.gpus)
        warnings = "\n".join(f"[yellow]⚠ {w}[/]" for w in report.warnings)
        self.query_one("#hw-warnings", Static).update(warnings)
        self.update_target()
        self.query_one("#plan-gb", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        try:
            gb = float(event.value) if event.value.strip() else None
        except ValueError:
            gb = None
        self.state.planned_gb = gb if gb and gb > 0 else None
        self.update_target()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_next()

    def update_target(self) -> None:
        card = card_from_report(self.state.report or HardwareReport(), self.state.planned_gb)
        target = self.query_one("#plan-target", Static)
        if card is None:
            target.update("Planning for: [b]the CPU[/b] (demo model only)")
        else:
            free = f", {card.used_by_others_gib:.1f} GiB used by others" if card.used_by_others_gib >= 0.05 else ""
            target.update(f"Planning for: [b]{card.label}[/b] ({card.total_gib:.1f} GiB{free})")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "next":
            self.action_next()

    def action_next(self) -> None:
        from tui_finetune.ui.screens.model import ModelScreen

        if self.state.report is None:
            self.notify("Still looking for GPUs…")
            return
        self.state.card = card_from_report(self.state.report, self.state.planned_gb)
        self.app.push_screen(ModelScreen())
