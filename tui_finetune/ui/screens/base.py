"""The wizard's common frame: the step breadcrumb, Escape for back and Ctrl+N for next, and the footer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Header

from tui_finetune.ui.widgets.app_footer import AppFooter
from tui_finetune.ui.widgets.wizard_steps import WizardSteps

if TYPE_CHECKING:
    from tui_finetune.ui.app import AppContext, TuiFinetuneApp, WizardState


class WizardScreen(Screen):
    STEP = 0
    BINDINGS = [Binding("escape", "back", "Back"), Binding("ctrl+n", "next", "Next", priority=True)]

    def compose(self) -> ComposeResult:
        yield Header()
        yield WizardSteps(self.STEP)
        yield from self.compose_body()
        yield AppFooter()

    def compose_body(self) -> ComposeResult:
        yield from ()

    @property
    def tui(self) -> TuiFinetuneApp:
        return self.app  # type: ignore[return-value]

    @property
    def state(self) -> WizardState:
        return self.tui.state

    @property
    def context(self) -> AppContext:
        return self.tui.context

    def action_back(self) -> None:
        if self.STEP > 0:
            self.app.pop_screen()

    def action_next(self) -> None:  # each step overrides
        pass
