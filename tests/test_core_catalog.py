"""The model catalog: every entry builds as a real transformers config with the published size."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tui_finetune.core.catalog import CATALOG, UnknownModelError, get_model, model_spec_from_config
from tui_finetune.core.model_shape import resolve_model_spec

REQUIRED = ["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b",
            "qwen2.5-7b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "phi-2", "phi-3.5-mini",
            "gemma-2b", "gemma-2-2b", "mistral-7b", "tinyllama-1.1b"]


def test_catalog_has_the_models_hobbyists_pick():
    assert set(REQUIRED) <= set(CATALOG)
    for spec in CATALOG.values():
        assert "/" in spec.hub_id and spec.license


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_entry_builds_with_published_parameter_count(key):
    spec = CATALOG[key]
    config = transformers.AutoConfig.for_model(**spec.to_config_dict())
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = transformers.AutoModelForCausalLM.from_config(config)
    built = sum(p.numel() for p in model.parameters())
    assert abs(built / spec.published_params - 1) < 0.02, f"{key}: built {built:,} vs {spec.published_params:,.0f}"
    # The planner sizes weights from linear_shapes(); it must agree with the real module too.
    assert abs(spec.estimated_params() / built - 1) < 0.005


def test_lookup_by_hub_id_and_did_you_mean():
    assert get_model("mistralai/Mistral-7B-v0.3").key == "mistral-7b"
    with pytest.raises(UnknownModelError, match="Did you mean phi-2"):
        get_model("phi2")


def test_local_folder_config_is_planned(tmp_path):
    config = CATALOG["qwen2.5-0.5b"].to_config_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = resolve_model_spec(str(tmp_path))
    assert spec.num_layers == 24 and spec.num_kv_heads == 2 and spec.vocab_size == 151936
    assert spec.estimated_params() == CATALOG["qwen2.5-0.5b"].estimated_params()


def test_uncached_hub_id_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UnknownModelError, match="not in the catalog and not in the Hugging Face cache"):
        resolve_model_spec("someone/unknown-model")
    snapshot = tmp_path / "models--someone--unknown-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(CATALOG["phi-2"].to_config_dict()))
    assert resolve_model_spec("someone/unknown-model").model_type == "phi"


def test_config_without_shape_is_rejected_clearly():
    with pytest.raises(ValueError, match="is this a causal language model"):
        model_spec_from_config({"model_type": "bert"}, "x")
