"""Find a model's architecture without downloading weights: the catalog, a local folder, or the HF cache.

The planner needs only ``config.json``. A catalog key needs nothing; a local folder or a model
already in the Hugging Face cache is read from disk. Plain Python: no torch, no huggingface_hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from tui_finetune.core.catalog import CATALOG, ModelSpec, UnknownModelError, get_model, model_spec_from_config
from tui_finetune.core.paths import hf_cache_dir


def cached_config_path(hub_id: str) -> Path | None:
    """The newest cached ``config.json`` of a Hub model, in huggingface_hub's cache layout."""
    repo = hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    configs = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return configs[-1] if configs else None


def resolve_model_spec(name: str) -> ModelSpec:
    """A catalog key or Hub id, a local model folder, or a Hub model already in the cache."""
    if name in CATALOG or name.startswith("pypi:") or any(s.hub_id.lower() == name.lower() for s in CATALOG.values()):
        return get_model(name)
    folder = Path(name).expanduser()
    config_path = folder / "config.json" if folder.is_dir() else None
    if config_path is None and "/" in name and not folder.exists():
        config_path = cached_config_path(name)
    if config_path is None or not config_path.is_file():
        if folder.is_dir():
            raise UnknownModelError(f"{folder}: no config.json in this folder: pick the folder that "
                                    "holds the model's config.json and weights")
        if "/" in name and not folder.exists():
            raise UnknownModelError(f"{name}: not in the catalog and not in the Hugging Face cache "
                                    f"({hf_cache_dir()}), so its size is unknown here: download it once, "
                                    "or plan a catalog model")
        get_model(name)  # raises with the 'did you mean' message
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UnknownModelError(f"{config_path}: can't read it ({err}): is the download complete?") from None
    return model_spec_from_config(config, key=folder.name if folder.is_dir() else name, hub_id=name)
