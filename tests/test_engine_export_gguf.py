"""GGUF export of what the shipped presets' configs contain (issue 12): Llama 3's RoPE scaling written as
llama.cpp's ``rope_freqs.weight`` and checked against transformers' own llama3 frequencies; the GGUF
reloaded by transformers gives the merged model's greedy reply; settings llama.cpp fixes per
architecture instead of reading are refused before any work; Llama Q/K biases in llama.cpp's layout."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from export_support import LLAMA3_ROPE, make_finished_run
from tui_finetune.core.catalog import get_model
from tui_finetune.core.export_spec import ExportError, ExportSpec
from tui_finetune.core.run_folder.info import read_run_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY_HEAD_DIM = 16  # export_support: hidden 64, 4 heads


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory) -> Path:
    return make_finished_run(tmp_path_factory.mktemp("llama3"), "llama3")


@pytest.fixture(scope="module")
def llama3_gguf(llama3_run):
    return _export(llama3_run, "gguf")


def _export(run: Path, target: str, quant: str = "f16", **kwargs):
    from tui_finetune.engine.export import run_export

    return run_export(run, ExportSpec(target, quant=quant, **kwargs))


def _plain_inv_freq(theta: float, dims: int):
    import torch

    return 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))


def test_llama3_rope_scaling_exports_to_gguf_and_passes_its_own_checks(llama3_gguf):
    result = llama3_gguf
    assert result.passed, [f"{c.name}: {c.detail}" for c in result.checks if not (c.passed or c.skipped)]
    checks = {c.name: c for c in result.checks}
    assert checks["RoPE matches the model's"].passed and "scaled by 1 to 8" in checks["RoPE matches the model's"].detail
    assert checks["transformers reload: greedy replies match"].passed
    assert not checks["transformers reload: greedy replies match"].skipped
    assert checks["does it stop"].passed


def test_rope_freqs_is_one_over_transformers_llama3_frequency_ratio(llama3_gguf, llama3_run):
    """The written factors against an independent reference: transformers' ROPE_INIT_FUNCTIONS["llama3"]."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reader = gguf.GGUFReader(llama3_gguf.path)
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(tensor.data, dtype=np.float64)
    config = AutoConfig.from_pretrained(read_run_recipe(llama3_run).model)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ratio = scaled.double() / _plain_inv_freq(LLAMA3_ROPE["rope_theta"], TINY_HEAD_DIM)

    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and factors.shape == (TINY_HEAD_DIM // 2,)
    np.testing.assert_allclose(ratio.numpy(), 1.0 / factors, rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == LLAMA3_ROPE["factor"]
    assert any(1.0 < f < LLAMA3_ROPE["factor"] for f in factors)  # the blended band is exercised too
    # llama.cpp's converter writes no scaling keys for llama3: the tensor is the whole description
    assert reader.fields["llama.rope.freq_base"].contents() == LLAMA3_ROPE["rope_theta"]
    assert not [k for k in reader.fields if k.startswith("llama.rope.scaling")]


def test_tied_llama3_like_llama_3_2_in_q8_0_has_no_output_tensor_and_passes_its_checks(tmp_path):
    import gguf

    result = _export(make_finished_run(tmp_path, "llama3-tied"), "gguf", "q8_0")
    assert result.passed, [f"{c.name}: {c.detail}" for c in result.checks if not (c.passed or c.skipped)]
    tensors = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert "output.weight" not in tensors and "token_embd.weight" in tensors  # llama.cpp reuses the embedding
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # never quantized
    reload = next(c for c in result.checks if c.name == "transformers reload: logits match the fine-tune")
    assert reload.passed and "with the file's RoPE scaling" in reload.detail


def _greedy(model, prompt: list[int], stops: list[int], new: int = 40) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=stops, pad_token_id=stops[0])
    return out[0, len(prompt):].tolist()


LONG_PROMPT = "Please add these numbers one at a time and tell me the total: " + " + ".join(map(str, range(40)))
"""About 120 tokens: past the tiny Llama 3's 64-token original context, where its RoPE factors show."""


@pytest.mark.parametrize("arch", ["llama", "llama3"])
def test_gguf_reloaded_by_transformers_gives_the_merged_models_greedy_reply(arch, tmp_path, llama3_run):
    """Independent of the exporter's own checks: both exports reloaded by plain transformers, one prompt."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = llama3_run if arch == "llama3" else make_finished_run(tmp_path, arch)
    merged_dir = Path(_export(run, "merged", check=False).path)
    gguf_file = Path(_export(run, "gguf", check=False).path)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": LONG_PROMPT}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    stops = [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    rope_freqs = [t for t in gguf.GGUFReader(gguf_file).tensors if t.name == "rope_freqs.weight"]
    assert bool(rope_freqs) == (arch == "llama3")
    with torch.no_grad():
        if rope_freqs:  # transformers' GGUF loader builds plain RoPE from freq_base and leaves rope_freqs unread
            rotary = reloaded.model.rotary_emb
            plain = _plain_inv_freq(LLAMA3_ROPE["rope_theta"], TINY_HEAD_DIM).float()
            assert torch.allclose(rotary.inv_freq, plain)
            without = reloaded(input_ids=torch.tensor([prompt])).logits
            factors = torch.tensor(np.array(rope_freqs[0].data, dtype=np.float32))
            rotary.inv_freq.copy_(plain / factors)  # what llama.cpp does with the tensor
        want_logits = merged(input_ids=torch.tensor([prompt])).logits
        got_logits = reloaded(input_ids=torch.tensor([prompt])).logits
    error = (want_logits - got_logits).abs().max()
    assert error <= 2e-2 * want_logits.abs().max()
    if rope_freqs:  # the factors matter on this prompt: without them the reload is ten times further off
        assert (want_logits - without).abs().max() > 10 * error
    want = _greedy(merged, prompt, stops)
    assert 2 <= len(want) < 40 and want[-1] in stops  # a real reply that stops, not one token or a cut
    assert _greedy(reloaded, prompt, stops) == want


def test_rope_check_fails_when_the_file_has_the_wrong_factors(llama3_run, monkeypatch, tmp_path):
    """On a short prompt a missing or wrong rope_freqs hides inside the F16 logit tolerance; this check doesn't."""
    from tui_finetune.engine.export import gguf_rope

    monkeypatch.setattr(gguf_rope, "llama3_factors", lambda config: np.ones(TINY_HEAD_DIM // 2, dtype=np.float32))
    result = _export(llama3_run, "gguf", out_dir=str(tmp_path / "wrong"))
    checks = {c.name: c for c in result.checks}
    assert not checks["RoPE matches the model's"].passed
    assert "differ from transformers'" in checks["RoPE matches the model's"].detail
    assert not result.passed
    assert checks["gguf reader: logits match the fine-tune"].passed  # why the RoPE needs its own check


# The keys of each shipped preset's config.json on the Hub that change what a GGUF must say.
PRESET_HUB_KEYS = {
    "llama-3.1-8b": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
    "llama-3.2-3b": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
    "qwen2.5-7b": {"use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
                   "rope_scaling": None},
    "mistral-7b": {"sliding_window": None},
    "gemma-2b": {"rope_theta": 10000.0},
    "phi-2": {"qk_layernorm": False},
    "gemma-3-270m": {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
                     "rope_scaling": None, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                     "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(18)]},
}


def _config_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / config["model_type"]
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _preset_models() -> list[str]:
    keys = {tomllib.loads(p.read_text())["model"] for p in RECIPES.glob("*.toml")}
    return sorted(get_model(key).key for key in keys)


@pytest.mark.parametrize("key", _preset_models())
def test_every_preset_config_is_accepted_and_llama3_gets_transformers_factors(key, tmp_path):
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tui_finetune.engine.export.gguf_arch import arch_for, write_hparams

    assert key in PRESET_HUB_KEYS, f"a new preset ({key}): add its config.json keys above and check them"
    spec = get_model(key)
    folder = _config_folder(tmp_path, {**spec.to_config_dict(), **PRESET_HUB_KEYS[key]})
    arch = arch_for(folder)
    config = AutoConfig.from_pretrained(str(folder))
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch.gguf_arch)
    extra = write_hparams(writer, arch, config, key)
    if key.startswith("llama-3"):
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        plain = _plain_inv_freq(500000.0, spec.head_dim)
        np.testing.assert_allclose(extra["rope_freqs.weight"], (plain / scaled.double()).numpy(), rtol=1e-5)
    else:
        assert extra == {}


def _variant(tmp_path: Path, key: str, **changes) -> Path:
    config = {**get_model(key).to_config_dict(), **PRESET_HUB_KEYS.get(key, {}), **changes}
    return _config_folder(tmp_path, config)


@pytest.mark.parametrize("key, changes, says", [
    ("gemma-3-270m", {"rope_local_base_freq": 20000.0}, "local RoPE base of 20000"),
    ("gemma-3-270m", {"layer_types": ["full_attention"] * 18}, "every 6th layer"),
    ("gemma-3-270m", {"query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128"),
    ("gemma-3-270m", {"attn_logit_softcapping": 50.0}, "soft-capping"),
    ("qwen2.5-7b", {"use_sliding_window": True}, "use_sliding_window"),
    ("phi-2", {"qk_layernorm": True}, "qk_layernorm"),
    ("llama-3.1-8b", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 8192}}, "'yarn' RoPE scaling"),
    ("qwen2.5-7b", {"rope_scaling": dict(PRESET_HUB_KEYS["llama-3.1-8b"]["rope_scaling"])}, "Llama models only"),
])
def test_settings_llama_cpp_would_run_wrong_are_refused_with_the_way_round(key, changes, says, tmp_path):
    from tui_finetune.engine.export.gguf_arch import arch_for

    with pytest.raises(ExportError, match=says) as err:
        arch_for(_variant(tmp_path, key, **changes))
    assert "--to merged" in str(err.value)


@pytest.mark.parametrize("proj", ["q_proj", "k_proj"])
def test_llama_attention_biases_are_permuted_like_their_weights(proj):
    """llama.cpp permutes Q/K biases too; transformers' GGUF reader undoes it for any tensor of attn_q/attn_k."""
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tui_finetune.engine.export.gguf_arch import ARCHS, from_gguf, to_gguf

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    rows = 64 if proj == "q_proj" else 32
    bias = np.arange(rows, dtype=np.float32)
    hf_name = f"model.layers.0.self_attn.{proj}.bias"
    stored = to_gguf(ARCHS["llama"], config, hf_name, bias)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    read_back = processor.process(stored, f"blk.0.attn_{proj[0]}.bias").weights
    assert not np.array_equal(stored, bias)
    np.testing.assert_array_equal(read_back, bias)
    np.testing.assert_array_equal(from_gguf(ARCHS["llama"], config, hf_name, stored), bias)
