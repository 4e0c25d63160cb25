"""``tui-finetune plan``: which models and recipes fit a card, with the planner's breakdown.

Plain core only (no torch), so it answers instantly, also for a card that isn't in this machine.
The verdict on a recipe is core's ``suggest.plan_recipe``, the one the wizard shows.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tui_finetune.core.catalog import ModelSpec, UnknownModelError
from tui_finetune.core.fit_levers import auto_fit, usable_in_worker
from tui_finetune.core.hardware import a_card_of, best_gpu, detect_hardware
from tui_finetune.core.model_shape import resolve_model_spec
from tui_finetune.core.planner import (
    CUDA_CONTEXT_GIB, GIB, PlanCase, VramEstimate, profile_from_memory)
from tui_finetune.core.presets import find_recipe, list_presets, preset_card_gb
from tui_finetune.core.recipe import RecipeError, RecipeSpec
from tui_finetune.core.recipe_io import load_recipe
from tui_finetune.core.recipe_machine import MachineFacts, resolve_precision
from tui_finetune.core.suggest import (
    FIT_COLOURS, FITS, SEQ_CHOICES, WONT_FIT, CardSpec, card_from_gpu, plan_case, plan_recipe, suggest)


def card_for_plan(vram_gb: float | None) -> tuple[CardSpec | None, str]:
    """The card to plan for: ``--vram`` if given, else the best GPU here. Returns (card, note)."""
    if vram_gb is not None:
        return CardSpec(total_gib=vram_gb), f"Planning for {a_card_of(vram_gb)} (--vram)."
    report = detect_hardware()
    gpu = best_gpu(report)
    if gpu is None:
        return None, (f"{report.problem or 'No NVIDIA GPU found.'}\n"
                      "Plan for the card you have with --vram GB, e.g. 'tui-finetune plan --vram 8'.")
    card = card_from_gpu(gpu)
    return card, f"Planning for {gpu.name} ({card.total_gib:.1f} GiB, {card.used_by_others_gib:.1f} GiB used by others)."


def _breakdown_table(title: str, estimate: VramEstimate) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, gib in estimate.describe():
        table.add_row(part, f"{gib:.2f}")
    table.add_row("[bold]peak[/bold]", f"[bold]{estimate.total_gib:.2f}[/bold]")
    return table


def _fit_text(fit: str) -> str:
    return f"[{FIT_COLOURS[fit]}]{fit}[/{FIT_COLOURS[fit]}]"


def plan_one_recipe(console: Console, card: CardSpec, recipe: RecipeSpec, label: str) -> int:
    """The planner's verdict on one recipe (core's ``plan_recipe``, as the wizard shows it), with advice."""
    plan = plan_recipe(recipe, card)
    model = resolve_model_spec(recipe.model)
    console.print(f"[bold]{label}[/bold]: {model.key} {recipe.method}, sequence {recipe.data.seq_len} "
                  f"x micro-batch {recipe.train.micro_batch}")
    console.print(_breakdown_table("Peak VRAM estimate", plan.estimate))
    console.print(f"{_fit_text(plan.fit)}: {plan.reason}")
    if plan.fit == WONT_FIT:
        console.print(Text(plan.advice()))
    elif (room := room_sentence(recipe, model, card)):
        console.print(Text(room))
    return 0 if plan.fit != WONT_FIT else 1


def room_sentence(recipe: RecipeSpec, model: ModelSpec, card: CardSpec) -> str:
    """What auto-fit will spend this card's room on when the run starts (core/fit_levers.py), in words; empty
    when it spends none. As the worker decides (engine/recipe_refit.py ``auto_fit_run``): on the free memory it
    reads after its CUDA context started (``usable_in_worker``), at the card's precision."""
    resolved = resolve_precision(recipe, MachineFacts(has_cuda=True, supports_bf16=card.supports_bf16))
    free = usable_in_worker((card.usable_gib - CUDA_CONTEXT_GIB) * GIB)
    decision = auto_fit(resolved, model, free, context_allocated=True, shorten_sequences=False)
    kept = decision.recipe.memory.layers_keeping_activations
    if kept == recipe.memory.layers_keeping_activations or not isinstance(kept, int):
        return ""
    where = " on the PyTorch path (Unsloth, where it loads, checkpoints its own way)" if recipe.memory.backend == "auto" else ""
    return (f"Room to spare: auto-fit will let {kept} of {model.num_layers} layers keep their activations instead of "
            f"recomputing them{where} (faster, same result; about {decision.after.total_gib:.1f} GiB with the CUDA "
            "context). --set memory.layers_keeping_activations=0 keeps every layer recomputing.")


def plan_model(console: Console, card: CardSpec, model_name: str) -> int:
    model = resolve_model_spec(model_name)
    table = Table(title=f"{model.key} on {card.label}", header_style="bold")
    for column in ("method", "seq", "peak GiB", "fit", "largest part"):
        table.add_column(column, justify="right" if column in ("seq", "peak GiB") else "left")
    dtype = "bf16" if card.supports_bf16 else "fp16"
    any_fit = False
    for method in ("qlora", "lora"):
        for seq in sorted(SEQ_CHOICES):
            option = plan_case(PlanCase(model, method=method, seq_len=seq, compute_dtype=dtype), card)
            part, gib = option.estimate.describe()[0]
            table.add_row(method, str(seq), f"{option.estimate.total_gib:.2f}", _fit_text(option.fit), f"{part} {gib:.2f}")
            any_fit |= option.fit == FITS
    console.print(table)
    return 0 if any_fit else 1


def plan_overview(console: Console, card: CardSpec) -> int:
    table = Table(title=f"Suggested models for {card.label}", header_style="bold")
    for column in ("#", "model", "method", "seq", "peak GiB", "fit", "largest part", "licence"):
        table.add_column(column, justify="right" if column in ("#", "seq", "peak GiB") else "left",
                         no_wrap=column in ("model", "fit"))
    for rank, option in enumerate(suggest(card, include_unfit=True), 1):
        licence = option.model.license + (" (gated)" if option.model.gated else "")
        part, gib = option.estimate.describe()[0]
        table.add_row(str(rank), option.model.key, option.method, str(option.seq_len),
                      f"{option.estimate.total_gib:.2f}", _fit_text(option.fit), f"{part} {gib:.1f}", licence)
    console.print(table)

    presets = Table(title=f"Presets on {card.label}", header_style="bold")
    for column in ("preset", "model", "method", "seq x batch", "peak GiB", "fit"):
        presets.add_column(column, no_wrap=column in ("preset", "fit"))
    for path in list_presets():
        if preset_card_gb(path) is None:  # the CPU demo and other presets not made for a card
            continue
        recipe = load_recipe(path)
        try:
            model = resolve_model_spec(recipe.model)
        except UnknownModelError:
            continue
        option = plan_case(PlanCase.from_recipe(model, recipe), card, profile_from_memory(recipe.memory))
        presets.add_row(path.stem, model.key, recipe.method, f"{recipe.data.seq_len} x {recipe.train.micro_batch}",
                        f"{option.estimate.total_gib:.2f}", _fit_text(option.fit))
    console.print(presets)
    console.print("Green fits with 10% of the card to spare; yellow is tight; red won't fit. "
                  "Estimates include ~0.45 GiB of CUDA context.")
    return 0


def run_plan_command(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    card, note = card_for_plan(args.vram)
    console.print(note)
    if card is None:
        return 1
    try:
        if args.recipe:
            path = find_recipe(args.recipe)
            recipe = load_recipe(path, [f"data.seq_len={args.seq}"] if args.seq else None)
            if args.model:
                recipe = replace(recipe, model=args.model)
            return plan_one_recipe(console, card, recipe, path.stem)
        if args.model:
            return plan_model(console, card, args.model)
        return plan_overview(console, card)
    except (RecipeError, UnknownModelError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
