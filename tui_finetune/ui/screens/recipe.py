"""Step 3: the recipe. Presets by number key, every knob that moves memory or time, and a live VRAM
estimate with the planner's breakdown and headroom; a choice that won't fit turns red with advice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Label, OptionList, Select, Static, Switch

from tui_finetune.core.catalog import UnknownModelError
from tui_finetune.core.hardware import a_card_of, machine_facts
from tui_finetune.core.recipe import BATCHINGS, METHODS, OPTIMIZERS, RecipeError, RecipeSpec, check_recipe_values
from tui_finetune.core.recipe_io import save_recipe
from tui_finetune.core.recipe_machine import MachineFacts, check_recipe_fits_machine
from tui_finetune.core.run_folder.info import model_short_name
from tui_finetune.core.model_shape import resolve_model_spec
from tui_finetune.core.suggest import FIT_COLOURS, plan_recipe
from tui_finetune.ui.wizard_start import presets_for
from tui_finetune.ui.screens.base import WizardScreen
from tui_finetune.ui.widgets.vram_bar import PART_STYLES, Segment, VramBar

INT_KNOBS = {"knob-r": "LoRA rank r", "knob-alpha": "LoRA alpha", "knob-seq": "sequence length",
             "knob-mb": "micro-batch", "knob-accum": "accumulation", "knob-steps": "max steps",
             "knob-save": "save every"}


class RecipeScreen(WizardScreen):
    STEP = 2
    BINDINGS = [Binding(str(i), f"preset({i})", show=False) for i in range(1, 10)] + [
        Binding("ctrl+s", "save", "Save recipe", priority=True)]

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="wizard-body", id="recipe-body"):
            with VerticalScroll(id="recipe-left"):
                yield Static("", id="recipe-model")
                yield Label("Presets (number keys):", classes="section")
                yield OptionList(id="presets", compact=True)
                yield Label("Knobs:", classes="section")
                yield from self.knob("method", Select([(m, m) for m in METHODS], allow_blank=False, id="knob-method", compact=True))
                yield from self.knob("LoRA r / alpha", Input(id="knob-r", type="integer", compact=True),
                                     Input(id="knob-alpha", type="integer", compact=True))
                yield from self.knob("sequence length", Input(id="knob-seq", type="integer", compact=True))
                yield from self.knob("micro-batch / accum", Input(id="knob-mb", type="integer", compact=True),
                                     Input(id="knob-accum", type="integer", compact=True))
                yield from self.knob("epochs / max steps", Input(id="knob-epochs", type="number", compact=True),
                                     Input(id="knob-steps", type="integer", compact=True))
                yield from self.knob("learning rate", Input(id="knob-lr", compact=True))
                yield from self.knob("optimizer", Select([(o, o) for o in OPTIMIZERS], allow_blank=False,
                                                         id="knob-optimizer", compact=True))
                yield from self.knob("grad checkpointing", Switch(id="knob-gc"))
                yield from self.knob("batching", Select([(b, b) for b in BATCHINGS], allow_blank=False,
                                                        id="knob-batching", compact=True))
                yield from self.knob("save every (steps)", Input(id="knob-save", type="integer", compact=True))
            with VerticalScroll(id="recipe-right"):
                yield Static("", id="fit-verdict")
                yield VramBar(id="estimate-bar")
                yield Static("", id="breakdown")
                yield Static("", id="fit-advice")

    @staticmethod
    def knob(label: str, *widgets) -> ComposeResult:
        with Horizontal(classes="knob"):
            yield Label(label, classes="knob-label")
            yield from widgets

    def on_mount(self) -> None:
        assert self.state.recipe is not None
        self.presets = presets_for(self.state.base_recipe or self.state.recipe)
        options = self.query_one("#presets", OptionList)
        options.add_options([f"{i}  {name}" for i, (name, _) in enumerate(self.presets[:9], 1)])
        self.model = self.state.recipe.model
        self.load_knobs(self.state.recipe)
        options.focus()

    # ------------------------------------------------------------ knobs <-> recipe

    def load_knobs(self, recipe: RecipeSpec) -> None:
        self.model = recipe.model
        self._base = recipe
        q = self.query_one
        q("#knob-method", Select).value = recipe.method
        q("#knob-optimizer", Select).value = recipe.train.optimizer
        for wid, value in (("knob-r", recipe.lora.r), ("knob-alpha", recipe.lora.alpha),
                           ("knob-seq", recipe.data.seq_len), ("knob-mb", recipe.train.micro_batch),
                           ("knob-accum", recipe.train.grad_accum), ("knob-epochs", f"{recipe.train.epochs:g}"),
                           ("knob-steps", recipe.train.max_steps), ("knob-lr", f"{recipe.train.learning_rate:g}"),
                           ("knob-save", recipe.checkpoint.every_steps)):
            q(f"#{wid}", Input).value = str(value)
        q("#knob-gc", Switch).value = recipe.train.gradient_checkpointing
        q("#knob-batching", Select).value = recipe.data.batching
        self.recompute()

    def read_knobs(self) -> RecipeSpec:
        """The recipe the knobs describe; RecipeError names the knob that is not a number."""
        q = self.query_one
        ints = {}
        for wid, name in INT_KNOBS.items():
            try:
                ints[wid] = int(q(f"#{wid}", Input).value)
            except ValueError:
                raise RecipeError(f"{name}: enter a whole number") from None
        try:
            epochs = float(q("#knob-epochs", Input).value)
            lr = float(q("#knob-lr", Input).value)
        except ValueError:
            raise RecipeError("epochs and learning rate must be numbers (e.g. 1 and 2e-4)") from None
        base = self._base
        return replace(
            base, model=self.model, method=str(q("#knob-method", Select).value),
            lora=replace(base.lora, r=ints["knob-r"], alpha=ints["knob-alpha"]),
            data=replace(base.data, seq_len=ints["knob-seq"]).batched_as(str(q("#knob-batching", Select).value)),
            train=replace(base.train, micro_batch=ints["knob-mb"], grad_accum=ints["knob-accum"], epochs=epochs,
                          max_steps=ints["knob-steps"], learning_rate=lr,
                          optimizer=str(q("#knob-optimizer", Select).value),
                          gradient_checkpointing=q("#knob-gc", Switch).value),
            checkpoint=replace(base.checkpoint, every_steps=ints["knob-save"]))

    def machine(self) -> MachineFacts:
        if self.state.planned_gb:  # planning for a card that isn't here: judge it as a CUDA card
            return MachineFacts(has_cuda=True, supports_bf16=True, device_name=a_card_of(self.state.planned_gb))
        return machine_facts(self.state.report) if self.state.report else MachineFacts(False, False, False)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.recompute()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.recompute()

    def on_switch_changed(self, event: Switch.Changed) -> None:
        self.recompute()

    def recompute(self) -> None:
        """Re-plan on every change: the planner is pure arithmetic, well under a millisecond."""
        verdict = self.query_one("#fit-verdict", Static)
        advice = self.query_one("#fit-advice", Static)
        self.query_one("#recipe-model", Static).update(f"Model: [b]{self.model}[/b]")
        try:
            recipe = self.read_knobs()
            check_recipe_values(recipe, "recipe")
            spec = resolve_model_spec(recipe.model)
        except (RecipeError, UnknownModelError) as err:
            self.state.recipe_problem = str(err)
            verdict.update(Text(f"✗ {err}", style="red"))
            return
        plan = plan_recipe(recipe, self.state.card)
        self.state.recipe, self.state.plan = recipe, plan
        try:
            check_recipe_fits_machine(recipe, self.machine(), spec.published_params)
            problem = ""
        except RecipeError as err:
            problem = str(err)
        self.state.recipe_problem = problem
        card = self.state.card
        total = plan.estimate.total_gib
        style = FIT_COLOURS[plan.fit]
        if card is None:
            verdict.update(Text(f"Peak ≈ {total:.2f} GiB on a GPU · this machine trains on the CPU", style=style))
            bar_total = total
        else:
            verdict.update(Text(f"{plan.fit.upper()}: peak ≈ {total:.2f} GiB of {card.usable_gib:.1f} GiB free · "
                                f"headroom {plan.headroom_gib:+.2f} GiB", style=f"bold {style}"))
            bar_total = card.usable_gib
        parts = [Segment(name, gib, PART_STYLES[i % len(PART_STYLES)])
                 for i, (name, gib) in enumerate(plan.estimate.describe())]
        self.query_one("#estimate-bar", VramBar).show(parts, bar_total, legend=False)
        lines = Text()
        for seg in parts:
            lines.append("■ ", style=seg.style)
            lines.append(f"{seg.label:<13}{seg.gib:6.2f} GiB\n")
        lines.append(f"effective batch {recipe.effective_batch}", style="dim")
        self.query_one("#breakdown", Static).update(lines)
        notes = [f"[red]{plan.advice(settings=False)}[/]"] if plan.advice() else []
        if problem:
            notes.append(f"[red]Won't run here: {problem}[/]")
        advice.update("\n".join(notes))

    # ------------------------------------------------------------ actions

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_preset(event.option_index + 1)

    def action_preset(self, number: int) -> None:
        if 1 <= number <= len(self.presets[:9]):
            name, recipe = self.presets[number - 1]
            self.query_one("#presets", OptionList).highlighted = number - 1
            self.load_knobs(recipe)
            self.notify(f"Preset {number}: {name}", timeout=2)

    def action_save(self) -> None:
        from tui_finetune.ui.screens.dialogs import SaveRecipeDialog

        recipe = self.state.recipe
        try:
            check_recipe_values(self.read_knobs(), "recipe")
        except RecipeError as err:
            self.notify(f"Fix the recipe first: {err}", severity="error")
            return
        default = f"{model_short_name(recipe.model)}-{recipe.method}.toml"

        def saved(path: str | None) -> None:
            if path:
                target = Path(path).expanduser()
                save_recipe(recipe, target, header=f"Saved by the tui-finetune wizard.\n"
                                                  f"Run it with: tui-finetune train {target} --data FILE")
                self.notify(f"Saved {target}")

        self.app.push_screen(SaveRecipeDialog(default), saved)

    def action_next(self) -> None:
        from tui_finetune.ui.screens.dataset import DatasetScreen

        try:
            check_recipe_values(self.read_knobs(), "recipe")
        except RecipeError as err:
            self.notify(str(err), severity="error")
            return
        self.recompute()  # the state must match the knobs now, whatever change events are still queued
        self.app.push_screen(DatasetScreen())
