"""The shipped recipe presets: where they live, which card each is for, and lookup by name.

Presets sit in ``recipes/`` at the top of a checkout and ship inside the package as
``tui_finetune.presets``. Their file names start with the card size (``16gb-mistral-7b-qlora``), which
is how the plan table and the wizard order them. Plain Python: no torch.
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path

from tui_finetune.core.recipe import RecipeError


def presets_dir() -> Path:
    """The folder of shipped presets: ``recipes/`` in a checkout, ``tui_finetune/presets`` when installed."""
    from importlib.resources import files

    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if (checkout / "demo-cpu.toml").is_file():  # this source tree's presets win over an installed copy's
        return checkout
    try:
        return Path(str(files("tui_finetune.presets")))
    except ModuleNotFoundError:  # running from a source tree on PYTHONPATH, not installed
        return Path(__file__).resolve().parents[2] / "recipes"


def preset_card_gb(path: Path) -> int | None:
    """The card size a preset is for, from its name (``16gb-mistral-7b-qlora`` -> 16)."""
    head = path.stem.split("gb-", 1)[0]
    return int(head) if head.isdigit() else None


def list_presets() -> list[Path]:
    """Shipped presets, smallest card first (demo and other card-less presets last)."""
    return sorted(presets_dir().glob("*.toml"), key=lambda p: (preset_card_gb(p) or 10**6, p.stem))


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or the name of a shipped preset (with or without ``.toml``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name.removesuffix(".toml")
    for preset in list_presets():
        if preset.stem == stem:
            return preset
    close = get_close_matches(stem, [p.stem for p in list_presets()], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(f"{name_or_path}: no such recipe file or preset.{hint}")
