"""profile_step.py's results as JSON and markdown: per stack the step's buckets by phase and its top ops, then
the stacks of a case side by side, then how each bucket is matched. The header is memory_speed's (report.py):
date, card, versions, command. Plain Python (no torch)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from benchmarks import report
from benchmarks.profile_trace import BUCKET_LABELS, BUCKET_RULES, BUCKETS, PHASES
from benchmarks.stacks import WARMUP_STEPS


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def step_ms(profile: dict) -> float:
    """The profiled step: the mean of the recorded ``profile::step`` ranges."""
    return sum(profile["step_ms"]) / len(profile["step_ms"])


def unprofiled_ms(profile: dict) -> tuple[float | None, str]:
    """The mean wall time of the warm steps that ran without the profiler (after memory_speed's warm-up steps
    where there are enough), and which steps those were."""
    warm = profile["step_seconds"][:profile["warmup"]]
    first = min(WARMUP_STEPS, max(0, len(warm) - 1))
    chosen = warm[first:]
    if not chosen:
        return None, "none"
    return 1000 * sum(chosen) / len(chosen), f"steps {first + 1}-{len(warm)}"


def stack_lines(row: dict) -> list[str]:
    """One stack: its summary, the bucket table by phase, and its top ops."""
    p = row["profile"]
    total = step_ms(p)
    plain, which = unprofiled_ms(p)
    recorded = p["step_seconds"][p["warmup"]:]
    timed = 1000 * sum(recorded) / len(recorded) if recorded else None
    device = "CUDA time" if p["device"] == "cuda" else "CPU self time"
    backend = f" ({row['backend']})" if row.get("backend") else ""
    cap = "" if not row.get("cap_gb") else f", cap {row['cap_gb']:g} GiB" if row.get("cap_applied") else ", uncapped"
    lines = [f"### {report.case_label(row)}: {row['stack']}{backend}{cap}", "",
             f"- profiled step: {_ms(total)} ms (mean of {p['steps']} recorded steps, steps {p['warmup'] + 1}-"
             f"{p['warmup'] + p['steps']}; the loop's own clock: {_ms(timed)} ms); without the profiler: "
             f"{_ms(plain)} ms ({which}; with real lengths each step has other rows, so compare loosely)",
             f"- useful tokens a recorded step: {p.get('useful_tokens_per_step', 0):.0f}; peak reserved: "
             f"{_ms(row.get('peak_reserved_gib'))} GiB; LoRA rank {p['lora_rank']}, vocabulary {p['vocab']}",
             f"- host syncs a step: {p['sync_calls_per_step']:.1f}"
             + (" (CPU profile: `.item()` / `bool(tensor)` reads, each a sync on a GPU)" if p["device"] == "cpu"
                else "") + (": " + "; ".join(f"{s['where']} x{s['calls_per_step']:.1f}" for s in p["sync_sources"])
                            if p["sync_sources"] else ""),
             f"- recompute range on {p['recompute_layers_tagged']} checkpointed layers; loss range on "
             f"{', '.join(p['loss_tagged']) or 'nothing (kernel names only)'}", "",
             "| bucket | ms/step | % of step | forward | recompute | backward | optimizer | no phase |",
             "|---|---|---|---|---|---|---|---|"]
    by_phase = p["buckets_by_phase_ms"]
    for bucket in BUCKETS:
        cells = " | ".join(_ms(by_phase[bucket][ph]) if by_phase[bucket][ph] else "" for ph in (*PHASES, "none"))
        lines.append(f"| {BUCKET_LABELS[bucket]} | {_ms(p['buckets_ms'][bucket])} | "
                     f"{_pct(p['buckets_ms'][bucket], total)} | {cells} |")
    summed = sum(p["buckets_ms"].values())
    phases = " | ".join(_ms(p["phases_ms"][ph]) for ph in (*PHASES, "none"))
    lines += [f"| **sum** | {_ms(summed)} | {_pct(summed, total)} | {phases} |", "",
              f"Top {len(p['top_ops'])} by {device} (ms a step; a kernel's own time, overlaps not shared):", "",
              "| # | kernel / op | bucket | launched by | calls/step | ms/step | % of step |",
              "|---|---|---|---|---|---|---|"]
    for i, op in enumerate(p["top_ops"], 1):
        name = op["name"] if len(op["name"]) <= 90 else op["name"][:87] + "..."
        lines.append(f"| {i} | `{name.replace('|', '/')}` | {BUCKET_LABELS[op['bucket']]} | {op['launched_by']} | "
                     f"{op['calls_per_step']:.0f} | {_ms(op['ms_per_step'])} | {_pct(op['ms_per_step'], total)} |")
    return lines + [""]


def comparison_lines(rows: list[dict]) -> list[str]:
    """The profiled stacks of each case side by side, bucket by bucket (ms a step)."""
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        if "profile" in row:
            cases.setdefault(report.case_key(row), []).append(row)
    lines = []
    for group in cases.values():
        if len(group) < 2:
            continue
        head = " | ".join(r["stack"] for r in group)
        lines += [f"### {report.case_label(group[0])}", "", f"| ms a step | {head} |", "|---|" + "---|" * len(group)]
        for bucket in BUCKETS:
            lines.append(f"| {BUCKET_LABELS[bucket]} | "
                         + " | ".join(_ms(r["profile"]["buckets_ms"][bucket]) for r in group) + " |")
        lines.append("| **step** | " + " | ".join(f"**{_ms(step_ms(r['profile']))}**" for r in group) + " |")
        for phase in PHASES:
            lines.append(f"| ({phase}) | " + " | ".join(_ms(r["profile"]["phases_ms"][phase]) for r in group) + " |")
        lines.append("| useful tokens a step | "
                     + " | ".join(f"{r['profile'].get('useful_tokens_per_step', 0):.0f}" for r in group) + " |")
        lines.append("| ms per 1k useful tokens | " + " | ".join(_per_k(r["profile"]) for r in group) + " |")
        lines.append("| host syncs a step | "
                     + " | ".join(f"{r['profile']['sync_calls_per_step']:.1f}" for r in group) + " |")
        lines.append("")
    return (["## Side by side", "", "Each stack's profiled step in ms, bucket by bucket (same case, same call).",
             ""] + lines) if lines else []


def _per_k(profile: dict) -> str:
    tokens = profile.get("useful_tokens_per_step") or 0
    return _ms(1000 * step_ms(profile) / tokens) if tokens else "-"


def rule_lines() -> list[str]:
    return ["## How buckets are matched", "",
            "Each GPU kernel, copy or memset launched inside a recorded step goes to the first bucket whose rule "
            "matches, tried in this order: optimizer, copies, dequantize, loss, attention, GEMM, other. 'Enclosing' "
            "means the CPU ranges (ops and record_function ranges) open on the launching thread at the launch. "
            "The phase is optimizer inside `Optimizer.step`, recompute inside `profile::recompute` (a checkpointed "
            "layer's function called during backward), backward inside `autograd::engine::evaluate_function`, "
            "else forward; idle time takes the phase of the kernel that ends it. On the CPU each op's self time "
            "goes to the bucket of the op, with the same rules.", "",
            *[f"- **{BUCKET_LABELS[b]}**: {BUCKET_RULES[b]}" for b in BUCKETS], ""]


def write_results(rows: list[dict], command: str, out_dir: Path, tag: str) -> Path:
    """``profile-<tag>.json`` (every row with its profile) and ``profile-<tag>.md``; returns the markdown's path."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    card = report.card_name(rows)
    cuda = sorted({r["cuda"] for r in rows if r.get("cuda")})
    payload = {"date": stamp, "card": card, "cuda": ", ".join(cuda) or None, "versions": report.versions(),
               "command": command, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile-{tag}.json").write_text(json.dumps(payload, indent=1))
    versions_text = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    done = [r for r in rows if "profile" in r]
    settings = (f"{done[0]['profile']['warmup']} plain warm-up steps, then {done[0]['profile']['steps']} steps "
                "recorded by torch.profiler (record_shapes)" if done else "no stack finished")
    lines = [f"# Step profile: {tag}", "",
             f"- date: {stamp}",
             f"- card: {card}" + (f" (CUDA {payload['cuda']})" if payload["cuda"] else ""),
             f"- versions: {versions_text}",
             f"- command: `{command}`",
             f"- each stack: memory_speed's step of that stack in its own process; {settings}. ms are per "
             "recorded step; the buckets sum to the profiled step (the `profile::step` range, which includes the "
             "benchmark's closing `torch.cuda.synchronize`). The profiler slows the CPU side: compare the step "
             "without it, and read the launch-gap bucket as an upper bound.", ""]
    failed = [f"- {report.row_label(r)}: {r['error']}" for r in rows if "error" in r]
    if failed:
        lines += ["## No result", "", *failed, ""]
    lines += comparison_lines(rows)
    if done:
        lines += ["## Per stack", ""]
        for row in done:
            lines += stack_lines(row)
    lines += rule_lines()
    path = out_dir / f"profile-{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
