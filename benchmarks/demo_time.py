"""Time a newcomer's first two commands: ``tui-finetune --help`` and the CPU demo, ``tui-finetune train demo-cpu``.

    python benchmarks/demo_time.py            # prints a Markdown report; --write updates results/demo-time.md

It runs the real command in a fresh interpreter with a throw-away ``TUI_FINETUNE_HOME`` (so no run is
left in the user's list; the converted demo model in the cache is reused, as on any run after the
first), measures the wall time from the command's start to its exit, and splits the worker's time into
phases from ``events.jsonl``: each phase lasts until the next phase event (steps and evals are inside
``train``; the ``fit`` event comes when its measured step is done, so that step counts under the phase
before it). The load average is recorded: on a busy machine the number says little. The recipe promises "under 3 minutes on a 2-core CPU"; this is where that is checked.
``--help`` is timed from process start to exit (median of 5) and ``python -X importtime`` checks that
it imports none of torch, transformers, datasets, textual or rich (goal: under 0.3 s).
Not a test: it takes minutes and its number depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "demo-time.md"
PROMISE_S = 180.0
DEMO = REPO / "recipes" / "demo-cpu.toml"
HEAVY = ("torch", "transformers", "datasets", "textual", "rich")


def time_help(runs: int = 5) -> tuple[float, list[str]]:
    """(median seconds of ``tui-finetune --help``, the heavy packages it imported)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tui_finetune.cli", "--help"]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    trace = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in trace.splitlines() if "|" in line}
    return sorted(times)[runs // 2], sorted(imported & set(HEAVY))


def run_demo(home: Path) -> tuple[float, int]:
    """Run ``train demo-cpu`` to its end; (wall seconds, exit code)."""
    env = {**os.environ, "TUI_FINETUNE_HOME": str(home), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    # The preset by path: by name, an editable install elsewhere may answer with its own recipes/ folder.
    proc = subprocess.run([sys.executable, "-m", "tui_finetune.cli", "train", str(DEMO)], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, proc.returncode


def phase_durations(events_file: Path) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """(phase, seconds) in order, each until the next phase event (the last until the last event), and
    totals of what happened inside training: steps, evaluations."""
    events = [json.loads(line) for line in events_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    marks = [(e["phase"], e["time"]) for e in events if e["type"] == "phase"]
    end = events[-1]["time"] if events else 0.0
    phases = [(name, (marks[i + 1][1] if i + 1 < len(marks) else end) - t) for i, (name, t) in enumerate(marks)]
    steps = [e for e in events if e["type"] == "step"]
    inside = {"steps": float(steps[-1]["step"]) if steps else 0.0,
              "evals": float(sum(e["type"] == "eval" for e in events)),
              "worker_s": end - events[0]["time"] if events else 0.0}
    return phases, inside


def report(wall: float, code: int, phases: list[tuple[str, float]], inside: dict[str, float],
           load: tuple[float, float], help_s: float | None = None, heavy: list[str] | None = None) -> str:
    verdict = "within" if wall <= PROMISE_S else "OVER"
    busy = (" The machine was busy (other programs): a number over 3 minutes here says little about an idle machine."
            if max(load) > 1.5 else "")
    lines = [f"# The CPU demo, end to end ({date.today()})", "",
             f"`tui-finetune train demo-cpu` on {platform.machine()} with {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, the demo model already converted. Measured by `benchmarks/demo_time.py`.",
             "", f"- wall time, command start to exit: **{wall:.0f} s** ({verdict} the recipe's 3-minute promise); "
             f"exit code {code}",
             f"- load average (1 min) before and after: {load[0]:.1f}, {load[1]:.1f}.{busy}",
             f"- worker, first event to last: {inside['worker_s']:.0f} s; {inside['steps']:.0f} steps, "
             f"{inside['evals']:.0f} evaluation(s)",
             f"- before the worker's first event (CLI start, worker start, imports): {wall - inside['worker_s']:.0f} s",
             "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in phases]
    if help_s is not None:
        lines += ["", f"`tui-finetune --help`: **{help_s:.2f} s** (median of 5, goal under 0.3 s); heavy packages "
                      f"imported: {', '.join(heavy or []) or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(REPO)}")
    args = parser.parse_args()
    help_s, heavy = time_help()
    with tempfile.TemporaryDirectory(prefix="demo-time-") as home:
        before = os.getloadavg()[0]
        wall, code = run_demo(Path(home))
        load = (before, os.getloadavg()[0])
        runs = sorted((Path(home) / "runs").glob("*/events.jsonl"))
        if not runs:
            print(f"no run was created (exit code {code})")
            return 1
        phases, inside = phase_durations(runs[-1])
    text = report(wall, code, phases, inside, load, help_s, heavy)
    print(text)
    if args.write:
        RESULT.write_text(text, encoding="utf-8")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
