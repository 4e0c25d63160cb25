"""One advice builder: the single changes that lower a recipe's memory, in words and as --set options."""

from __future__ import annotations

from tui_finetune.core.advice import memory_advice, memory_tips, nothing_fits_advice, shorter_seq_len
from tui_finetune.core.planner import GIB, MIN_SEQ_LEN
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.recipe_io import load_recipe, recipe_to_toml


def base_recipe() -> RecipeSpec:
    recipe = RecipeSpec(model="llama-3.2-1b", method="lora")
    recipe.data.seq_len, recipe.train.micro_batch, recipe.train.grad_accum = 2048, 4, 2
    recipe.train.gradient_checkpointing = False
    return recipe


def test_each_tip_names_its_settings_and_the_recipe_it_makes(tmp_path):
    recipe = base_recipe()
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_to_toml(recipe), encoding="utf-8")
    for tip in memory_tips(recipe):
        changed = load_recipe(path, list(tip.settings))  # the --set path a user would take
        assert tip.recipe.data == changed.data and tip.recipe.train == changed.train, tip
        assert tip.recipe.method == changed.method and tip.recipe.lora == changed.lora, tip
    micro = next(t for t in memory_tips(recipe) if t.settings[0].startswith("train.micro_batch"))
    assert micro.recipe.train.micro_batch * micro.recipe.train.grad_accum == 8  # the effective batch stays


def test_the_sequence_is_never_shortened_below_the_floor():
    assert shorter_seq_len(4096) == 2048 and shorter_seq_len(300) == MIN_SEQ_LEN
    assert shorter_seq_len(MIN_SEQ_LEN) is None
    recipe = RecipeSpec(model="llama-3.2-1b", method="qlora")
    recipe.data.seq_len = MIN_SEQ_LEN
    assert "data.seq_len" not in memory_advice(recipe)


def test_out_of_memory_and_nothing_fits_advice_use_the_same_words():
    recipe = RecipeSpec(model="llama-3.2-1b", method="lora")
    recipe.data.seq_len, recipe.train.micro_batch = 2048, 4
    oom = memory_advice(recipe)
    assert "--set data.seq_len=1024" in oom and "--set train.micro_batch=1 --set train.grad_accum=32" in oom
    assert "--set method=qlora" in oom and "--set" not in memory_advice(recipe, settings=False)
    stuck = nothing_fits_advice(recipe, 9 * GIB, 4 * GIB)
    assert stuck.startswith("even lora at 2048 tokens x micro-batch 4 needs about 9.0 GiB and only 4.0 GiB")
    assert "--set method=qlora" in stuck and "smaller model" in stuck
