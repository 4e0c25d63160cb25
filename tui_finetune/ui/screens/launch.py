"""Step 5: everything on one page (model, recipe, data, estimated peak VRAM, rough time per epoch), then
start. The run is created and its worker started detached by ``core.run_folder.control.launch_run``, the same
code as ``tui-finetune train --detach``. On a machine with more than one NVIDIA GPU it also asks how many to
train on (``train.devices``): the plan is then for the smallest of them, since each holds the whole model."""

from __future__ import annotations

import os
from dataclasses import replace

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Label, Select, Static

from tui_finetune.core.devices import DATA_PARALLEL_NOTE, smallest_gpu, visible_gpu_count
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.hardware import machine_ram_bytes
from tui_finetune.core.suggest import FIT_COLOURS, CardSpec, card_from_gpu, estimate_cpu_ram_gib, plan_recipe
from tui_finetune.ui.durations import format_duration, rough_epoch_seconds
from tui_finetune.ui.screens.base import WizardScreen
from tui_finetune.ui.screens.dataset import launch_blocker


class LaunchScreen(WizardScreen):
    STEP = 4
    BINDINGS = [Binding("ctrl+n", "next", "Start training", priority=True)]
    plan_card: CardSpec | None = None
    """The card the plan is for: the wizard's, or the smallest of the GPUs chosen."""

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(classes="wizard-body", id="launch-body"):
            gpus = self.gpu_count()
            if gpus > 1:
                with Horizontal(classes="form-row"):
                    yield Label("Train on:")
                    yield Select([(f"{n} GPU{'s' if n > 1 else ''}", n) for n in range(1, gpus + 1)],
                                 value=self.devices(), allow_blank=False, id="devices")
            yield Static(id="launch-summary")
            yield Static(id="launch-blocker")
            yield Button("Start training (Enter)", id="start", variant="success")

    def gpu_count(self) -> int:
        """GPUs a run could use: those found here (fewer where the user's ``CUDA_VISIBLE_DEVICES`` names fewer,
        as the launch counts them), unless the wizard plans for another card."""
        report = self.state.report
        return 0 if report is None or self.state.planned_gb else visible_gpu_count(report, os.environ)

    def devices(self) -> int:
        recipe = self.state.recipe
        devices = recipe.train.devices if recipe is not None else 1
        return max(1, min(devices if isinstance(devices, int) else self.gpu_count(), max(self.gpu_count(), 1)))

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "devices" and self.state.recipe is not None and isinstance(event.value, int):
            self.state.recipe = replace(self.state.recipe, train=replace(self.state.recipe.train, devices=event.value))
            self.refresh_plan()

    def on_mount(self) -> None:
        self.refresh_plan()
        self.query_one("#start", Button).focus()

    def refresh_plan(self) -> None:
        """Plan what is launched, never a stale estimate: on several GPUs, for the smallest of them."""
        self.plan_card = self.state.card
        if self.gpu_count() > 1 and self.devices() > 1 and self.state.report is not None:
            gpu = smallest_gpu(self.state.report, self.devices(), os.environ)
            self.plan_card = card_from_gpu(gpu) if gpu is not None else self.plan_card
        if self.state.recipe is not None:
            self.state.plan = plan_recipe(self.state.recipe, self.plan_card)
        self.query_one("#launch-summary", Static).update(self.summary())
        blocker = self.blocker()
        self.query_one("#launch-blocker", Static).update(f"[red b]✗ Can't start: {blocker}[/]" if blocker else "")
        self.query_one("#start", Button).disabled = bool(blocker)

    def blocker(self) -> str:
        state = self.state
        data = launch_blocker(state.data_result)
        if data:
            return f"data: {data}"
        if state.recipe_problem:
            return state.recipe_problem
        if state.plan is not None and state.plan.fit == "won't fit":
            return f"the recipe won't fit the card. {state.plan.advice(settings=False)}"
        return ""

    def summary(self) -> Table:
        s = self.state
        recipe, plan, data = s.recipe, s.plan, s.data_result or {}
        assert recipe is not None
        t = recipe.train
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        table.add_row("model", recipe.model)
        table.add_row("method", f"{recipe.method} · r {recipe.lora.r} · alpha {recipe.lora.alpha}")
        gpus = f" × {t.devices} GPUs" if isinstance(t.devices, int) and t.devices > 1 else ""
        table.add_row("batch", f"seq {recipe.data.seq_len} × micro-batch {t.micro_batch} × accumulation "
                               f"{t.grad_accum}{gpus} = {recipe.effective_batch} sequences a step")
        length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
        table.add_row("schedule", f"{length} · lr {t.learning_rate:g} ({t.scheduler}) · {t.optimizer}")
        table.add_row("memory", f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'} · "
                                f"{recipe.data.batching} · save every "
                                f"{recipe.checkpoint.every_steps} steps")
        table.add_row("data", f"{s.data_path} · {data.get('format', '?')} · {data.get('kept', 0)} rows")
        lengths = data.get("lengths") or {}
        if s.card is None:  # a CPU run: what it costs is RAM, and the worker's RSS shows it live
            ram = estimate_cpu_ram_gib(recipe, lengths.get("max"))
            machine = machine_ram_bytes()
            of = f" of this machine's {machine / 2**30:.1f} GiB" if machine else ""
            table.add_row("peak RAM", f"≈ {ram:.1f} GiB{of} (a CPU run: no GPU memory is used)")
        elif plan is not None:
            card = self.plan_card or s.card
            table.add_row("peak VRAM", Text(f"≈ {plan.estimate.total_gib:.2f} GiB on {card.label} ({plan.fit})",
                                            style=FIT_COLOURS[plan.fit]))
            if gpus:
                table.add_row("GPUs", f"planned for the smallest card: {DATA_PARALLEL_NOTE}")
        tokens = min(lengths.get("mean", 0), recipe.data.seq_len) * data.get("kept", 0) * (1 - recipe.data.eval_split)
        if tokens:
            seconds = rough_epoch_seconds(recipe, tokens, on_gpu=s.card is not None and not s.planned_gb)
            counted = "counted by a byte-level stand-in, not the model's tokenizer: too high" \
                if data.get("tokenizer_stand_in") else "a rough figure from the model size"
            table.add_row("time / epoch", f"roughly {format_duration(seconds)} ({tokens:,.0f} tokens; {counted}, "
                                          "refined live once training runs)")
        table.add_row("run folder", str(runs_dir()))
        return table

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_next()

    def action_next(self) -> None:
        blocker = self.blocker()
        if blocker:
            self.notify(f"Can't start: {blocker}", severity="error")
            return
        assert self.state.recipe is not None
        try:
            run_dir = self.context.launcher(self.state.recipe, self.state.data_path)
        except Exception as err:  # noqa: BLE001 - a failed start is a message, never a crash
            self.notify(f"Could not start the run: {err}", severity="error", timeout=10)
            return
        self.tui.open_monitor(run_dir, from_wizard=True)
