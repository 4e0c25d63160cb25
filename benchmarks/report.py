"""Compare the rows of one benchmark run and write them as JSON and a markdown table.

Plain Python (no torch), so the arithmetic is unit-tested on its own:

* parity: the max over the first ``PARITY_STEPS`` steps of |loss - baseline| / |baseline|, against the
  baseline row of the same case; the issue #7 goal is ``PARITY_GOAL`` (1%).
* planner error: (planner's ``torch_peak`` - measured max_memory_reserved) / measured, for our
  engine's rows; the goal is ``PLANNER_GOAL`` (10%).
* speed: tokens/s over the baseline's and over Unsloth's, in the same case.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import shutil
import subprocess
from pathlib import Path

from benchmarks.stacks import WARMUP_STEPS

PARITY_STEPS = 50
PARITY_GOAL = 0.01
PLANNER_GOAL = 0.10
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton", "liger-kernel", "unsloth",
            "unsloth_zoo")


def case_key(row: dict) -> tuple:
    return (row["model"], row["method"], row["seq"], row["batch"], row.get("cap_gb"))


def case_label(row: dict) -> str:
    return f"{row['model']} {row['method']} seq {row['seq']} x{row['batch']}"


def row_label(row: dict) -> str:
    return f"{case_label(row)} {row['stack']}"


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured; None when either is missing or the measurement is 0."""
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def parity_max_rel(losses: list[float], baseline: list[float], steps: int = PARITY_STEPS) -> float | None:
    """Max over the first ``steps`` shared steps of |loss - baseline| / |baseline|; NaN when a loss is
    not finite (a NaN never passes), None when there is nothing to compare."""
    pairs = list(zip(losses, baseline))[:steps]
    if not pairs:
        return None
    worst = 0.0
    for loss, ref in pairs:
        if not (math.isfinite(loss) and math.isfinite(ref)) or ref == 0:
            return math.nan
        worst = max(worst, abs(loss - ref) / abs(ref))
    return worst


def within(value: float | None, goal: float) -> bool | None:
    if value is None:
        return None
    return bool(abs(value) <= goal)  # NaN compares False


def summarize(rows: list[dict]) -> list[dict]:
    """Add parity, planner and speed comparisons to each row, in place; returns the rows."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if "error" not in row:
            by_case.setdefault(case_key(row), {})[row["stack"]] = row
    for row in rows:
        if "error" in row:
            continue
        peers = by_case[case_key(row)]
        base, uns = peers.get("baseline"), peers.get("unsloth")
        if row["stack"] != "baseline":
            row["parity_max_rel"] = parity_max_rel(row["losses"], base["losses"]) if base else None
            row["parity_ok"] = within(row["parity_max_rel"], PARITY_GOAL)
            row["speed_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        if row["stack"] != "unsloth":
            row["speed_vs_unsloth"] = row["tokens_per_s"] / uns["tokens_per_s"] if uns else None
        if "planner_torch_gib" in row:
            row["planner_error"] = relative_error(row["planner_torch_gib"], row.get("peak_reserved_gib"))
            row["planner_ok"] = within(row["planner_error"], PLANNER_GOAL)
    return rows


# ---------------------------------------------------------------- provenance

def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def card_name(rows: list[dict]) -> str:
    """The card the children reported; nvidia-smi when every child failed before reporting."""
    names = sorted({row["device"] for row in rows if row.get("device")})
    if names:
        return ", ".join(names)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            if out:
                return out[0] + " (nvidia-smi)"
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


# ---------------------------------------------------------------- output

def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:{fmt}}{suffix}"


def _backend_cell(row: dict) -> str:
    if "backend" not in row:
        return "-"
    asked = row.get("backend_requested")
    return row["backend"] if asked in (None, "auto", row["backend"]) else f"{row['backend']} (asked {asked})"


def table_lines(rows: list[dict], steps: int) -> list[str]:
    last = min(PARITY_STEPS, steps)
    lines = [f"| case | card cap | stack | backend | peak reserved GiB | tok/s | x baseline | x Unsloth | planner GiB "
             f"| planner error | parity max rel | loss 1 / loss {last} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = "-" if not r.get("cap_gb") else f"{r['cap_gb']:g} GiB" if r.get("cap_applied", True) else "uncapped"
        head = f"| {case_label(r)} | {cap} | {r['stack']} |"
        if "error" in r:
            lines.append(f"{head} - | {r['error']} | | | | | | | |")
            continue
        losses = r["losses"]
        loss_cell = f"{losses[0]:.4f} / {losses[min(last, len(losses)) - 1]:.4f}" if losses else "-"
        lines.append(
            f"{head} {_backend_cell(r)} | {_num(r.get('peak_reserved_gib'), '.2f')} | {r['tokens_per_s']:.0f} | "
            f"{_num(r.get('speed_vs_baseline'), '.2f')} | {_num(r.get('speed_vs_unsloth'), '.2f')} | "
            f"{_num(r.get('planner_torch_gib'), '.2f')} | {_num(_pct(r.get('planner_error')), '+.1f', '%')} | "
            f"{_num(_pct(r.get('parity_max_rel')), '.3f', '%')} | {loss_cell} |")
    return lines


def backend_lines(rows: list[dict]) -> list[str]:
    """Why each of our rows runs the backend it does (auto's choice, or the fallback from the one asked for)."""
    lines = [f"- {row_label(r)}: {r['backend']}: {r.get('backend_reason') or '-'}" for r in rows if r.get("backend")]
    return ["## Backends", "", *lines, ""] if lines else []


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def goal_lines(rows: list[dict], steps: int) -> list[str]:
    """Which of our engine's rows miss the 1% parity and 10% planner bars, and what couldn't be checked."""
    ours = [r for r in rows if r["stack"].startswith("ours")]
    ok = [r for r in ours if "error" not in r]
    parity_miss = [f"{row_label(r)} ({_num(_pct(r['parity_max_rel']), '.2f', '%')})"
                   for r in ok if r.get("parity_ok") is False]
    parity_none = [row_label(r) for r in ok if r.get("parity_ok") is None]
    planner_miss = [f"{row_label(r)} ({_num(_pct(r['planner_error']), '+.1f', '%')})"
                    for r in ok if r.get("planner_ok") is False]
    planner_none = [row_label(r) for r in ok if r.get("planner_ok") is None]
    compared = min(PARITY_STEPS, steps)
    lines = ["## Goals", "",
             f"- parity (the first {compared} losses within {PARITY_GOAL:.0%} of the baseline's): "
             + _verdict(parity_miss, len(ok) - len(parity_none)),
             f"- planner (torch peak within {PLANNER_GOAL:.0%} of the measured peak reserved): "
             + _verdict(planner_miss, len(ok) - len(planner_none))]
    if parity_none:
        lines.append(f"- parity not checked (no baseline losses in the case): {'; '.join(parity_none)}")
    if planner_none:
        lines.append(f"- planner not checked (no measured GPU peak): {'; '.join(planner_none)}")
    if compared < PARITY_STEPS:
        lines.append(f"- only {steps} steps ran: the parity goal is stated over {PARITY_STEPS}")
    failed = [f"{row_label(r)}: {r['error']}" for r in rows if "error" in r]
    if failed:
        lines.append(f"- no result: {'; '.join(failed)}")
    return lines


def _verdict(misses: list[str], checked: int) -> str:
    if misses:
        return f"**missed** by {'; '.join(misses)}"
    return f"met by all {checked} checked rows of ours" if checked else "no row of ours could be checked"


def write_results(rows: list[dict], command: str, steps: int, out_dir: Path, tag: str) -> Path:
    """``<tag>.json`` (every row, all losses) and ``<tag>.md``; returns the markdown's path."""
    summarize(rows)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    card = card_name(rows)
    cuda = sorted({r["cuda"] for r in rows if r.get("cuda")})
    payload = {"date": stamp, "card": card, "cuda": ", ".join(cuda) or None, "versions": versions(),
               "command": command, "steps": steps, "parity_steps": PARITY_STEPS, "parity_goal": PARITY_GOAL,
               "planner_goal": PLANNER_GOAL, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(payload, indent=1))
    versions_text = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    lines = [f"# Memory and speed: {tag}", "",
             f"- date: {stamp}",
             f"- card: {card}" + (f" (CUDA {payload['cuda']})" if payload["cuda"] else ""),
             f"- versions: {versions_text}",
             f"- command: `{command}`",
             f"- {steps} steps per stack, one micro-batch each; tokens/s leaves out the first {WARMUP_STEPS}; peak is "
             "torch.cuda.max_memory_reserved (add ~0.45 GiB of CUDA context for a real card)",
             "", *table_lines(rows, steps), "", *backend_lines(rows), *goal_lines(rows, steps)]
    path = out_dir / f"{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
