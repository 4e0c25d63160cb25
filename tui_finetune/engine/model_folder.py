"""Turn a recipe's ``model`` into a local folder: a local path, the packaged demo model, or a Hub download.

A Hub model goes through ``huggingface_hub.snapshot_download`` into the normal HF cache (so other
tools share it), with ``progress`` events. A gated or private model fails with a message that names
the licence page and how to log in; the token is read by huggingface_hub itself and is never
written anywhere by us. Tests inject ``snapshot_download`` to stay offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tui_finetune.core.catalog import CATALOG, get_model
from tui_finetune.core.events import EventLog, ProgressEvent

DEMO_PREFIX = "pypi:"
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
"""Weights as safetensors only (no duplicate .bin/.pt/.gguf copies), plus configs and tokenizer files."""


class ModelAccessError(RuntimeError):
    """The model can't be had: gated, private, missing or offline. ``advice`` says what to do."""

    def __init__(self, message: str, advice: str, kind: str = "model") -> None:
        super().__init__(message)
        self.advice = advice
        self.kind = kind


@dataclass
class ModelSource:
    folder: Path
    origin: str
    """local, hub or package: where the weights came from, for run.json."""
    hub_id: str = ""


def local_model_folder(model: str) -> Path | None:
    """A recipe's ``model`` as a local folder (``~`` expanded), or None: a catalog key, a Hub id, the demo.
    A local folder wins over a catalog key of the same name when the model loads (``resolve_model``), so
    the worker reads the model type the same way (``model_type_before_loading``)."""
    local = Path(model).expanduser()
    return local if local.is_dir() else None


def model_type_before_loading(model: str) -> str:
    """A recipe's ``model``'s ``model_type`` before anything downloads (``unsloth_import.prepare_process``
    needs it): a local folder's config.json first, as ``resolve_model`` loads it; else what the planner knows
    without a download (the catalog, or a Hub model already in the cache: ``resolve_model_spec``); '' when only
    a download would tell."""
    from tui_finetune.core.model_shape import resolve_model_spec

    local = local_model_folder(model)
    if local is not None:
        return model_type_of(local)
    try:
        return resolve_model_spec(model).model_type
    except Exception:  # noqa: BLE001 - unknown here; resolve_model reports a bad name or folder properly later
        return ""


def model_type_of(folder: Path) -> str:
    """The ``model_type`` in a model folder's config.json, or '' when it has none."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def hub_id_for(model: str) -> str:
    """A catalog key's Hub id, or the string itself (already a Hub id)."""
    return CATALOG[model].hub_id if model in CATALOG else model


def _progress_tqdm(log: EventLog | None) -> type:
    """A tqdm class whose updates become throttled ``progress`` events (download phase)."""
    from tqdm.auto import tqdm

    class EventTqdm(tqdm):  # type: ignore[misc]
        _last = 0.0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("disable", False)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            import time

            now = time.time()
            if log is not None and (now - self._last > 0.5 or (self.total and self.n >= self.total)):
                self._last = now
                log.emit(ProgressEvent(phase="download", done=float(self.n), total=float(self.total or 0),
                                       unit=str(self.unit or ""), message=str(self.desc or "")))
            return out

    return EventTqdm


def download_model(hub_id: str, log: EventLog | None = None,
                   snapshot_download: Callable[..., str] | None = None) -> Path:
    """Download (or find in the HF cache) a Hub model; explain gated, missing and offline failures."""
    from huggingface_hub import errors as hf_errors

    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    page = f"https://huggingface.co/{hub_id}"
    login = ("log in once with 'hf auth login' (or set the HF_TOKEN environment variable) with a token "
             "from https://huggingface.co/settings/tokens")
    try:
        folder = snapshot_download(repo_id=hub_id, allow_patterns=ALLOW_PATTERNS, tqdm_class=_progress_tqdm(log))
    except hf_errors.GatedRepoError:
        raise ModelAccessError(
            f"{hub_id} is a gated model: its licence must be accepted before download",
            f"open {page}, read and accept the licence, then {login}; then start the run again",
            kind="gated") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelAccessError(
            f"{hub_id} was not found on the Hugging Face Hub (or it is private)",
            f"check the spelling at {page}; if it is private, {login}; or give a local model folder",
            kind="not_found") from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelAccessError(
            f"{hub_id} is not in the local cache and the Hub can't be reached",
            "connect to the internet for the first download, or give a local model folder", kind="offline") from None
    except hf_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelAccessError(f"{hub_id}: access denied ({status})",
                                   f"your token lacks access: accept the licence at {page}, then {login}",
                                   kind="gated") from None
        raise ModelAccessError(f"{hub_id}: download failed ({err})",
                               "check your connection and start again; finished files are kept", kind="download") from None
    return Path(folder)


def resolve_model(model: str, log: EventLog | None = None,
                  snapshot_download: Callable[..., str] | None = None) -> ModelSource:
    """Find or fetch the model folder named by a recipe's ``model``."""
    local = local_model_folder(model)
    if local is not None:
        if not (local / "config.json").is_file():
            raise ModelAccessError(f"{local} has no config.json", "give a folder saved by save_pretrained", kind="model")
        return ModelSource(local, "local")
    if model.startswith(DEMO_PREFIX):
        from tui_finetune.engine.demo_model import ensure_demo_model

        return ModelSource(ensure_demo_model(model[len(DEMO_PREFIX):], log), "package")
    if model not in CATALOG and "/" not in model:
        get_model(model)  # raises UnknownModelError with a "did you mean"
    hub_id = hub_id_for(model)
    return ModelSource(download_model(hub_id, log, snapshot_download), "hub", hub_id)
