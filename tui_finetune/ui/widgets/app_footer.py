"""The footer every screen shows, tightened below 100 columns.

At 80 columns Textual's footer clips what doesn't fit, and the app's own keys come after the screen's:
the Runs screen lost ``^q Quit`` and the monitor cut ``f2 Runs`` in half. Below ``NARROW_COLUMNS`` the
footer is compact (less space between keys) and leaves out the ``^p palette`` hint; Ctrl+P still opens
the palette.
"""

from __future__ import annotations

from textual import events
from textual.widgets import Footer

NARROW_COLUMNS = 100


class AppFooter(Footer):
    def on_resize(self, event: events.Resize) -> None:
        narrow = event.size.width < NARROW_COLUMNS
        if self.compact == narrow and self.show_command_palette != narrow:
            return
        self.compact = narrow
        self.show_command_palette = not narrow
        self.call_after_refresh(self.recompose)
