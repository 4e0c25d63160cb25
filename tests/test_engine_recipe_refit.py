"""The worker's auto-fit and the fit-check's sequence cut on a real run folder, with a given free-VRAM figure.

The worker calls auto-fit on CUDA only; here the free memory is a number we pass.
"""

from __future__ import annotations

import pytest

from tui_finetune.core.events import EventLog, WarningEvent, read_events
from tui_finetune.core.planner import GIB
from tui_finetune.core.presets import find_recipe
from tui_finetune.core.recipe_io import load_recipe, recipe_from_dict
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe
from tui_finetune.core.run_folder.layout import EVENTS_FILE, RECIPE_FILE
from tui_finetune.engine.recipe_refit import FitRefused, auto_fit_run, shorten_sequence, split_change


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
    assert auto_fit_run(run_dir, recipe, "mistral-7b", 13 * GIB, log) == recipe  # fits, but no room for a kept layer
    assert (run_dir / RECIPE_FILE).read_bytes() == before
    assert read_run_info(run_dir).autofit == [] and events(run_dir, WarningEvent) == []


def test_auto_fit_spends_a_roomy_cards_memory_on_kept_layers_and_says_so(mistral_run):
    run_dir, recipe, log = mistral_run
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", 24 * GIB, log)
    kept = fitted.memory.layers_keeping_activations
    assert isinstance(kept, int) and 0 < kept < 32 and fitted.train == recipe.train and fitted.data == recipe.data
    assert read_run_recipe(run_dir) == fitted
    [change] = read_run_info(run_dir).autofit
    assert change.endswith(f"--set memory.layers_keeping_activations={kept}") and "the card has room" in change
    [warning] = events(run_dir, WarningEvent)
    assert warning.message.startswith(f'auto-fit: memory.layers_keeping_activations "auto" -> {kept}')


def test_an_oom_turns_the_kept_layers_back_to_recomputing_first(tmp_path):
    import transformers

    from tui_finetune.core.recipe import MemorySpec
    from tui_finetune.engine.memory_techniques import layers_keeping_activations, prepare_for_training
    from tui_finetune.engine.recipe_refit import recompute_every_layer

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    model = prepare_for_training(transformers.LlamaForCausalLM(config), MemorySpec(layers_keeping_activations=3), True)
    run_dir, recipe = small_run(tmp_path, seq_len=512)
    assert layers_keeping_activations(model) == 3
    with EventLog(run_dir / EVENTS_FILE) as log:
        assert recompute_every_layer(run_dir, recipe, model, log, "training") is None  # auto: none asked
        kept = recipe_from_dict({**recipe.to_dict(), "memory": {"layers_keeping_activations": 3}})
        relieved = recompute_every_layer(run_dir, kept, model, log, "the fit-check")
        assert recompute_every_layer(run_dir, kept, model, log, "training") is None  # none keeps its own any more
    assert relieved.memory.layers_keeping_activations == 0 and relieved.train == recipe.train
    assert layers_keeping_activations(model) == 0
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert read_run_recipe(run_dir) == relieved
    change = read_run_info(run_dir).autofit[-1]
    assert change.startswith("CUDA out of memory in the fit-check: memory.layers_keeping_activations 3 -> 0")
    assert events(run_dir, WarningEvent)[-1].advice == "to keep this value: --set memory.layers_keeping_activations=0"


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


# ------------------------------------------------------------ refusals on a measurement, not an estimate

def test_an_over_budget_estimate_goes_to_the_measured_fit_check_instead_of_a_refusal(mistral_run):
    """The 4 GB Gemma case of issue 11: the planner leans high, so an estimate over the budget is not
    grounds to refuse while the weights themselves fit. The savers apply, and the fit-check measures."""
    from tui_finetune.core.fit_levers import auto_fit
    from tui_finetune.core.catalog import CATALOG
    from tui_finetune.core.planner import CUDA_CONTEXT_GROWTH_GIB

    run_dir, recipe, log = mistral_run
    smallest = auto_fit(recipe, CATALOG["mistral-7b"], 1 * GIB, context_allocated=True)
    weights, need = smallest.after.parts["weights"], smallest.after.torch_peak
    free = (weights + need) / 2 / (1 - 0.03) + CUDA_CONTEXT_GROWTH_GIB * GIB  # between the weights and the need
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", free, log)
    assert fitted.memory.offload_activations and fitted.data.seq_len == recipe.data.seq_len
    assert any("fit-check will measure" in w.message for w in events(run_dir, WarningEvent))
    with pytest.raises(FitRefused, match="its weights alone take about"):  # certain: refused at once
        auto_fit_run(run_dir, recipe, "mistral-7b", weights * 0.8, log)


def test_the_free_figure_already_lacks_the_workers_cuda_context(mistral_run):
    """The worker reads the free memory after its CUDA context started: the context is not counted twice."""
    from tui_finetune.core.fit_levers import auto_fit
    from tui_finetune.core.catalog import CATALOG
    from tui_finetune.core.planner import CUDA_CONTEXT_GROWTH_GIB

    run_dir, recipe, log = mistral_run
    estimate = auto_fit(recipe, CATALOG["mistral-7b"], 100 * GIB).before
    just_enough = (estimate.torch_peak / (1 - 0.03)) + CUDA_CONTEXT_GROWTH_GIB * GIB + 0.01 * GIB
    assert just_enough < estimate.total / (1 - 0.03)  # counting the context again would not fit
    assert auto_fit_run(run_dir, recipe, "mistral-7b", just_enough, log) == recipe


def small_run(tmp_path, **data):
    recipe = recipe_from_dict({"model": "llama-3.2-3b", "method": "lora", "data": {"seq_len": 1024, **data},
                               "train": {"micro_batch": 1, "grad_accum": 8}})
    path = tmp_path / "data.jsonl"
    path.write_text("{}\n", encoding="utf-8")
    return create_run(recipe, path, base=tmp_path / "runs"), recipe


def test_an_oom_in_the_fit_check_at_micro_batch_one_halves_a_fresh_runs_sequence(tmp_path):
    run_dir, recipe = small_run(tmp_path)
    with EventLog(run_dir / EVENTS_FILE) as log:
        shorter = shorten_sequence(run_dir, recipe, 1000, "CUDA out of memory. Tried to allocate 2 GiB", log)
    assert shorter.data.seq_len == 500 and read_run_recipe(run_dir) == shorter  # the longest row was 1000
    change = read_run_info(run_dir).autofit[-1]
    assert "micro-batch 1 x 1000 tokens" in change and change.endswith("--set data.seq_len=500")
    assert events(run_dir, WarningEvent)[-1].advice == "to keep this value: --set data.seq_len=500"


def test_below_the_floor_the_run_is_refused_on_the_measurement(tmp_path):
    run_dir, recipe = small_run(tmp_path, seq_len=400)
    with EventLog(run_dir / EVENTS_FILE) as log, pytest.raises(FitRefused, match="micro-batch 1 x 400 tokens") as refused:
        shorten_sequence(run_dir, recipe, 400, "CUDA out of memory. Tried to allocate 2 GiB", log)
    assert "256-token floor" in str(refused.value) and "Tried to allocate 2 GiB" in str(refused.value)
    assert "tui-finetune plan" in refused.value.advice and read_run_recipe(run_dir) == recipe


def test_auto_fit_leaves_sequence_cuts_to_the_measuring_fit_check(mistral_run):
    """Where only a shorter sequence would fit the estimate, the data is not truncated on an estimate:
    the savers apply, a warning names the --set, and the fit-check decides by measuring."""
    run_dir, recipe, log = mistral_run
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", 5.5 * GIB, log)
    assert fitted.data.seq_len == recipe.data.seq_len and fitted.memory.offload_activations
    warning = [w for w in events(run_dir, WarningEvent) if "fit-check will measure" in w.message]
    assert len(warning) == 1 and "data.seq_len=" in warning[0].advice
    assert all("seq_len" not in change for change in read_run_info(run_dir).autofit)


def test_on_a_card_without_bf16_auto_fit_does_not_count_on_compute_dtype_adapters(mistral_run):
    """The engine keeps LoRA weights fp32 under fp16 (the grad scaler refuses fp16 gradients), so on an
    RTX 20xx that saver would be a change on paper only."""
    from tui_finetune.core.recipe_machine import MachineFacts

    run_dir, recipe, log = mistral_run
    turing = MachineFacts(has_cuda=True, supports_bf16=False, bitsandbytes_ok=True, device_name="GeForce RTX 2060")
    fitted = auto_fit_run(run_dir, recipe, "mistral-7b", 8 * GIB, log, machine=turing)
    assert fitted.memory.adapter_dtype == "fp32" and fitted.memory.offload_activations
    assert fitted.train.precision == "fp16" and read_run_recipe(run_dir) == fitted
    assert not any("adapter_dtype" in change for change in read_run_info(run_dir).autofit)
