"""Recipes: load, validate, override and save TOML, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui_finetune.core.presets import find_recipe, list_presets
from tui_finetune.core.recipe import RecipeError, RecipeSpec, recipe_diff
from tui_finetune.core.recipe_io import apply_override, load_recipe, save_recipe
from tui_finetune.core.recipe_machine import MachineFacts, check_recipe_fits_machine, resolve_precision

GPU_BF16 = MachineFacts(has_cuda=True, supports_bf16=True, device_name="RTX 3060")
GPU_OLD = MachineFacts(has_cuda=True, supports_bf16=False, device_name="GTX 1080")
CPU = MachineFacts(has_cuda=False, supports_bf16=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, 'model = "phi-2"\n'))
    assert recipe.method == "qlora"
    assert recipe.train.optimizer == "adamw_8bit"  # not paged: see TrainSpec.optimizer
    assert recipe.quant.quant_type == "nf4" and recipe.quant.double_quant
    assert recipe.effective_batch == recipe.train.micro_batch * recipe.train.grad_accum


def test_save_then_load_round_trips_every_field(tmp_path):
    recipe = RecipeSpec(model="gemma-2b", method="lora")
    recipe.lora.target_modules = ["q_proj", "v_proj"]
    recipe.data.seq_len = 777
    recipe.memory.loss_chunk_tokens = 256
    path = tmp_path / "out.toml"
    save_recipe(recipe, path, header="for a test\nrun: tui-finetune train out.toml")
    text = path.read_text()
    assert text.startswith("# for a test\n# run: tui-finetune train out.toml")
    assert load_recipe(path) == recipe


def test_typo_in_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, 'model = "phi-2"\n[train]\nmicro_bach = 2\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: train.micro_bach: unknown key. Did you mean 'train.micro_batch'?"


def test_wrong_type_and_bad_choice_are_named(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.toml: train\.micro_batch: expected a whole number, got 'two'"):
        load_recipe(write(tmp_path, 'model = "phi-2"\n[train]\nmicro_batch = "two"\n'))
    with pytest.raises(RecipeError, match=r"train\.optimizer: 'paged_adamw8bit' is not one of .* Did you mean 'paged_adamw_8bit'\?"):
        load_recipe(write(tmp_path, 'model = "phi-2"\n[train]\noptimizer = "paged_adamw8bit"\n'))
    with pytest.raises(RecipeError, match=r"data\.seq_len: 4 must be between 16"):
        load_recipe(write(tmp_path, 'model = "phi-2"\n[data]\nseq_len = 4\n'))


def test_missing_model_and_invalid_toml_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="model: missing"):
        load_recipe(write(tmp_path, '[train]\nseed = 1\n'))
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(write(tmp_path, 'model = "phi-2\n'))
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_accept_dotted_and_unique_bare_keys(tmp_path):
    path = write(tmp_path, 'model = "phi-2"\n')
    recipe = load_recipe(path, ["train.micro_batch=4", "seq_len=2048", "packing=true", "lora.target_modules=['q_proj']"])
    assert recipe.train.micro_batch == 4
    assert recipe.data.seq_len == 2048
    assert recipe.data.packing is True
    assert recipe.lora.target_modules == ["q_proj"]
    with pytest.raises(RecipeError, match="--set micro_bach: unknown key. Did you mean 'train.micro_batch'"):
        load_recipe(path, ["micro_bach=4"])
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_override({}, "seq_len")


def test_recipes_that_cannot_work_on_the_machine_are_refused():
    with pytest.raises(RecipeError, match="qlora' needs an NVIDIA GPU"):
        check_recipe_fits_machine(RecipeSpec(model="phi-2"), CPU, 2.7e9)
    bf16 = RecipeSpec(model="phi-2")
    bf16.train.precision = "bf16"
    with pytest.raises(RecipeError, match="GTX 1080 has no bf16 support: use 'fp16'"):
        check_recipe_fits_machine(bf16, GPU_OLD, 2.7e9)
    with pytest.raises(RecipeError, match="only for tiny models"):
        check_recipe_fits_machine(RecipeSpec(model="phi-2", method="full"), GPU_BF16, 2.7e9)
    check_recipe_fits_machine(RecipeSpec(model="phi-2"), GPU_BF16, 2.7e9)  # a good one passes


def test_auto_precision_resolves_per_machine():
    recipe = RecipeSpec(model="phi-2")
    assert resolve_precision(recipe, GPU_BF16).train.precision == "bf16"
    assert resolve_precision(recipe, GPU_OLD).quant.compute_dtype == "fp16"
    assert resolve_precision(recipe, CPU).train.precision == "fp32"


def test_recipe_diff_lists_changed_keys():
    a, b = RecipeSpec(model="phi-2"), RecipeSpec(model="phi-2")
    b.train.learning_rate = 1e-4
    assert recipe_diff(a, b) == ["train.learning_rate: 0.0002 -> 0.0001"]


def test_every_shipped_preset_loads_and_opens_with_how_to_run_it():
    presets = list_presets()
    assert len(presets) >= 7
    for path in presets:
        recipe = load_recipe(path)
        first_lines = path.read_text().splitlines()[:6]
        assert first_lines[0].startswith(f"# {path.stem}:"), path
        assert any("tui-finetune train" in line for line in first_lines if line.startswith("#")), path
        assert recipe.model


def test_find_recipe_takes_preset_names_and_suggests():
    assert find_recipe("4gb-phi-2-qlora").name == "4gb-phi-2-qlora.toml"
    with pytest.raises(RecipeError, match="Did you mean 4gb-phi-2-qlora"):
        find_recipe("4gb-phi2-qlora")


def test_the_batching_in_words_follows_packing_then_grouping():
    from tui_finetune.core.recipe import DataSpec

    assert DataSpec().batching == "length groups"  # the default
    assert DataSpec(packing=True).batching == "packed bins"  # flat packing wins over grouping
    assert DataSpec(group_by_length=False).batching == "padded rows"


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_batched_as_sets_the_two_keys_its_words_name_and_inverts_batching(packing, group_by_length):
    from tui_finetune.core.recipe import BATCHINGS, DataSpec

    data = DataSpec(packing=packing, group_by_length=group_by_length, seq_len=512)
    assert data.batched_as(data.batching) == data  # the wizard's knob reads back the recipe it loaded
    assert data.batched_as("length groups") == DataSpec(packing=False, group_by_length=True, seq_len=512)
    assert data.batched_as("padded rows") == DataSpec(packing=False, group_by_length=False, seq_len=512)
    # packing wins over grouping, so the ignored key stays what it was
    assert data.batched_as("packed bins") == DataSpec(packing=True, group_by_length=group_by_length, seq_len=512)
    assert [data.batched_as(word).batching for word in BATCHINGS] == list(BATCHINGS)
    with pytest.raises(RecipeError, match="batching: 'packed' is not one of length groups, packed bins, padded rows"):
        data.batched_as("packed")
