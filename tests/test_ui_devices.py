"""The wizard on a machine with two NVIDIA GPUs: the launch screen asks how many to train on, plans for the
smallest card chosen (a recipe for the 24 GB card won't fit beside a 12 GB one), and launches the recipe
with ``train.devices`` set (issue 16). With one GPU it asks nothing (the launch snapshot shows that
screen unchanged)."""

from __future__ import annotations

from tui_finetune.core.devices import DATA_PARALLEL_NOTE
from tui_finetune.core.hardware import GpuInfo, HardwareReport
from ui_support import GIB, build_app, fake_report, run_async, ui_home  # noqa: F401 - ui_home is a fixture
from test_ui_snapshots import to_recipe, wait_for

SIZE = (110, 40)
MIXED_GPUS = HardwareReport(gpus=[GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, GIB, 11 * GIB, (8, 6)),
                                  GpuInfo(1, "NVIDIA GeForce RTX 4090", 24 * GIB, GIB, 23 * GIB, (8, 9))],
                            driver_version="550.54", cuda_driver_version="12.4")
TWIN_GPUS = HardwareReport(gpus=[GpuInfo(i, "NVIDIA GeForce RTX 3090", 24 * GIB, GIB, 23 * GIB, (8, 6))
                                 for i in (0, 1)], driver_version="550.54", cuda_driver_version="12.4")


async def _to_launch(pilot) -> None:
    await to_recipe(pilot)
    await pilot.press("ctrl+n")
    await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "DatasetScreen")
    pilot.app.screen.check("tests/data/samples/instructions.alpaca.jsonl")
    await wait_for(pilot, lambda: pilot.app.state.data_result is not None)
    await pilot.press("ctrl+n")
    await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == "LaunchScreen")


@run_async
async def test_two_gpus_are_planned_for_the_smaller_card_which_can_block_the_start(ui_home):
    app = build_app(hardware=MIXED_GPUS)
    async with app.run_test(size=SIZE) as pilot:
        await _to_launch(pilot)  # the first suggestion for the 24 GB card
        screen = app.screen
        select = screen.query_one("#devices")
        assert select.value == 1 and screen.plan_card.total_gib == 24 and app.state.plan.fit != "won't fit"
        select.value = 2
        await wait_for(pilot, lambda: app.state.recipe.train.devices == 2)
        assert screen.plan_card.name == "NVIDIA GeForce RTX 3060"  # every GPU holds the whole model
        assert app.state.plan.fit == "won't fit" and DATA_PARALLEL_NOTE in app.state.plan.reason
        assert screen.blocker().startswith("the recipe won't fit the card")
        assert screen.query_one("#start").disabled
        select.value = 1
        await wait_for(pilot, lambda: not screen.query_one("#start").disabled)


@run_async
async def test_two_gpus_launch_the_recipe_with_train_devices_and_twice_the_effective_batch(ui_home):
    launched = []

    def launcher(recipe, data_path):
        launched.append(recipe)
        raise RuntimeError("not started in this test")

    app = build_app(hardware=TWIN_GPUS, launcher=launcher)
    async with app.run_test(size=SIZE) as pilot:
        await _to_launch(pilot)
        one_gpu_batch = app.state.recipe.effective_batch
        app.screen.query_one("#devices").value = 2
        await wait_for(pilot, lambda: app.state.recipe.train.devices == 2)
        assert app.state.recipe.effective_batch == 2 * one_gpu_batch
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: launched)
    assert launched[0].train.devices == 2


@run_async
async def test_one_gpu_is_not_asked_about(ui_home):
    app = build_app(hardware=fake_report())
    async with app.run_test(size=SIZE) as pilot:
        await _to_launch(pilot)
        assert not app.screen.query("#devices")
        assert app.state.recipe.train.devices == 1


@run_async
async def test_the_users_cuda_visible_devices_of_one_card_means_no_question(ui_home, monkeypatch):
    """The launch would refuse 2 GPUs where the user's CUDA_VISIBLE_DEVICES names one: the wizard doesn't offer them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    app = build_app(hardware=TWIN_GPUS)
    async with app.run_test(size=SIZE) as pilot:
        await _to_launch(pilot)
        assert not app.screen.query("#devices")
        assert app.state.recipe.train.devices == 1
