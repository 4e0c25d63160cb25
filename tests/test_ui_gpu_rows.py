"""The monitor's VRAM panel for a run on several GPUs (issue 16, item 3): a row per card, NVML's figures while
the run is live (the app's reading, here a list of cards the test builds), each rank's peak from the step
events, and the run's own records once it has ended. A CPU run on several processes shows rank 0's RAM."""

from __future__ import annotations

from tui_finetune.core.devices import run_gpus
from tui_finetune.core.events import EventLog, StepEvent
from tui_finetune.core.hardware import GpuInfo, HardwareReport
from tui_finetune.core.paths import runs_dir
from tui_finetune.core.run_folder.info import update_run_info
from tui_finetune.ui.gpu_rows import SMALLEST_NOTE, GpuRow, merge_rank_peaks, read_gpu_rows, render_gpu_rows
from tui_finetune.ui.run_tail import RunTail
from test_ui_snapshots import wait_for
from ui_support import (  # noqa: F401 - ui_home is a fixture
    GIB, T0, TWO_CARDS, build_app, rank_peaks_at, run_async, ui_home, write_run, write_two_gpu_run)

MIB = 2**20
NARROW_PANEL = 36
"""The panel's inner width at 80 columns (its side column is 40 wide: a border and a padding each side)."""


def cards_now(used_gib: tuple[float, float]) -> list[GpuInfo]:
    """What NVML would say of the run's two cards now, and of a third card the run doesn't use."""
    return [GpuInfo(0, "NVIDIA GeForce RTX 4090", 24 * GIB, int(used_gib[0] * GIB), 0, (8, 9)),
            GpuInfo(1, "NVIDIA GeForce RTX 3060", 12 * GIB, int(used_gib[1] * GIB), 0, (8, 6)),
            GpuInfo(2, "NVIDIA GeForce GTX 1080", 8 * GIB, 7 * GIB, 0, (6, 1))]


def test_each_ranks_peak_is_its_highest_in_the_step_events(tmp_path):
    run_dir = write_two_gpu_run(tmp_path, steps=30)
    with EventLog(run_dir / "events.jsonl") as log:  # a later, lower peak never lowers what was reached
        log.emit(StepEvent(step=31, total_steps=40, epoch=1.0, loss=0.5, vram_peak_mb=100.0,
                           rank_vram_peak_mb=[100.0, 9999.0], time=T0 + 200))
    rows = RunTail(run_dir).poll().gpu_rows
    assert [row.peak_mb for row in rows] == [rank_peaks_at(30)[0], 9999.0]
    assert [row.label for row in rows] == ["0 RTX 4090", "1 RTX 3060"]  # "NVIDIA GeForce " dropped
    assert [row.smallest for row in rows] == [False, True]


def test_a_resume_on_another_number_of_gpus_starts_the_peaks_again():
    assert merge_rank_peaks((5.0, 7.0), [6.0, 1.0]) == (6.0, 7.0)
    assert merge_rank_peaks((5.0, 7.0), None) == (5.0, 7.0)  # a CPU step event carries none
    assert merge_rank_peaks((5.0, 7.0), [2.0, 3.0, 4.0]) == (2.0, 3.0, 4.0)  # other ranks, other cards


def test_a_live_run_shows_nvml_used_and_total_of_its_own_cards():
    rows = read_gpu_rows(TWO_CARDS, [9000.0, 8800.0], cards_now((10.5, 9.25)))
    assert [(row.index, row.used_mb, row.total_mb) for row in rows] == [(0, 10.5 * 1024, 24 * 1024),
                                                                       (1, 9.25 * 1024, 12 * 1024)]
    assert [row.peak_mb for row in rows] == [9000.0, 8800.0]


def test_an_ended_run_shows_what_it_recorded_never_the_cards_now():
    rows = read_gpu_rows(TWO_CARDS, [9000.0, 8800.0], None, recorded_used_mb=9900.0, recorded_total_mb=24564.0)
    assert [(row.used_mb, row.total_mb) for row in rows] == [(9900.0, 24564.0), (None, 12288.0)]


def test_ranks_whose_cards_are_unknown_show_their_peaks_alone_and_twins_have_no_smallest():
    rows = read_gpu_rows([], [9000.0, 8800.0], cards_now((1.0, 1.0)))
    assert [(row.label, row.used_mb, row.total_mb, row.peak_mb) for row in rows] == [
        ("rank 0", None, None, 9000.0), ("rank 1", None, None, 8800.0)]
    twins = [{"index": i, "name": "NVIDIA GeForce RTX 3090", "total_mb": 24576.0} for i in (0, 1)]
    assert not any(row.smallest for row in read_gpu_rows(twins, [1.0, 2.0], None))
    assert SMALLEST_NOTE not in render_gpu_rows(read_gpu_rows(twins, [1.0, 2.0], None)).plain


def test_every_line_of_the_rows_fits_the_panel_at_80_columns():
    long_name = {"index": 7, "name": "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "total_mb": 97887.0}
    rows = read_gpu_rows([TWO_CARDS[1], long_name], [11000.0, 96000.0], None, 12000.0, 12288.0)
    lines = render_gpu_rows(rows).plain.splitlines()
    assert lines[1].startswith("1 RTX 3060 *") and lines[2].startswith("7 RTX PRO 6 ")  # cut, not wrapped
    assert lines[-1] == SMALLEST_NOTE and len(lines) == 4
    assert max(len(line) for line in lines) <= NARROW_PANEL, lines
    assert "95.6" in lines[2] and "93.8" in lines[2]  # the big card's size and its peak, in GiB


def test_the_cards_a_run_trains_on_are_those_pinned_in_rank_order():
    report = HardwareReport(gpus=[GpuInfo(i, f"GPU {i}", (8 + 4 * i) * GIB, 0, 0, (8, 6)) for i in range(3)])
    pinned = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,1"}
    assert [gpu.index for gpu in run_gpus(pinned, report)] == [2, 1]
    assert run_gpus({"CUDA_VISIBLE_DEVICES": "2,1"}, report) == []  # CUDA's own order: can't tell
    assert run_gpus({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-1a2b"}, report) == []
    assert [gpu.index for gpu in run_gpus({}, HardwareReport(gpus=report.gpus[:1]))] == [0]
    assert run_gpus({}, HardwareReport()) == []


@run_async
async def test_the_monitor_of_a_live_two_gpu_run_shows_each_cards_nvml_figures(ui_home):
    run_dir = write_two_gpu_run(runs_dir(), steps=12, state="running")
    app = build_app(gpus_sampler=lambda: cards_now((10.5, 9.25)))
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        panel = app.screen.query_one("#vram-panel")
        lines = str(panel.query_one("#vram-caption").render()).splitlines()
        assert panel.border_title == "VRAM (GiB) · 2 GPUs"
        assert "10.5/24.0" in lines[1] and "9.2/12.0" in lines[2] and lines[-1] == SMALLEST_NOTE
        assert f"{rank_peaks_at(12)[1] / 1024:.1f}" in lines[2]
        assert "× 2 GPUs = " in str(app.screen.query_one("#stats-line").render())
        caption = panel.query_one("#vram-caption")  # every row whole on its own line at 80 columns: none wraps
        assert caption.size.height == len(lines) == 4 and max(map(len, lines)) <= caption.size.width


@run_async
async def test_the_monitor_of_a_finished_two_gpu_run_ignores_the_cards_now(ui_home):
    run_dir = write_two_gpu_run(runs_dir(), steps=30)
    app = build_app(gpus_sampler=lambda: cards_now((0.3, 0.3)))
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        lines = str(app.screen.query_one("#vram-panel").query_one("#vram-caption").render()).splitlines()
    used_at_end = (rank_peaks_at(30)[0] + 600) / 1024  # rank 0's last NVML figure, as the run recorded it
    assert f"{used_at_end:.1f}/24.0" in lines[1] and "  -/12.0" in lines[2] and "0.3" not in "".join(lines)


@run_async
async def test_a_cpu_run_on_two_processes_says_its_ram_is_rank_0s(ui_home):
    run_dir = write_run(runs_dir(), 7, "completed", steps=0, end="completed")
    with EventLog(run_dir / "events.jsonl") as log:  # a CPU step: no VRAM figures, no ranks' peaks
        log.emit(StepEvent(step=1, total_steps=2, epoch=0.5, loss=2.0, rss_mb=2048.0, rss_peak_mb=2100.0))
    update_run_info(run_dir, world_size=2)
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_monitor(run_dir)
        await wait_for(pilot, lambda: getattr(app.screen, "updates", 0) > 0)
        panel = app.screen.query_one("#vram-panel")
        assert panel.border_title == "RAM (CPU run, 2 processes)"
        assert str(panel.query_one("#vram-caption").render()).startswith("rank 0 RAM 2.0 GiB")
        assert app.screen.snapshot.gpu_rows == ()


def test_a_row_without_a_card_is_named_by_its_rank():
    assert GpuRow(rank=3, index=None).label == "rank 3"
