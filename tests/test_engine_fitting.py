"""The worker's auto-fit and fit-check orchestration on a real run folder, with a given free-VRAM figure.

The worker calls these on CUDA only; here the free memory is a number we pass, and the fit-check's
OOM comes from a backend whose loss raises torch.OutOfMemoryError above a batch size we choose.
"""

from __future__ import annotations

import pytest

from tui_finetune.core.events import EventLog, PhaseEvent, WarningEvent, read_events
from tui_finetune.core.planner import GIB
from tui_finetune.core.presets import find_recipe
from tui_finetune.core.recipe import MemorySpec, load_recipe, recipe_from_dict
from tui_finetune.core.runs import EVENTS_FILE, RECIPE_FILE, create_run, read_run_info, read_run_recipe
from tui_finetune.engine.fitting import FitRefused, auto_fit_run, fit_check_run, split_change


def events(run_dir, cls):
    return [e for e in read_events(run_dir / EVENTS_FILE)[0] if isinstance(e, cls)]


@pytest.fixture
def mistral_run(tmp_path):
    recipe = load_recipe(find_recipe("16gb-mistral-7b-qlora"))
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    with EventLog(run_dir / EVENTS_FILE) as log:
        yield run_dir, recipe, log


def test_auto_fit_saves_the_adjusted_recipe_records_and_warns_each_change(mistral_run):
    run_dir, recipe, log = mistral_run
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", 8 * GIB, log)
    assert fitted != recipe and fitted.memory.offload_activations
    assert read_run_recipe(run_dir) == fitted  # a resume reads the same values
    changes = read_run_info(run_dir).autofit
    warnings = events(run_dir, WarningEvent)
    assert changes and len(warnings) == len(changes)
    for change, warning in zip(changes, warnings):
        assert warning.message == "auto-fit: " + split_change(change)[0]
        assert warning.advice.startswith("to keep this value: --set ") and warning.advice.split("--set ")[1] in change


def test_auto_fit_leaves_a_fitting_run_alone(mistral_run):
    run_dir, recipe, log = mistral_run
    before = (run_dir / RECIPE_FILE).read_bytes()
    assert auto_fit_run(run_dir, recipe, "mistral-7b", 24 * GIB, log) == recipe
    assert (run_dir / RECIPE_FILE).read_bytes() == before
    assert read_run_info(run_dir).autofit == [] and events(run_dir, WarningEvent) == []


def test_auto_fit_refuses_a_run_that_cannot_fit_with_advice(mistral_run):
    run_dir, recipe, log = mistral_run
    before = (run_dir / RECIPE_FILE).read_bytes()
    with pytest.raises(FitRefused, match="2.0 GiB of free VRAM") as refused:
        auto_fit_run(run_dir, recipe, "mistral-7b", 2 * GIB, log)
    assert "smaller model" in refused.value.advice
    assert (run_dir / RECIPE_FILE).read_bytes() == before


def test_auto_fit_of_a_model_of_unknown_shape_warns_and_goes_on(mistral_run, tmp_path):
    run_dir, recipe, log = mistral_run
    (tmp_path / "empty").mkdir()
    assert auto_fit_run(run_dir, recipe, str(tmp_path / "empty"), 8 * GIB, log) == recipe
    assert events(run_dir, WarningEvent)[0].message.startswith("auto-fit skipped")


# ------------------------------------------------------------ the fit-check's part, on the CPU

class OomAbove:
    """A backend whose loss runs out of memory for batches over ``max_tokens`` tokens."""

    def __init__(self, max_tokens):
        self.max_tokens = max_tokens

    def loss(self, model, batch, memory, num_items_in_batch=None):
        import torch

        from tui_finetune.engine.lean import lean_causal_lm_loss

        if batch["input_ids"].numel() > self.max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lean_causal_lm_loss(model, batch, MemorySpec())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine_tiny import build_tokenizer

    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         use_cache=False))
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    lengths = [1000, 980, 120, 60]
    ids = [[10 + j % 50 for j in range(n)] for n in lengths]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "length": lengths})
    return model, tokenizer, data


def small_run(tmp_path, **train):
    recipe = recipe_from_dict({"model": "llama-3.2-3b", "method": "lora", "data": {"seq_len": 1024},
                               "train": {"micro_batch": 4, "grad_accum": 2, **train}})
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    return create_run(recipe, data, base=tmp_path / "runs"), recipe


def test_fit_check_shrinks_the_micro_batch_through_run_json(tiny, tmp_path):
    model, tokenizer, data = tiny
    run_dir, recipe = small_run(tmp_path)
    with EventLog(run_dir / EVENTS_FILE) as log:
        fitted = fit_check_run(run_dir, model, OomAbove(2100), recipe, data, tokenizer, log, fresh=True)
    assert fitted == recipe == read_run_recipe(run_dir)
    info = read_run_info(run_dir)
    assert (info.micro_batch, info.grad_accum) == (2, 4)  # the OOM recovery's override: effective batch 8
    assert len(info.autofit) == 1 and "micro-batch 4 x 1000 tokens" in info.autofit[0]
    assert events(run_dir, WarningEvent)[0].advice.endswith("--set train.micro_batch=2 --set train.grad_accum=4")
    fit = events(run_dir, PhaseEvent)[-1]
    assert fit.phase == "fit" and "2 example(s) in 2 x 1000 tokens" in fit.message


def test_fit_check_at_micro_batch_one_shortens_a_fresh_runs_sequence(tiny, tmp_path):
    model, tokenizer, data = tiny
    run_dir, recipe = small_run(tmp_path, micro_batch=1, grad_accum=8)
    with EventLog(run_dir / EVENTS_FILE) as log:
        fitted = fit_check_run(run_dir, model, OomAbove(600), recipe, data, tokenizer, log, fresh=True)
    assert fitted.data.seq_len == 500 and read_run_recipe(run_dir) == fitted
    with EventLog(run_dir / EVENTS_FILE) as log, pytest.raises(FitRefused, match="resumed run"):
        fit_check_run(run_dir, model, OomAbove(600), recipe, data, tokenizer, log, fresh=False)


def test_fit_check_that_never_fits_is_refused_as_oom(tiny, tmp_path):
    model, tokenizer, data = tiny
    run_dir, recipe = small_run(tmp_path, micro_batch=1, grad_accum=8)
    with EventLog(run_dir / EVENTS_FILE) as log, pytest.raises(FitRefused, match="even at micro-batch 1") as refused:
        fit_check_run(run_dir, model, OomAbove(10), recipe, data, tokenizer, log, fresh=True)
    assert "tui-finetune plan" in refused.value.advice


def test_auto_fit_leaves_sequence_cuts_to_the_measuring_fit_check(mistral_run):
    """Where only a shorter sequence would fit the estimate, the data is not truncated on an estimate:
    the savers apply, a warning names the --set, and the fit-check decides by measuring."""
    run_dir, recipe, log = mistral_run
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", 5.5 * GIB, log)
    assert fitted.data.seq_len == recipe.data.seq_len and fitted.memory.offload_activations
    warning = [w for w in events(run_dir, WarningEvent) if "fit-check will measure" in w.message]
    assert len(warning) == 1 and "data.seq_len=" in warning[0].advice
    assert all("seq_len" not in change for change in read_run_info(run_dir).autofit)


def test_the_fit_check_holds_what_the_optimizer_states_will_take(tiny):
    from tui_finetune.engine.fitting import optimizer_state_bytes

    model = tiny[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable > 0
    assert optimizer_state_bytes(model, "paged_adamw_8bit") == 2 * trainable  # two 8-bit moments
    assert optimizer_state_bytes(model, "adamw_torch") == 8 * trainable  # two fp32 moments


def test_on_a_card_without_bf16_auto_fit_does_not_count_on_compute_dtype_adapters(mistral_run):
    """The engine keeps LoRA weights fp32 under fp16 (the grad scaler refuses fp16 gradients), so on an
    RTX 20xx that saver would be a change on paper only."""
    from tui_finetune.core.recipe import MachineFacts

    run_dir, recipe, log = mistral_run
    turing = MachineFacts(has_cuda=True, supports_bf16=False, bitsandbytes_ok=True, device_name="GeForce RTX 2060")
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", 8 * GIB, log, machine=turing)
    assert fitted.memory.adapter_dtype == "fp32" and fitted.memory.offload_activations
    assert fitted.train.precision == "fp16" and read_run_recipe(run_dir) == fitted
    assert not any("adapter_dtype" in change for change in read_run_info(run_dir).autofit)
