"""Step 2: which model. The planner's suggestions for the card, ranked, each with its estimated peak
VRAM, fit colour, method, licence, gated status and reason; or any Hub id or local model folder."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Label, Static

from tui_finetune.core.catalog import UnknownModelError
from tui_finetune.core.recipe import RecipeSpec, TrainSpec
from tui_finetune.core.model_shape import resolve_model_spec
from tui_finetune.core.suggest import (
    FIT_COLOURS, NO_CARD, Suggestion, best_option_for_model, plan_recipe, suggest)
from tui_finetune.ui.wizard_start import DEMO_MODEL, demo_recipe, recipe_from_suggestion
from tui_finetune.ui.screens.base import WizardScreen

DEMO_KEY = "demo"


class ModelScreen(WizardScreen):
    """The Hub-id field has focus, so typing goes there; the arrows still move the suggestions' cursor
    and Enter on an empty field takes the highlighted row."""

    STEP = 1
    BINDINGS = [Binding("up", "move(-1)", "Pick · type a Hub id", key_display="↑↓"),
                Binding("down", "move(1)", "Pick", show=False)]

    def compose_body(self) -> ComposeResult:
        with Vertical(classes="wizard-body"):
            yield Static("", id="model-card")
            yield DataTable(id="suggestions", cursor_type="row", zebra_stripes=True)
            yield Static("", id="model-reason")
            with Horizontal(classes="form-row"):
                yield Label("Or a Hub id / model folder:")
                yield Input(placeholder="org/name or /path/to/model (Enter)", id="custom-model")
            yield Static("", id="model-error")

    def on_mount(self) -> None:
        card = self.state.card
        self.options: dict[str, Suggestion | None] = {}
        table = self.query_one(DataTable)
        table.add_columns("#", "model", "method", "seq", "peak GiB", "fit", "licence")
        if card is None:
            self.query_one("#model-card", Static).update(
                "[yellow]No GPU to plan for:[/] the CPU demo trains here; press Escape and enter a card size "
                "to see which models would fit it.")
        else:
            self.query_one("#model-card", Static).update(f"Suggestions for [b]{card.label}[/b] "
                                                         f"({card.usable_gib:.1f} GiB free), best first:")
            for rank, option in enumerate(suggest(card, include_unfit=True), 1):
                self.options[option.model.key] = option
                style = FIT_COLOURS[option.fit]
                licence = option.model.license + (" · gated" if option.model.gated else "")
                table.add_row(str(rank), option.model.key, option.method, str(option.seq_len),
                              f"{option.estimate.total_gib:.1f}", Text(option.fit, style=style), licence,
                              key=option.model.key)
        self.options[DEMO_KEY] = None
        demo = plan_recipe(demo_recipe(), None)
        table.add_row("D", "CPU demo: gemma-3-270m", "lora", str(demo_recipe().data.seq_len),
                      f"{demo.estimate.total_gib:.1f}", Text("cpu", style=FIT_COLOURS[NO_CARD]), "gemma", key=DEMO_KEY)
        if card is None:
            table.move_cursor(row=table.row_count - 1)
        self.query_one("#custom-model", Input).focus()

    def action_move(self, by: int) -> None:
        table = self.query_one(DataTable)
        table.move_cursor(row=max(0, min(table.cursor_row + by, table.row_count - 1)))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key else None
        option = self.options.get(key or "")
        reason = self.query_one("#model-reason", Static)
        if option is None:
            reason.update("The offline CPU demo: Gemma 3 270M from its PyPI package, LoRA on the sample data; "
                          "it runs anywhere and shows the whole flow in minutes.")
        else:
            gated = " [yellow]Gated: accept its licence on the Hub and log in first.[/]" if option.model.gated else ""
            reason.update(f"[{FIT_COLOURS[option.fit]}]{option.fit}[/]: {option.reason}.{gated}")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.choose(event.row_key.value or "")

    def action_next(self) -> None:
        table = self.query_one(DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.choose(key or "")

    def choose(self, key: str) -> None:
        option = self.options.get(key)
        recipe = demo_recipe() if option is None else recipe_from_suggestion(option)
        self.go(recipe)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        error = self.query_one("#model-error", Static)
        if not name:
            self.action_next()
            return
        try:
            spec = resolve_model_spec(name)
        except UnknownModelError as err:
            error.update(f"[red]{str(err).strip(chr(39))}[/]")
            return
        error.update("")
        if self.state.card is None:
            recipe = RecipeSpec(model=name, method="lora", train=TrainSpec(optimizer="adamw_torch"))
        else:
            recipe = recipe_from_suggestion(best_option_for_model(spec, self.state.card))
            recipe = RecipeSpec(**{**recipe.__dict__, "model": name})
        self.go(recipe)

    def go(self, recipe: RecipeSpec) -> None:
        from tui_finetune.ui.screens.recipe import RecipeScreen

        self.state.recipe = recipe
        self.state.base_recipe = recipe
        self.app.push_screen(RecipeScreen())


__all__ = ["ModelScreen", "DEMO_MODEL"]
