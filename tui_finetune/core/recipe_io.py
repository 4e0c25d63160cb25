"""Reading and writing recipes: TOML text and raw dicts into a checked RecipeSpec, and a RecipeSpec back to TOML.

Everything that meets a recipe as untrusted input is here: a TOML file (``load_recipe``), a raw dict (a
checkpoint's saved recipe, ``recipe_from_dict``), ``--set key=value`` overrides, and the keys an old run
folder's recipe lacks (``fill_missing_keys``). Each key and its type are checked on the way in and named with
the file or the ``--set`` on a mistake, with a "did you mean" for typos; the values are then checked by
recipe.py's ``check_recipe_values``. The cut is at the spec: recipe.py holds what a recipe is and which values
it may hold, which most of the program uses without parsing; this module imports it, never the reverse.
Overrides live here, not there, because they edit the raw dict before it becomes a spec, so a bad one is
blamed on its ``--set`` and not on the file. This module is plain Python: it must not import torch.
"""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from tui_finetune.core.recipe import RecipeError, RecipeSpec, check_recipe_values


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against the dataclass field's type; ints are accepted for floats."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string in quotes, got {value!r}")
    if hint == int | str:  # train.devices: a number or "all"
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected a whole number or a string in quotes, got {value!r}")
    # list[str] | str (LoRA target modules)
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise RecipeError(f"{where}: expected a string or a list of strings, got {value!r}")


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in names:
            close = get_close_matches(key, names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
            raise RecipeError(f"{where}: unknown key.{hint}")
        hint = hints[key]
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: expected a [{prefix}{key}] table")
            kwargs[key] = _build(hint, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(where, value, hint)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'top level'}: {err}") from None


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> RecipeSpec:
    recipe = _build(RecipeSpec, data, source)
    check_recipe_values(recipe, source)
    return recipe


def fill_missing_keys(data: dict[str, Any], missing: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a raw recipe dict, changed in place) with each dotted key of ``missing`` it lacks set to the
    value given there instead of today's default."""
    for key, value in missing.items():
        *tables, name = key.split(".")
        table = data
        for part in tables:
            table = table.setdefault(part, {})
        if isinstance(table, dict):
            table.setdefault(name, value)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                missing: dict[str, Any] | None = None) -> RecipeSpec:
    """Load and check a recipe TOML, then apply ``key=value`` overrides (``--set``). ``missing``: dotted keys
    the file may lack and the value they then take (a run folder's recipe written before a key existed,
    core/run_folder/info.py), not today's default."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file: list the presets with 'tui-finetune plan'") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: invalid TOML ({err}): fix the line it names") from None
    if "model" not in data:
        raise RecipeError(f"{path}: model: missing: add a line such as model = \"phi-2\"")
    fill_missing_keys(data, missing or {})
    recipe = recipe_from_dict(data, str(path))
    for item in overrides or []:  # one at a time, so a bad value is blamed on its --set, not on the file
        apply_override(data, item, str(path))
        recipe = recipe_from_dict(data, f"--set {item.strip()}")
    return recipe


def _parse_override_value(raw: str) -> Any:
    """Read the right-hand side of ``--set`` as a TOML value, or as a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _find_field_path(key: str, source: str) -> list[str]:
    """Resolve ``train.micro_batch`` or a unique bare name such as ``micro_batch`` to a path."""
    parts = key.split(".")
    cls: Any = RecipeSpec
    for i, part in enumerate(parts):
        hints = get_type_hints(cls)
        if part not in hints:
            break
        if i == len(parts) - 1:
            return parts
        cls = hints[part]
        if not is_dataclass(cls):
            break
    else:
        return parts
    if len(parts) == 1:
        owners = [f.name for f in fields(RecipeSpec)
                  if is_dataclass(get_type_hints(RecipeSpec)[f.name])
                  and key in get_type_hints(get_type_hints(RecipeSpec)[f.name])]
        if len(owners) == 1:
            return [owners[0], key]
    every = [f.name for f in fields(RecipeSpec) if not is_dataclass(get_type_hints(RecipeSpec)[f.name])]
    for f in fields(RecipeSpec):
        sub = get_type_hints(RecipeSpec)[f.name]
        if is_dataclass(sub):
            every += [f"{f.name}.{g.name}" for g in fields(sub)]
    close = get_close_matches(key, every, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(f"{source}: --set {key}: unknown key.{hint}")


def apply_override(data: dict[str, Any], item: str, source: str = "recipe") -> None:
    """Apply one ``key=value`` override to a raw recipe dict in place."""
    if "=" not in item:
        raise RecipeError(f"{source}: --set {item}: expected key=value, e.g. --set train.micro_batch=2")
    key, raw = item.split("=", 1)
    path = _find_field_path(key.strip(), source)
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = _parse_override_value(raw.strip())


def recipe_to_toml(recipe: RecipeSpec, header: str = "") -> str:
    """TOML text of a recipe, with an optional leading comment block."""
    body = tomli_w.dumps(_drop_none(recipe.to_dict()))
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    return ("\n".join(lines) + "\n\n" if lines else "") + body


def save_recipe(recipe: RecipeSpec, path: str | Path, header: str = "") -> None:
    Path(path).write_text(recipe_to_toml(recipe, header), encoding="utf-8")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}
