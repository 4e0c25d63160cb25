"""The wizard's dataset screen takes the two values its advice names (issue 13, item 1): a Columns field
(``data.columns``) and an 'Allow dropping rows' switch (``data.max_drop_fraction``). Both go into the
recipe the run stores, and the check runs again with them."""

from __future__ import annotations

from textual.widgets import Checkbox, Input

from test_ui_snapshots import SIZE, to_dataset, wait_for
from ui_support import build_app, no_gpu_report, run_async, ui_home  # noqa: F401 - ui_home is a fixture


@run_async
async def test_the_columns_field_and_the_drop_switch_fix_what_the_check_advised(ui_home, tmp_path):
    qa = tmp_path / "qa.csv"
    qa.write_text("question,answer\n" + "".join(f"What is {i}?,{'' if i < 6 else i}\n" for i in range(20)),
                  encoding="utf-8")
    app = build_app(hardware=no_gpu_report())
    async with app.run_test(size=SIZE) as pilot:
        await to_dataset(pilot, str(qa))
        assert "in the Columns field" in app.state.data_result["error"]
        assert "--columns" not in app.state.data_result["error"]
        app.screen.query_one("#data-columns", Input).focus()
        await pilot.press(*"prompt=question,reply=answer", "enter")
        await wait_for(pilot, lambda: (app.state.data_result or {}).get("format") == "alpaca")
        assert app.state.recipe.data.columns == "prompt=question,reply=answer"
        assert app.state.data_result["refused"] and "'Allow dropping rows'" in app.state.data_result["refusal"]
        app.screen.query_one("#data-allow-drop", Checkbox).value = True
        await wait_for(pilot, lambda: (app.state.data_result or {}).get("refused") is False)
        assert app.state.recipe.data.max_drop_fraction == 1.0
        assert app.state.data_result["kept"] == 14
