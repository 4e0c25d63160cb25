"""Auto-fit against the planner, with real catalog models and the shipped presets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tui_finetune.core.fit_levers import ROOM_MARGIN, auto_fit, next_micro_batch
from tui_finetune.core.planner import MIN_SEQ_LEN, MLP_CHUNK_TOKENS
from tui_finetune.core.catalog import get_model
from tui_finetune.core.planner import GIB, PlanCase, estimate_peak_vram, kept_layer_bytes, profile_from_memory
from tui_finetune.core.presets import find_recipe
from tui_finetune.core.recipe import MemorySpec
from tui_finetune.core.recipe_io import apply_override, load_recipe, recipe_from_dict


def preset(name: str):
    return load_recipe(find_recipe(name))


def estimate_total(recipe, model) -> float:
    return estimate_peak_vram(PlanCase.from_recipe(model, recipe), profile_from_memory(recipe.memory)).total


def test_a_16gb_preset_on_8gb_free_is_adjusted_until_the_estimate_fits():
    recipe, model = preset("16gb-mistral-7b-qlora"), get_model("mistral-7b")
    decision = auto_fit(recipe, model, 8 * GIB)
    assert decision.fits and decision.changed
    assert decision.before.total > 8 * GIB
    assert decision.after.total <= decision.budget_bytes < 8 * GIB
    assert estimate_total(decision.recipe, model) == pytest.approx(decision.after.total)
    # the memory savers come first, and here they are enough: the batch and the sequence stay
    assert decision.recipe.memory.offload_activations
    assert decision.recipe.train == recipe.train and decision.recipe.data == recipe.data
    assert decision.settings[:2] == ["memory.embeddings_on_cpu=true", "memory.offload_activations=true"]
    assert all(item.startswith("memory.") for item in decision.settings)


def test_a_recipe_that_already_fits_is_returned_unchanged():
    recipe, model = preset("4gb-phi-2-qlora"), get_model("phi-2")
    recipe = replace(recipe, memory=replace(recipe.memory, layers_keeping_activations=0))  # pinned: room unspent
    decision = auto_fit(recipe, model, 8 * GIB)
    assert decision.fits and not decision.changed
    assert decision.changes == [] and decision.settings == []
    assert decision.recipe == recipe and decision.before == decision.after


def test_smaller_micro_batches_keep_the_effective_batch():
    model = get_model("mistral-7b")
    recipe = preset("16gb-mistral-7b-qlora")
    recipe = replace(recipe, train=replace(recipe.train, micro_batch=8, grad_accum=2),
                     memory=replace(recipe.memory, offload_activations=True, adapter_dtype="compute"))
    decision = auto_fit(recipe, model, 8 * GIB)
    assert decision.fits
    assert decision.recipe.train.micro_batch < 8
    assert decision.recipe.effective_batch == recipe.effective_batch == 16
    sentence = next(c for c in decision.changes if c.startswith("train.micro_batch"))
    assert "8 -> " in sentence and "2 -> " in sentence and "effective batch 16 unchanged" in sentence
    assert f"--set train.micro_batch={decision.recipe.train.micro_batch}" in sentence
    assert f"--set train.grad_accum={decision.recipe.train.grad_accum}" in sentence


@pytest.mark.parametrize("micro, expected", [(8, 4), (6, 3), (3, 1), (5, 1), (2, 1)])
def test_the_next_micro_batch_divides_the_old_one(micro, expected):
    assert next_micro_batch(micro) == expected


def test_sequence_length_is_cut_last_and_never_below_the_floor():
    recipe, model = preset("16gb-mistral-7b-qlora"), get_model("mistral-7b")
    decision = auto_fit(recipe, model, 5 * GIB)
    assert decision.fits
    assert decision.recipe.train.micro_batch == 1 and decision.recipe.memory.offload_activations
    assert MIN_SEQ_LEN <= decision.recipe.data.seq_len < recipe.data.seq_len
    assert decision.changes[-1].startswith(f"data.seq_len 4096 -> {decision.recipe.data.seq_len} (rows longer")


def test_the_data_longest_row_is_a_free_cut_before_truncating():
    recipe, model = preset("16gb-mistral-7b-qlora"), get_model("mistral-7b")
    decision = auto_fit(recipe, model, 5.75 * GIB, data_longest=1500)
    assert decision.fits and decision.recipe.data.seq_len == 1500
    assert "nothing is cut" in decision.changes[-1] and decision.changes[-1].endswith("--set data.seq_len=1500")


def test_grouped_batches_take_the_data_longest_row_cut_and_flat_bins_do_not():
    """A group's budget is micro_batch x the longest row (data.group_by_length), so the longest row still sizes a
    grouped micro-batch; a flat bin fills seq_len with rows whatever their length (data.packing)."""
    recipe, model = preset("16gb-mistral-7b-qlora"), get_model("mistral-7b")
    assert recipe.data.group_by_length and not recipe.data.packing
    decision = auto_fit(recipe, model, 5.75 * GIB, data_longest=1500)
    assert decision.recipe.data.seq_len == 1500
    packed = replace(recipe, data=replace(recipe.data, packing=True))
    assert auto_fit(packed, model, 5.75 * GIB, data_longest=1500).recipe.data.seq_len != 1500


def test_nothing_fits_returns_fits_false_with_the_smallest_estimate_and_advice():
    recipe, model = preset("24gb-llama-3.1-8b-lora"), get_model("llama-3.1-8b")
    decision = auto_fit(recipe, model, 6 * GIB)
    assert not decision.fits
    smallest = decision.after.total / GIB
    assert f"{smallest:.1f} GiB" in decision.advice
    assert "--set method=qlora" in decision.advice and "smaller model" in decision.advice
    # a shorter sequence that the planner says saves nothing is not taken
    assert decision.recipe.data.seq_len >= MIN_SEQ_LEN
    assert estimate_total(replace(decision.recipe, data=replace(decision.recipe.data, seq_len=MIN_SEQ_LEN)),
                          model) >= decision.after.total


def test_every_change_names_old_and_new_values_and_a_set():
    recipe = recipe_from_dict({"model": "gemma-2b", "method": "qlora", "data": {"seq_len": 4096},
                               "train": {"micro_batch": 4, "grad_accum": 4, "gradient_checkpointing": False},
                               "memory": {"chunked_loss": False}})
    decision = auto_fit(recipe, get_model("gemma-2b"), 3.5 * GIB)
    assert decision.fits and len(decision.changes) >= 4
    for sentence in decision.changes:
        key = sentence.split(" ", 1)[0]
        assert " -> " in sentence and f"--set {key}=" in sentence
    assert {s.split("=")[0] for s in decision.settings} >= {"memory.chunked_loss", "train.gradient_checkpointing"}
    # the settings, applied as --set overrides, give the adjusted recipe back
    data = recipe.to_dict()
    for item in decision.settings:
        apply_override(data, item)
    assert recipe_from_dict(data) == decision.recipe


def test_a_free_figure_read_after_cuda_started_does_not_count_the_context_twice():
    recipe, model = preset("8gb-llama-3.1-8b-qlora"), get_model("llama-3.1-8b")
    need = estimate_total(recipe, model)
    free = need - 0.2 * GIB  # the context (0.45 GiB) already left this much free
    assert auto_fit(recipe, model, free, reserve_bytes=0).changed
    kept = auto_fit(recipe, model, free, reserve_bytes=0, context_allocated=True)
    assert kept.fits and not kept.changed


def test_fp16_cards_do_not_get_compute_dtype_adapters():
    recipe = preset("16gb-mistral-7b-qlora")
    recipe = replace(recipe, quant=replace(recipe.quant, compute_dtype="fp16"),
                     train=replace(recipe.train, precision="fp16"))
    decision = auto_fit(recipe, get_model("mistral-7b"), 8 * GIB)
    assert decision.recipe.memory.adapter_dtype == "fp32"
    assert not any("adapter_dtype" in c for c in decision.changes)


@pytest.mark.skipif(not hasattr(MemorySpec(), "mlp_chunk_tokens"), reason="this MemorySpec has no MLP chunking")
def test_the_mlp_runs_in_chunks_before_adapters_change_precision():
    recipe = preset("16gb-mistral-7b-qlora")  # 4096 x 2 = 8192 tokens: below the planner's auto threshold
    decision = auto_fit(recipe, get_model("mistral-7b"), 8.5 * GIB)
    assert decision.fits and decision.recipe.memory.mlp_chunk_tokens == MLP_CHUNK_TOKENS
    assert decision.recipe.memory.adapter_dtype == "fp32"
    assert any(c.startswith(f"memory.mlp_chunk_tokens 0 -> {MLP_CHUNK_TOKENS} (") for c in decision.changes)


def test_an_untied_model_just_over_budget_gets_only_the_input_embedding_in_cpu_ram():
    """The 8 GB Llama-3.1-8B preset on a card where it misses by less than its 1 GiB input embedding: that
    lever costs neither quality nor speed, so it comes first and is the only change."""
    recipe, model = preset("8gb-llama-3.1-8b-qlora"), get_model("llama-3.1-8b")
    embedding_bytes = model.input_embedding_params() * 2
    need = estimate_total(recipe, model)
    decision = auto_fit(recipe, model, need - embedding_bytes / 2, reserve_bytes=0)
    assert decision.fits and decision.settings == ["memory.embeddings_on_cpu=true"]
    [change] = decision.changes
    assert change.startswith("memory.embeddings_on_cpu false -> true (the input embedding waits in CPU RAM")
    assert change.endswith(": --set memory.embeddings_on_cpu=true")
    assert decision.recipe == replace(recipe, memory=replace(recipe.memory, embeddings_on_cpu=True))


@pytest.mark.parametrize("name, key", [("4gb-gemma-2b-qlora", "gemma-2b"), ("6gb-llama-3.2-3b-qlora", "llama-3.2-3b")])
def test_a_tied_model_never_gets_the_input_embedding_lever(name, key):
    recipe, model = preset(name), get_model(key)
    assert model.tied_embeddings
    for short_by in (0.1 * GIB, 0.5 * GIB, 2 * GIB):
        decision = auto_fit(recipe, model, estimate_total(recipe, model) - short_by, reserve_bytes=0)
        assert decision.changed and not decision.recipe.memory.embeddings_on_cpu
        assert not any("embeddings_on_cpu" in item for item in decision.settings)


def test_unsloth_never_gets_the_input_embedding_lever():
    recipe, model = preset("8gb-llama-3.1-8b-qlora"), get_model("llama-3.1-8b")
    recipe = replace(recipe, memory=replace(recipe.memory, backend="unsloth"))
    decision = auto_fit(recipe, model, estimate_total(recipe, model) - 0.5 * GIB, reserve_bytes=0)
    assert not decision.recipe.memory.embeddings_on_cpu



def test_room_on_the_card_is_spent_on_layers_that_keep_their_activations():
    recipe, model = preset("4gb-phi-2-qlora"), get_model("phi-2")
    assert recipe.memory.layers_keeping_activations == "auto"
    tight, roomy, spacious = (auto_fit(recipe, model, free * GIB) for free in (3.2, 6, 24))
    assert not tight.changed and tight.recipe == recipe
    kept = roomy.recipe.memory.layers_keeping_activations
    assert 0 < kept < spacious.recipe.memory.layers_keeping_activations == model.num_layers
    for decision in (roomy, spacious):
        kept = decision.recipe.memory.layers_keeping_activations
        assert decision.fits and decision.settings == [f"memory.layers_keeping_activations={kept}"]
        assert decision.changes[0].startswith(f'memory.layers_keeping_activations "auto" -> {kept} (the card has room')
        assert decision.after.total * (1 + ROOM_MARGIN) <= decision.budget_bytes  # the planner's error to spare
        assert decision.after.total > decision.before.total
        assert estimate_total(decision.recipe, model) == pytest.approx(decision.after.total)
    one_more = replace(roomy.recipe, memory=replace(roomy.recipe.memory, layers_keeping_activations=kept + 1))
    assert estimate_total(one_more, model) * (1 + ROOM_MARGIN) > roomy.budget_bytes  # as many as fit, no more


@pytest.mark.parametrize("setting", [
    "memory.layers_keeping_activations=0", "memory.layers_keeping_activations=2", "memory.offload_activations=true",
    "train.gradient_checkpointing=false", "memory.backend=unsloth", "memory.attention=eager",
    "memory.upcast_frozen_fp32=true", "method=full"])
def test_the_room_is_left_alone_where_the_recipe_decided_or_the_backend_checkpoints_its_own_way(setting):
    raw = preset("4gb-phi-2-qlora").to_dict()
    apply_override(raw, setting, "test")
    recipe, model = recipe_from_dict(raw, "test"), get_model("phi-2")
    decision = auto_fit(recipe, model, 200 * GIB)  # room for every layer, and for a full fine-tune
    assert decision.fits and not decision.changed and decision.recipe == recipe


def test_a_tight_fit_spends_nothing_after_its_savers():
    recipe, model = preset("16gb-mistral-7b-qlora"), get_model("mistral-7b")
    decision = auto_fit(recipe, model, 8 * GIB)
    assert decision.recipe.memory.offload_activations and decision.recipe.memory.layers_keeping_activations == "auto"


def test_each_kept_layer_costs_what_the_planner_says_a_layer_keeps():
    recipe, model = preset("16gb-mistral-7b-qlora"), get_model("mistral-7b")
    totals = [estimate_total(replace(recipe, memory=replace(recipe.memory, layers_keeping_activations=kept)), model)
              for kept in (0, 1, 2, model.num_layers, model.num_layers + 5)]
    tokens = recipe.data.seq_len * recipe.train.micro_batch
    # all it keeps, with the padding mask's seq_len a token, less the one hidden-state copy a recomputing layer keeps
    per_layer = tokens * (kept_layer_bytes(model, 2, "fp32") + recipe.data.seq_len * 2 - model.hidden_size * 2)
    slack = profile_from_memory(recipe.memory).slack
    assert totals[1] - totals[0] == pytest.approx(per_layer * (1 + slack))
    assert totals[2] - totals[1] == pytest.approx(totals[1] - totals[0])
    assert totals[3] == totals[4]  # no more layers than the model has


def test_on_an_fp16_card_compute_dtype_adapters_are_planned_fp32_as_the_engine_keeps_them():
    """Without bf16 the engine keeps adapters fp32 whatever the recipe says (loading.adapter_compute_dtype), so a
    kept layer keeps fp32 copies of its inputs: auto-fit must not plan them at bf16 and keep too many."""
    model = get_model("phi-2")

    def fp16(adapter_dtype):
        raw = preset("4gb-phi-2-qlora").to_dict()
        for item in ("train.precision=fp16", f"memory.adapter_dtype={adapter_dtype}"):
            apply_override(raw, item, "test")
        return recipe_from_dict(raw, "test")

    assert estimate_total(fp16("compute"), model) == estimate_total(fp16("fp32"), model)
    kept = [auto_fit(fp16(dtype), model, 8 * GIB).recipe.memory.layers_keeping_activations for dtype in ("compute", "fp32")]
    assert kept[0] == kept[1] > 0
