"""Compare the rows of one benchmark run and write them as JSON and a markdown table.

Plain Python (no torch), so the arithmetic is unit-tested on its own:

* parity: the max over the first ``PARITY_STEPS`` steps of |loss - baseline| / |baseline|, against the
  baseline row of the same case; the issue #7 goal is ``PARITY_GOAL`` (1%).
* planner error: (planner's ``torch_peak`` - measured max_memory_reserved) / measured, for our
  engine's rows; the goal is ``PLANNER_GOAL`` (10%).
* speed: useful (non-pad) tokens/s over the baseline's and over Unsloth's, in the same case and round
  (``--repeat``); with fixed lengths nothing is padded and useful tokens/s is tokens/s.
* memory beside speed (issue #14 item 4): each ratio is shown with the reference's peak, and marked
  when the two peaks differ by more than ``MEMORY_FLAG`` (1.3x) either way: a speed-up bought with
  memory (or lost to a saving) is not a like-for-like speed-up.
* repeats: each stack's mean useful tokens/s, its spread ((max - min) / mean), and the mean of its
  per-round ratios, for runs made with ``--repeat``.
* rows/step in both tables: grouped and packed steps hold about the recipe's rows in fewer passes, and
  train other rows than the baseline's, so their parity is left out (``other_rows``).
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
MEMORY_FLAG = 1.3
"""Peaks further apart than this factor make a speed ratio a comparison at unequal memory."""
UNEQUAL_MARK = "†"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton", "liger-kernel", "unsloth",
            "unsloth_zoo")


def case_key(row: dict) -> tuple:
    return (row["model"], row["method"], row["seq"], row["batch"], row.get("cap_gb"), row.get("lengths", "fixed"),
            row.get("accum", 1))  # rows from before the accumulation have none: 1


def case_label(row: dict) -> str:
    accum = f" accum {row['accum']}" if row.get("accum", 1) > 1 else ""
    real = " real lengths" if row.get("lengths", "fixed") != "fixed" else ""
    return f"{row['model']} {row['method']} seq {row['seq']} x{row['batch']}{accum}{real}"


def other_rows(row: dict) -> str | None:
    """Why a row's steps train other rows than the baseline's (so no step-by-step parity), or None."""
    batching = row.get("batching", "packed" if row.get("packing") else "rows")
    return {"packed": "packed into bins", "grouped": "grouped by length"}.get(batching)


def stack_label(row: dict) -> str:
    return row["stack"] + (f" #{row['rep']}" if "rep" in row else "")


def row_label(row: dict) -> str:
    return f"{case_label(row)} {stack_label(row)}"


def useful_speed(row: dict) -> float:
    """Non-pad tokens/s; rows from before issue #14 have only tokens/s (fixed lengths: the same)."""
    return row.get("useful_tokens_per_s", row["tokens_per_s"])


def memory_ratio(reference: dict, row: dict) -> float | None:
    """The reference's peak over ours; None without both GPU peaks."""
    ref, ours = reference.get("peak_reserved_gib"), row.get("peak_reserved_gib")
    return ref / ours if ref and ours else None


def unequal_memory(ratio: float | None) -> bool:
    return ratio is not None and not (1 / MEMORY_FLAG <= ratio <= MEMORY_FLAG)


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
    """Add parity, planner, speed and memory comparisons to each row, in place; returns the rows.

    Speed and memory compare a row with the baseline and Unsloth rows of its own case and round (``rep``):
    the machine drifts between rounds. Parity compares with the round's baseline, or in a round without
    one with the case's first baseline: the losses repeat from round to round (same seed, same rows; GPU
    kernel noise is far below the 1% goal)."""
    by_case: dict[tuple, dict[str, dict]] = {}
    first_baseline: dict[tuple, dict] = {}
    for row in rows:
        if "error" not in row:
            by_case.setdefault((case_key(row), row.get("rep")), {})[row["stack"]] = row
            if row["stack"] == "baseline":
                first_baseline.setdefault(case_key(row), row)
    for row in rows:
        if "error" in row:
            continue
        peers = by_case[(case_key(row), row.get("rep"))]
        base, uns = peers.get("baseline"), peers.get("unsloth")
        if row["stack"] != "baseline":
            reference = base or first_baseline.get(case_key(row))
            if other_rows(row):  # bins or groups: each step trains other rows than the baseline's (batches.py)
                reference = None
            row["parity_max_rel"] = parity_max_rel(row["losses"], reference["losses"]) if reference else None
            row["parity_ok"] = within(row["parity_max_rel"], PARITY_GOAL)
            row["speed_vs_baseline"] = useful_speed(row) / useful_speed(base) if base else None
            row["baseline_peak_gib"] = base.get("peak_reserved_gib") if base else None
            row["baseline_memory_ratio"] = memory_ratio(base, row) if base else None
        if row["stack"] != "unsloth":
            row["speed_vs_unsloth"] = useful_speed(row) / useful_speed(uns) if uns else None
            row["unsloth_memory_ratio"] = memory_ratio(uns, row) if uns else None
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
    cell = row["backend"] if asked in (None, "auto", row["backend"]) else f"{row['backend']} (asked {asked})"
    fitted = row.get("autofit")  # the :fitted variant's auto-fit to the cap
    return cell + (f"; fitted: {', '.join(fitted)}" if fitted else "")


def _ratio_cell(ratio: float | None, memory: float | None) -> str:
    return _num(ratio, ".2f") + (UNEQUAL_MARK if ratio is not None and unequal_memory(memory) else "")


TABLE_COLUMNS = ["case", "card cap", "stack", "backend", "peak reserved GiB", "tok/s", "useful tok/s", "x baseline",
                 "baseline peak GiB", "x Unsloth", "planner GiB", "planner error", "parity max rel"]
"""Then ``loss 1 / loss N`` and ``rows/step`` (the rows one optimizer step trains: more for bins and groups)."""


def table_lines(rows: list[dict], steps: int) -> list[str]:
    last = min(PARITY_STEPS, steps)
    columns = [*TABLE_COLUMNS, f"loss 1 / loss {last}", "rows/step"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cap = "-" if not r.get("cap_gb") else f"{r['cap_gb']:g} GiB" if r.get("cap_applied", True) else "uncapped"
        head = f"| {case_label(r)} | {cap} | {stack_label(r)} |"
        if "error" in r:
            lines.append(f"{head} - | {r['error']} |" + " |" * (len(columns) - 5))
            continue
        losses = r["losses"]
        loss_cell = f"{losses[0]:.4f} / {losses[min(last, len(losses)) - 1]:.4f}" if losses else "-"
        lines.append(
            f"{head} {_backend_cell(r)} | {_num(r.get('peak_reserved_gib'), '.2f')} | {r['tokens_per_s']:.0f} | "
            f"{useful_speed(r):.0f} | {_ratio_cell(r.get('speed_vs_baseline'), r.get('baseline_memory_ratio'))} | "
            f"{_num(r.get('baseline_peak_gib'), '.2f')} | "
            f"{_ratio_cell(r.get('speed_vs_unsloth'), r.get('unsloth_memory_ratio'))} | "
            f"{_num(r.get('planner_torch_gib'), '.2f')} | {_num(_pct(r.get('planner_error')), '+.1f', '%')} | "
            f"{_num(_pct(r.get('parity_max_rel')), '.3f', '%')} | {loss_cell} | "
            f"{_num(r.get('rows_per_step'), '.1f')} |")
    return lines


def memory_lines(rows: list[dict]) -> list[str]:
    """Every speed ratio whose two peaks are more than ``MEMORY_FLAG`` apart (issue #14 item 4), so none is
    read as a like-for-like speed-up; nothing without GPU peaks."""
    if not any(r.get("peak_reserved_gib") for r in rows if "error" not in r):
        return []
    notes = []
    for r in rows:
        for ref, speed_key, memory_key in (("baseline", "speed_vs_baseline", "baseline_memory_ratio"),
                                          ("Unsloth", "speed_vs_unsloth", "unsloth_memory_ratio")):
            ratio = r.get(memory_key)
            if r.get(speed_key) is None or not unequal_memory(ratio):
                continue
            ours = r["peak_reserved_gib"]
            who = f"the {ref} reserved {ratio:.2f}x ours" if ratio > 1 else f"we reserved {1 / ratio:.2f}x the {ref}'s"
            notes.append(f"- {row_label(r)}: {r[speed_key]:.2f}x the {ref}'s useful tokens/s, but {who} "
                         f"({ours * ratio:.2f} against {ours:.2f} GiB)")
    lines = ["## Speed at equal memory", "",
             f"A ratio marked {UNEQUAL_MARK} compares two runs whose peaks differ by more than {MEMORY_FLAG}x: "
             "it is not a like-for-like speed-up. The speed our engine would reach with the reference's memory "
             "(its setting for that budget) is not measured by this run.", ""]
    return lines + (notes or [f"- every ratio compares peaks within {MEMORY_FLAG}x of each other"]) + [""]


def repeat_summary(rows: list[dict]) -> list[dict]:
    """Per (case, stack) of a ``--repeat`` run: runs, failures, useful tokens/s mean / min / max / spread,
    the mean and range of its per-round ratios, and its largest peak."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "rep" in r:
            groups.setdefault((case_key(r), r["stack"]), []).append(r)
    out = []
    for (_, stack), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        speeds = [useful_speed(r) for r in ok]
        mean = sum(speeds) / len(speeds) if speeds else None
        peaks = [r["peak_reserved_gib"] for r in ok if r.get("peak_reserved_gib")]
        per_step = [r["rows_per_step"] for r in ok if r.get("rows_per_step")]
        out.append({"case": case_label(runs[0]), "stack": stack, "runs": len(ok), "failed": len(runs) - len(ok),
                    "useful_mean": mean, "useful_min": min(speeds, default=None),
                    "useful_max": max(speeds, default=None),
                    "spread": (max(speeds) - min(speeds)) / mean if mean else None,
                    "vs_baseline": _mean_range([r.get("speed_vs_baseline") for r in ok]),
                    "vs_unsloth": _mean_range([r.get("speed_vs_unsloth") for r in ok]),
                    "peak_max_gib": max(peaks, default=None),
                    "rows_per_step": sum(per_step) / len(per_step) if per_step else None})
    return out


def _mean_range(values: list[float | None]) -> list[float] | None:
    """[mean, min, max] of the values there are; None when there are none."""
    present = [v for v in values if v is not None]
    return [sum(present) / len(present), min(present), max(present)] if present else None


def _range_cell(stats: list[float] | None) -> str:
    return "-" if stats is None else f"{stats[0]:.2f} ({stats[1]:.2f}-{stats[2]:.2f})"


def repeat_lines(summary: list[dict]) -> list[str]:
    if not summary:
        return []
    lines = ["## Repeats", "",
             "The stacks ran in turn (A, B, A, B, ...). Spread = (max - min) / mean of useful tokens/s; a ratio is "
             "the mean over the rounds of this stack's useful tokens/s over the reference's in the same round "
             "(min-max in brackets).", "",
             "| case | stack | runs | useful tok/s mean | min-max | spread | x baseline | x Unsloth | peak GiB (max) "
             "| rows/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        runs = f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {s['case']} | {s['stack']} | {runs} | {_num(s['useful_mean'], '.0f')} | "
                     f"{_num(s['useful_min'], '.0f')}-{_num(s['useful_max'], '.0f')} | "
                     f"{_num(_pct(s['spread']), '.1f', '%')} | {_range_cell(s['vs_baseline'])} | "
                     f"{_range_cell(s['vs_unsloth'])} | {_num(s['peak_max_gib'], '.2f')} | "
                     f"{_num(s.get('rows_per_step'), '.1f')} |")
    return lines + [""]


def backend_lines(rows: list[dict]) -> list[str]:
    """Why each of our rows runs the backend it does (auto's choice, or the fallback from the one asked for),
    which Unsloth rows ran with its compiler off, and the CUDA allocator setting each row ran with where it had one
    (our stacks get the product's, core/gpu_allocator.py; Unsloth sets its own when it imports)."""
    lines = [f"- {row_label(r)}: {r['backend']}: {r.get('backend_reason') or '-'}" for r in rows if r.get("backend")]
    lines += [f"- {row_label(r)}: Unsloth's compiler off (UNSLOTH_COMPILE_DISABLE={r['unsloth_compile_disable']})"
              for r in rows if r.get("unsloth_compile_disable")
              and (r.get("backend") == "unsloth" or r["stack"].startswith("unsloth"))]
    lines += [f"- {row_label(r)}: allocator {r['alloc_conf']}" for r in rows if r.get("alloc_conf")]
    return ["## Backends", "", *lines, ""] if lines else []


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def goal_lines(rows: list[dict], steps: int) -> list[str]:
    """Which of our engine's rows miss the 1% parity and 10% planner bars, and what couldn't be checked."""
    ours = [r for r in rows if r["stack"].startswith("ours")]
    ok = [r for r in ours if "error" not in r]
    parity_miss = [f"{row_label(r)} ({_num(_pct(r['parity_max_rel']), '.2f', '%')})"
                   for r in ok if r.get("parity_ok") is False]
    parity_none = [row_label(r) + (f" ({other_rows(r)}: each step trains other rows than the baseline's; "
                                   "the engine's tests (tests/test_data_packing.py) prove its per-token loss)"
                                   if other_rows(r) else "")
                   for r in ok if r.get("parity_ok") is None]
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
        lines.append(f"- parity not checked (no baseline losses in the case, or packed or grouped): "
                     f"{'; '.join(parity_none)}")
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
    repeats = repeat_summary(rows)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    card = card_name(rows)
    cuda = sorted({r["cuda"] for r in rows if r.get("cuda")})
    payload = {"date": stamp, "card": card, "cuda": ", ".join(cuda) or None, "versions": versions(),
               "command": command, "steps": steps, "parity_steps": PARITY_STEPS, "parity_goal": PARITY_GOAL,
               "planner_goal": PLANNER_GOAL, "memory_flag": MEMORY_FLAG, "repeats": repeats, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(payload, indent=1))
    versions_text = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    lines = [f"# Memory and speed: {tag}", "",
             f"- date: {stamp}",
             f"- card: {card}" + (f" (CUDA {payload['cuda']})" if payload["cuda"] else ""),
             f"- versions: {versions_text}",
             f"- command: `{command}`",
             f"- {steps} optimizer steps per stack, each over the case's accumulation of micro-batches (or the "
             "engine's bins or length groups: rows/step says how many rows a step trains); tokens/s counts whole "
             f"steps and leaves out the first {WARMUP_STEPS}; peak is torch.cuda.max_memory_reserved (add ~0.45 GiB of CUDA "
             "context for a real card)",
             "- tok/s counts every token of the batches, padding included; useful tok/s only the rows' own tokens; "
             "x baseline and x Unsloth are ratios of useful tok/s",
             "", *table_lines(rows, steps), "", *memory_lines(rows), *repeat_lines(repeats), *backend_lines(rows),
             *goal_lines(rows, steps)]
    path = out_dir / f"{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
