"""Where tui-finetune keeps runs, settings and the Hugging Face download cache.

One module owns these paths so the UI, the CLI, the worker and the doctor never disagree about
where a run lives. ``TUI_FINETUNE_HOME`` moves everything of ours into one folder: tests use it to
stay out of the real user folders, and it also makes a portable install on a USB stick or a big
second drive possible. Plain Python: no torch, and no huggingface_hub import either (it is slow to
import and the doctor must run even when it is broken).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "tui-finetune"
HOME_ENV = "TUI_FINETUNE_HOME"


def _env_path(name: str) -> Path | None:
    """An environment variable as a path, or None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    return Path(os.path.expandvars(value)).expanduser() if value else None


def data_home() -> Path:
    """The folder that holds everything big we write: runs today, exported adapters later.

    ``appauthor=False`` keeps Windows from nesting the folder twice (``tui-finetune\\tui-finetune``).
    """
    return _env_path(HOME_ENV) or Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def runs_dir() -> Path:
    """The folder of run folders (docs/design.md: a run is a folder, and the folder is the truth)."""
    return data_home() / "runs"


def config_dir() -> Path:
    """User settings. Under ``TUI_FINETUNE_HOME`` when set, so a test never reads the real settings."""
    home = _env_path(HOME_ENV)
    return home / "config" if home else Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


CACHE_ENV = "TUI_FINETUNE_CACHE"


def cache_dir() -> Path:
    """What we can rebuild: the demo model converted from its GGUF, Unsloth's compiled kernels.
    ``TUI_FINETUNE_CACHE`` moves it (tests use it); else the platform's user cache folder, never a run
    folder or the current directory."""
    return _env_path(CACHE_ENV) or Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def hf_cache_dir() -> Path:
    """Where downloaded base models go, resolved the way huggingface_hub resolves it.

    Order: ``HF_HUB_CACHE``, the legacy ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``, then
    ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub`` (on Windows too).
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        path = _env_path(name)
        if path:
            return path
    hf_home = _env_path("HF_HOME")
    if hf_home:
        return hf_home / "hub"
    cache = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return cache / "huggingface" / "hub"


def converted_models_dir() -> Path:
    """Models we converted ourselves (the GGUF demo), in ``cache_dir``. A cache, not data: deleting it
    costs one conversion on the next run."""
    return cache_dir() / "models"


def converted_model_dir(model_file: str) -> Path:
    """The Hugging Face folder converted from one packaged model file (``gemma-3-270m-it-Q4_K_M.gguf``):
    ``converted_models_dir()`` / the file's name without ``.gguf``."""
    return converted_models_dir() / model_file.removesuffix(".gguf")


def converted_tokenizer_dir(model_file: str) -> Path:
    """The tokenizer alone, converted from one packaged model file before the model itself is (the wizard's
    data check on a first run): ``cache_dir()/tokenizers`` / the file's name without ``.gguf``."""
    return cache_dir() / "tokenizers" / model_file.removesuffix(".gguf")


def unsloth_compile_dir() -> Path:
    """Where Unsloth writes its compiled kernels (``UNSLOTH_COMPILE_LOCATION``): our cache, never the
    worker's working directory, which is a run folder."""
    return cache_dir() / "unsloth_compiled_cache"


def inductor_cache_dir() -> Path:
    """Where the compiled backend's Inductor kernels go (``TORCHINDUCTOR_CACHE_DIR``): with our other rebuildable
    files, so a later run of the same model starts without compiling again and clearing our cache clears them."""
    return cache_dir() / "inductor"
