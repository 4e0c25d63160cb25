"""The first example as training sees it: masked tokens dim, trained tokens highlighted."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class ExampleView(Static):
    DEFAULT_CSS = """
    ExampleView { height: auto; border: round $secondary; padding: 0 1; }
    """

    def show(self, example: dict | None) -> None:
        self.border_title = f"first example ({example['where']})" if example else "first example"
        self.update(render_example(example))


def render_example(example: dict | None) -> Text:
    if not example:
        return Text("nothing to show", style="dim")
    text = Text()
    for seg in example["segments"]:
        text.append(seg["text"], style="bold green" if seg["trained"] else "dim")
    text.append("\n")
    text.append("■ trained", style="bold green")
    text.append("  ")
    text.append("■ masked (no loss)", style="dim")
    if "trained_tokens" in example:
        text.append(f"  · {example['trained_tokens']} of {example['tokens']} tokens trained")
    return text
