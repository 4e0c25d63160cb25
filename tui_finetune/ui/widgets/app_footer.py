"""The footer every screen shows, tightened below 120 columns.

Textual's footer clips what doesn't fit, and the app's own keys come after the screen's: at 80 columns the
Runs screen lost ``^q Quit`` and the monitor cut ``f2 Runs`` in half; at 100 the live monitor cut
``^t Theme``. Below ``COMPACT_BELOW`` columns the footer is compact (less space between keys), and below
``PALETTE_FROM`` it also leaves out the ``^p palette`` hint (Ctrl+P still opens the palette).
"""

from __future__ import annotations

from textual import events
from textual.widgets import Footer

COMPACT_BELOW = 120
PALETTE_FROM = 100


class AppFooter(Footer):
    def on_resize(self, event: events.Resize) -> None:
        compact, palette = event.size.width < COMPACT_BELOW, event.size.width >= PALETTE_FROM
        if (self.compact, self.show_command_palette) == (compact, palette):
            return
        self.compact, self.show_command_palette = compact, palette
        self.call_after_refresh(self.recompose)
