"""The wizard's breadcrumb: which of the five steps you are on, so Escape and Ctrl+N never surprise."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

STEPS = ("Hardware", "Model", "Recipe", "Dataset", "Launch")


class WizardSteps(Static):
    DEFAULT_CSS = """
    WizardSteps { height: 1; padding: 0 1; background: $boost; }
    """

    def __init__(self, current: int) -> None:
        super().__init__()
        self.current = current

    def render(self) -> Text:
        text = Text()
        for i, name in enumerate(STEPS):
            if i:
                text.append(" › ", style="dim")
            style = "bold reverse" if i == self.current else ("" if i < self.current else "dim")
            text.append(f" {i + 1} {name} ", style=style)
        return text
