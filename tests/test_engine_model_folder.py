"""Model sources: a local folder, or a Hub download whose failures come with the fix (never the network)."""

from __future__ import annotations

import pytest
from huggingface_hub import errors as hf_errors

from tui_finetune.core.catalog import UnknownModelError
from tui_finetune.core.events import EventLog, ProgressEvent, read_events
from tui_finetune.engine.model_folder import ModelAccessError, download_model, resolve_model


def _raiser(exc):
    def fake_snapshot_download(**kwargs):
        raise exc
    return fake_snapshot_download


class _response:
    """The few attributes huggingface_hub's errors read from an HTTP response."""

    def __init__(self, status_code):
        self.status_code = status_code
        self.headers = {}
        self.request = None


def test_gated_model_names_the_licence_page_and_how_to_log_in(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_do_not_print")
    with pytest.raises(ModelAccessError) as info:
        download_model("google/gemma-2b", snapshot_download=_raiser(hf_errors.GatedRepoError("gated", response=_response(401))))
    err = info.value
    assert err.kind == "gated"
    assert "https://huggingface.co/google/gemma-2b" in err.advice
    assert "hf auth login" in err.advice and "HF_TOKEN" in err.advice
    assert "hf_secret_do_not_print" not in str(err) + err.advice


def test_missing_repo_and_offline_get_their_own_advice():
    with pytest.raises(ModelAccessError, match="not found") as missing:
        download_model("nobody/nothing", snapshot_download=_raiser(hf_errors.RepositoryNotFoundError("x", response=_response(404))))
    assert "local model folder" in missing.value.advice
    with pytest.raises(ModelAccessError, match="can't be reached") as offline:
        download_model("org/model", snapshot_download=_raiser(hf_errors.LocalEntryNotFoundError("offline")))
    assert offline.value.kind == "offline"


def test_catalog_key_downloads_its_hub_id_with_progress_events(tmp_path):
    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns, tqdm_class):
        calls["repo_id"] = repo_id
        bar = tqdm_class(total=1000, unit="B", desc="model.safetensors")
        bar.update(400)
        bar.update(600)
        bar.close()
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    log = EventLog(tmp_path / "events.jsonl")
    source = resolve_model("phi-2", log, snapshot_download=fake_snapshot_download)
    log.close()
    assert calls["repo_id"] == "microsoft/phi-2"
    assert (source.folder, source.origin, source.hub_id) == (tmp_path, "hub", "microsoft/phi-2")
    progress = [e for e in read_events(tmp_path / "events.jsonl")[0] if isinstance(e, ProgressEvent)]
    assert progress and progress[-1].done == 1000 and progress[-1].total == 1000


def test_local_folder_is_used_as_is_and_typos_get_suggestions(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).origin == "local"
    with pytest.raises(UnknownModelError, match="phi-2"):
        resolve_model("phi2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelAccessError, match="config.json"):
        resolve_model(str(empty))
