"""Measure the app's time to first frame and its frame latency while a run floods events.

    python benchmarks/ui_startup.py            # prints a Markdown table; --write updates results/ui.md

1. Time to first frame: a fresh interpreter builds the app headless and exits right after the first
   screen is painted; timed from process start, 5 runs, median. ``python -X importtime`` lists the
   slowest imports and checks that torch is not among them.
2. Latency under load: a fake run appends 1000 step events a second to events.jsonl while the monitor
   tails it; a 20 ms timer on the UI thread measures how late it fires (event-loop lag), and Ctrl+T key
   events (a theme switch, the heaviest key) measure the time until the app has handled them.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIRST_FRAME = """
import time, sys
from tui_finetune.ui.app import AppContext, make_app
from tui_finetune.core.hardware import HardwareReport
app = make_app(AppContext(hardware=HardwareReport(problem="none"), vram_sampler=None, offer_on_start=False))
def painted():
    app.exit()
app.call_after_refresh(painted)
app.run(headless=True, size=(100, 30))
"""


def time_first_frame(runs: int = 5) -> tuple[float, list[str], bool]:
    env = {**os.environ, "TUI_FINETUNE_HOME": tempfile.mkdtemp()}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", FIRST_FRAME], check=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", FIRST_FRAME], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in out.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            rows.append((int(cumulative), name.rstrip()))
    top = [f"{name.strip()} {us / 1000:.0f} ms" for us, name in
           sorted((r for r in rows if r[1][1:2] != " "), reverse=True)[:6]]
    torch = any(name.strip() == "torch" for _, name in rows)
    return statistics.median(times), top, torch


FLOOD = """
import sys, time
from tui_finetune.core.events import EventLog, StepEvent
path, rate = sys.argv[1], int(sys.argv[2])
step = 0
with EventLog(path) as log:
    while True:
        tick = time.perf_counter()
        for _ in range(rate // 100):
            step += 1
            log.emit(StepEvent(step=step, total_steps=10**7, epoch=step / 10**6, loss=2.0 / (1 + step / 5000),
                               lr=1e-4, tokens_per_s=12000.0, eta_s=1000.0, nvml_used_mb=9000.0,
                               nvml_total_mb=12288.0, vram_peak_mb=8000.0))
        time.sleep(max(0.0, 0.01 - (time.perf_counter() - tick)))
"""
"""A fake worker: its own process, as the real one is, appending ``rate`` step events a second."""


async def measure_latency(seconds: float = 8.0, rate: int = 1000) -> dict:
    from datetime import datetime

    from tui_finetune.core.hardware import HardwareReport
    from tui_finetune.core.recipe import RecipeSpec
    from tui_finetune.core.run_folder.info import create_run, update_run_info
    from textual import events

    from tui_finetune.ui.app import AppContext, make_app

    home = Path(tempfile.mkdtemp())
    os.environ["TUI_FINETUNE_HOME"] = str(home)
    run_dir = create_run(RecipeSpec(model="llama-3.1-8b"), REPO / "recipes" / "demo-cpu.jsonl", home / "runs",
                         now=datetime(2026, 1, 1))
    update_run_info(run_dir, pid=os.getpid())
    app = make_app(AppContext(hardware=HardwareReport(problem="none"), vram_sampler=None, offer_on_start=False))
    lags: list[float] = []
    keys: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_monitor(run_dir)
        await pilot.pause(0.5)
        expected = [time.perf_counter() + 0.02]
        measuring = [True]

        def tick() -> None:
            now = time.perf_counter()
            if measuring[0]:
                lags.append(max(0.0, now - expected[0]))
            expected[0] = now + 0.02

        app.set_interval(0.02, tick)
        flooder = subprocess.Popen([sys.executable, "-c", FLOOD, str(run_dir / "events.jsonl"), str(rate)], cwd=REPO)
        await asyncio.sleep(seconds / 2)  # the flood alone: the timer measures the lag it causes
        measuring[0] = False
        end = time.perf_counter() + seconds / 2
        while time.perf_counter() < end:
            before = app.theme
            start = time.perf_counter()
            app.post_message(events.Key("ctrl+t", None))  # a key as the driver delivers it: restyles everything
            while app.theme == before and time.perf_counter() - start < 5:
                await asyncio.sleep(0.001)
            keys.append(time.perf_counter() - start)
            await asyncio.sleep(0.5)
        flooder.terminate()
        flooder.wait()
        from tui_finetune.core.events import read_events

        written = len(read_events(run_dir / "events.jsonl")[0])
        await pilot.pause(1.0)
        shown = app.screen.snapshot.step
        updates = app.screen.updates
    lags.sort()
    keys.sort()
    return {"events": written, "shown_step": shown, "ui_updates": updates, "seconds": seconds,
            "lag_p50_ms": 1000 * lags[len(lags) // 2], "lag_p95_ms": 1000 * lags[int(len(lags) * 0.95)],
            "lag_max_ms": 1000 * lags[-1], "key_p50_ms": 1000 * keys[len(keys) // 2],
            "key_max_ms": 1000 * keys[-1]}


def main() -> None:
    first, top, torch = time_first_frame()
    load = asyncio.run(measure_latency())
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
    text = f"""# UI performance

Date: {date.today()} · machine: {machine} · command: `python benchmarks/ui_startup.py --write`

## Time to first frame
| measure | value |
|---|---|
| process start to first painted screen (median of 5, headless, 100x30) | **{first * 1000:.0f} ms** |
| torch imported | {"**yes (bug)**" if torch else "no"} |
| slowest top-level imports (`python -X importtime`) | {", ".join(top)} |

## Monitor latency while a run appends 1000 step events a second
| measure | value |
|---|---|
| step events written in {load['seconds']:.0f} s | {load['events']:,} |
| last step shown once the flood stopped | {load['shown_step']:,} |
| monitor updates (merged snapshots) | {load['ui_updates']} |
| event-loop lag of a 20 ms timer (first half, no keys): p50 / p95 / max | {load['lag_p50_ms']:.1f} / {load['lag_p95_ms']:.1f} / {load['lag_max_ms']:.1f} ms |
| Ctrl+T every 0.5 s (second half; a theme switch restyles everything) until handled: p50 / max | {load['key_p50_ms']:.1f} / {load['key_max_ms']:.1f} ms |
"""
    print(text)
    if "--write" in sys.argv:
        (REPO / "benchmarks" / "results" / "ui.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
