"""The footer every screen shows, tightened below 120 columns.

Textual's footer clips what doesn't fit, and the app's own keys come after the screen's: at 80 columns the
Runs screen lost ``^q Quit`` and the monitor cut ``f2 Runs`` in half; at 100 the live monitor cut
``^t Theme``. Below ``COMPACT_BELOW`` columns the footer is compact (less space between keys), and below
``PALETTE_FROM`` it also leaves out the ``^p palette`` hint (Ctrl+P still opens the palette). Screens with
many keys of their own (the monitor, the Runs list) name keys to leave out there too: even compact, their last
key, ``^t Theme``, was cut at 80 columns. A key left out of the footer still works.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual import events
from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

COMPACT_BELOW = 120
PALETTE_FROM = 100


class AppFooter(Footer):
    def __init__(self, narrow_hides: Iterable[str] = ()) -> None:
        """``narrow_hides``: actions whose keys the footer leaves out below ``PALETTE_FROM`` columns."""
        super().__init__()
        self.narrow_hides = frozenset(narrow_hides)

    def compose(self) -> ComposeResult:
        hidden = self.narrow_hides if not self.show_command_palette else frozenset()
        for widget in super().compose():
            if isinstance(widget, FooterKey) and widget.action in hidden:
                self.styles.grid_size_columns = max(1, (self.styles.grid_size_columns or 1) - 1)
                continue
            yield widget

    def on_resize(self, event: events.Resize) -> None:
        compact, palette = event.size.width < COMPACT_BELOW, event.size.width >= PALETTE_FROM
        if (self.compact, self.show_command_palette) == (compact, palette):
            return
        self.compact, self.show_command_palette = compact, palette
        self.call_after_refresh(self.recompose)
