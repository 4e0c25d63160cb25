"""The app's remembered choices: the last dataset folder, the theme, and the resumes declined.

They live in ``config_dir()/preferences.json`` (``TUI_FINETUNE_HOME/config`` in tests), so the
file picker opens where the user was last time and a light-terminal user is not blinded twice.
A missing, unreadable or half-written file is never an error: the defaults apply, because losing
a preference must not stop anyone from training. Plain Python: no textual, no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tui_finetune.core.paths import config_dir

PREFERENCES_FILE = "preferences.json"
THEMES = ("textual-dark", "textual-light")


@dataclass
class Preferences:
    theme: str = "textual-dark"
    """A Textual theme name; the app offers a dark and a light one."""
    last_data_dir: str = ""
    """The folder the dataset picker opens in; empty means the current directory."""
    declined_resumes: list[str] = field(default_factory=list)
    """Interrupted runs whose start-up resume offer got "Not now": not offered again on start-up."""


def preferences_path() -> Path:
    return config_dir() / PREFERENCES_FILE


def load_preferences(path: Path | None = None) -> Preferences:
    """The saved preferences, or the defaults where the file is missing or unreadable."""
    path = path or preferences_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Preferences()
    if not isinstance(data, dict):
        return Preferences()
    known = {f.name for f in fields(Preferences)}
    values: dict = {k: v for k, v in data.items() if k in known and isinstance(v, str)}
    declined = data.get("declined_resumes")
    if isinstance(declined, list):
        values["declined_resumes"] = [v for v in declined if isinstance(v, str)]
    prefs = Preferences(**values)
    if prefs.theme not in THEMES:
        prefs.theme = Preferences.theme
    return prefs


def save_preferences(prefs: Preferences, path: Path | None = None) -> None:
    """Write by atomic replace, so a crash mid-write leaves the old file, never half a file."""
    path = path or preferences_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(prefs), indent=2), encoding="utf-8")
    os.replace(tmp, path)
