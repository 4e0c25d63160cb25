"""Modal dialogs that return typed results (frogmouth's pattern): confirm -> bool, save-as -> path or None."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question; ``y`` answers yes, ``n``/Escape no, Enter the focused button: yes, unless
    ``default_yes`` is False for a question where a stray Enter must not start anything."""

    DEFAULT_CSS = """
    ConfirmDialog { align: center middle; }
    ConfirmDialog > Vertical { width: 64; max-width: 90%; height: auto; border: thick $primary;
                               background: $surface; padding: 1 2; }
    ConfirmDialog Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmDialog Button { margin-left: 2; }
    """
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No", default_yes: bool = True) -> None:
        super().__init__()
        self.question, self.yes, self.no, self.default_yes = question, yes, no, default_yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, id="question")
            with Horizontal():
                yield Button(f"{self.no} (n)", id="no")
                yield Button(f"{self.yes} (y)", id="yes", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#yes" if self.default_yes else "#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class SaveRecipeDialog(ModalScreen["str | None"]):
    """Ask where to save the recipe TOML; Enter saves, Escape cancels."""

    DEFAULT_CSS = """
    SaveRecipeDialog { align: center middle; }
    SaveRecipeDialog > Vertical { width: 72; max-width: 95%; height: auto; border: thick $primary;
                                  background: $surface; padding: 1 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default_path: str) -> None:
        super().__init__()
        self.default_path = default_path

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Save the recipe as (TOML):")
            yield Input(self.default_path, id="save-path")
            yield Static("Enter saves · Escape cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
