"""``cards.json`` and ``cards.md``: the card simulator's results, kept across runs of the script.

The grid is measured over several GPU calls (each one is limited in time), so the JSON is the memory
between them: ``cells`` maps a cell key to its row, and ``invocations`` lists each call of the script
(date, card, driver, versions, command, the cells it ran). The markdown is rewritten from the JSON
after every cell: a header per invocation, one table row per cell, the long sentences (auto-fit's
changes, warnings, errors) as notes under the table, and a summary line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS_JSON = "cards.json"
RESULTS_MD = "cards.md"
SIMULATOR_ERROR = "error"
"""The outcome of a cell the simulator itself could not run (holder, model build, its own bug):
not a result, so a later call runs it again."""
STATE_ORDER = {"headless": 0, "desktop": 1, "cpu": 2}
COLUMNS = ("cell", "free at start", "outcome", "backend", "micro x accum, seq", "fit-check peak",
           "phase peaks (reserved)", "step peak", "NVML worker peak", "wall", "kill -9 / resume")


def load_results(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RESULTS_JSON
    if not path.exists():
        return {"cells": {}, "invocations": []}
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("cells", {})
    data.setdefault("invocations", [])
    return data


def is_done(results: dict[str, Any], key: str) -> bool:
    row = results["cells"].get(key)
    return row is not None and row.get("outcome") != SIMULATOR_ERROR


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """Write both files by atomic replace (a killed call leaves the previous ones whole); the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((RESULTS_JSON, json.dumps(results, indent=2, sort_keys=False)),
                       (RESULTS_MD, render_markdown(results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(out_dir / name)
    return out_dir / RESULTS_MD


def cell_order(key: str) -> tuple:
    preset, state, install, *kill = key.split(":")
    head = preset.split("gb-", 1)[0]
    return (int(head) if head.isdigit() else 10**6, preset, STATE_ORDER.get(state, 9), install, bool(kill))


# ---------------------------------------------------------------- markdown

def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def phase_peaks_text(peaks: dict[str, float] | None) -> str:
    if not peaks:
        return "-"
    return " ".join(f"{name} {value:.2f}" if isinstance(value, (int, float)) else f"{name} {value}"
                    for name, value in peaks.items())


def kill_text(row: dict[str, Any]) -> str:
    kill = row.get("kill")
    if not kill:
        return "-"
    if not kill.get("done"):
        return f"not killed: {kill.get('why', '?')}"
    text = f"killed after {kill['after_checkpoint']}, {kill['state_after_kill']}"
    if "resume_exit" in kill:
        said = kill.get("resume_said") or "?"
        text += f"; resumed from {kill.get('resumed_from') or '?'} (said {said})"
    elif kill.get("why"):
        text += f"; {kill['why']}"
    return text


def table_row(key: str, row: dict[str, Any]) -> str:
    batch = "-"
    if row.get("micro_batch"):
        batch = f"{row['micro_batch']} x {row['grad_accum']}, {row['seq_len']}"
    backend = row.get("backend") or "-"
    cells = [f"`{key}`", gib(row.get("free_gib_at_start")), f"**{row.get('outcome', '?')}**", backend, batch,
             gib(row.get("fit_peak_gib")), phase_peaks_text(row.get("phase_peaks_gib")), gib(row.get("step_peak_gib")),
             gib(row.get("nvml_worker_peak_gib")) + ("*" if row.get("nvml_worker_peak_source") == "card" else ""),
             f"{row.get('wall_s', 0):.0f} s", kill_text(row)]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def notes_of(row: dict[str, Any]) -> list[str]:
    """The long sentences of one cell, each worth reading on its own."""
    notes = []
    if row.get("install_note"):
        notes.append(row["install_note"])
    free, target = row.get("free_gib_at_start"), row.get("target_free_gib")
    if free is not None and target is not None and abs(free - target) > 0.05:
        notes.append(f"NVML free {free:.2f} GiB against the target {target:.2f} "
                     f"(torch's mem_get_info said {row.get('cuda_free_gib_at_ready', 0):.2f} "
                     "when the holder was ready)")
    if row.get("backend_reason"):
        notes.append(f"backend {row.get('backend')}: {row['backend_reason']}")
    if row.get("batching"):
        notes.append(f"batching: {row['batching']}")
    for name, why in (row.get("backend_failures") or {}).items():
        notes.append(f"backend {name} failed: {why}")
    notes += [f"auto-fit: {change}" for change in row.get("autofit") or []]
    notes += [w for w in row.get("autofit_warnings") or [] if not any(c in w for c in row.get("autofit") or [])]
    notes += [f"fit-check: {m}" for m in row.get("fit_messages") or []]
    if row.get("oom_shrinks"):
        notes.append(f"OOM recovery halved the micro-batch {row['oom_shrinks']} time(s)")
    if row.get("eval_batch"):
        notes.append(f"eval batch shrunk to {row['eval_batch']}")
    notes += [f"warning: {w}" for w in row.get("warnings") or []]
    error = row.get("error")
    if error:
        notes.append(f"error ({error.get('kind') or '?'}): {error.get('message')}"
                     + (f" -> {error['advice']}" if error.get("advice") else ""))
    for name in ("cli_error", "simulator_error"):
        if row.get(name):
            notes.append(f"{name.replace('_', ' ')}: {row[name]}")
    if row.get("nvml_worker_peak_source") == "card":
        notes.append(f"NVML listed no worker pid (another pid namespace?): the worker peak* is the card's used "
                     f"peak {row['nvml_device_peak_gib']:.2f} GiB less the {row.get('used_gib_at_start', 0):.2f} GiB "
                     "used at the start (the holder's)")
    return [n.replace("\n", " ") for n in notes]


def summary_line(cells: dict[str, dict[str, Any]]) -> str:
    outcomes = [row.get("outcome", "") for row in cells.values()]
    completed = outcomes.count("completed")
    refused = sum(o.startswith("refused") for o in outcomes)
    measured = outcomes.count("refused (measured)")
    ooms = outcomes.count("OOM")
    unmeasured = outcomes.count(SIMULATOR_ERROR)
    failed = len(outcomes) - completed - refused - unmeasured
    return (f"**{len(outcomes)} cells: {completed} completed, {refused} refused ({measured} on a measurement), "
            f"{failed} failed ({ooms} out of memory)"
            + (f", {unmeasured} not measured (simulator errors: the next call runs them again)" if unmeasured else "")
            + "**")


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# Card simulator: presets on simulated consumer cards", "",
             "Generated by `benchmarks/cards.py` (see benchmarks/README.md). A holder process takes VRAM until "
             "NVML and `torch.cuda.mem_get_info` report the free memory of the named card (headless: the card "
             "minus 0.3 GiB; desktop: minus 1.0 GiB); then the product's own CLI trains the preset on random "
             "weights of the real architecture with a stand-in tokenizer, on chat rows longer than its seq_len.",
             "Peaks in GiB. *fit-check peak*: the fit phase's measured max_memory_reserved; *phase peaks*: "
             "run.json `phase_peaks_gib`; *step peak*: the largest max_memory_reserved in the step events; "
             "*NVML worker peak*: the worker's own GPU memory as NVML lists it (CUDA context and memory "
             "outside torch included), sampled every 0.2 s.", ""]
    for n, inv in enumerate(results["invocations"], 1):
        card = inv.get("card") or {}
        card_text = (f"{card.get('name')}, driver {card.get('driver')}, {card.get('total_gib', 0):.1f} GiB"
                     if card.get("name") else "CPU (smoke test: no holder, no NVML)")
        versions = ", ".join(f"{k} {v}" for k, v in (inv.get("versions") or {}).items())
        lines += [f"## Run {n}: {inv.get('date', '?')}", f"- card: {card_text}", f"- versions: {versions}",
                  f"- command: `{inv.get('command', '')}`", f"- cells: {', '.join(inv.get('cells') or []) or 'none'}",
                  ""]
    cells = results["cells"]
    keys = sorted(cells, key=cell_order)
    lines += ["## Cells", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [table_row(key, cells[key]) for key in keys]
    lines += ["", summary_line(cells), "", "## Notes", ""]
    for key in keys:
        notes = notes_of(cells[key])
        if notes:
            lines.append(f"- `{key}`")
            lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)
