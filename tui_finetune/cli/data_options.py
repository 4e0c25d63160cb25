"""The data shorthands ``--columns``, ``--allow-drop`` and ``--format`` as the recipe keys they stand for.

``train`` and ``data check`` both take them, and the dataset doctor's advice names them, so the fix it
prints can be pasted into either command. Each is only a spelling of a ``--set data.*`` override: the
value lands in the recipe (and so in the run's recipe.toml, which a resume reads back).
"""

from __future__ import annotations

import json
from argparse import Namespace

ALLOW_ANY_DROP = 1.0


def data_overrides(args: Namespace) -> list[str]:
    """``--set``-style items for the shorthands given, after the explicit ``--set`` ones (so they win)."""
    items = list(getattr(args, "overrides", None) or [])
    if getattr(args, "columns", None):
        items.append(f"data.columns={json.dumps(args.columns)}")  # quoted: a TOML string, whatever it holds
    if getattr(args, "format", None):
        items.append(f"data.format={json.dumps(args.format)}")
    if getattr(args, "allow_drop", False):
        items.append(f"data.max_drop_fraction={ALLOW_ANY_DROP}")
    return items
