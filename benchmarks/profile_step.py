"""Issue #14 item 2: where a benchmarked training step's time goes, per stack, as a committed breakdown.

The step profiled is memory_speed's step of that stack: the same child set-up (``stacks.run_one``: model,
adapters, optimizer, batches, cap), the same loop (``stacks.train_and_measure``), watched through its
``StepObserver`` hook. Each (case, stack) runs in its own process; the first ``--warmup`` steps run plain,
the next ``--record`` under torch.profiler (CPU + CUDA activities on a GPU, CPU only otherwise), each inside
a ``profile::step`` range. The child reads the trace (profile_trace.py) and returns the step's wall time cut
into buckets (NF4 dequantize, GEMM base / LoRA, attention, loss, optimizer, other kernels, copies, sync
waits, launch / CPU gaps, step edges), each split into forward / recompute / backward / optimizer, and the
top ops by self time. Cases and stacks are memory_speed's (benchmarks/README.md):

  python -m benchmarks.profile_step --cases gemma-2b:qlora:1024:4:real --stacks ours:universal,baseline --tag x
  python -m benchmarks.profile_step --smoke --out /tmp/prof   # tests the script on the CPU

Results: ``OUT/profile-TAG.md`` and ``.json`` (rewritten after each stack), with ``--trace DIR`` also each
stack's chrome trace (gzipped; large).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import memory_speed, profile_report, stacks

MODULE = "benchmarks.profile_step"
SMOKE_CASE = memory_speed.SMOKE_CASE
SMOKE_STACKS = "ours:universal,baseline"
DEFAULT_WARMUP, DEFAULT_RECORD = 5, 3
SMOKE_WARMUP, SMOKE_RECORD = 2, 2
BASE_LORA_RANK = 16
"""The rank the baseline and Unsloth stacks use (stacks.py: r16 on all linear layers)."""


def lora_rank(case: dict, stack: str, overrides: list[str], smoke: bool) -> int:
    """The LoRA rank the stack trains with: our recipe's (``--set lora.r`` counts), else the benchmark's 16."""
    kind, backend, variant = stacks.split_stack(stack)
    if kind != "ours":
        return BASE_LORA_RANK
    folder = stacks.model_folder(case["model"])
    return stacks.ours_recipe(folder, case, backend, overrides, smoke, variant).lora.r


def useful_tokens_per_step(case: dict, first: int, count: int, vocab: int, batching: str) -> float:
    """The rows' own tokens in steps ``first .. first+count-1``, on average: the same rows batches.py feeds the loop."""
    from benchmarks import batches

    plan = batches.plan_steps(case, first + count, vocab, batching)
    per_step = [sum(len(example["input_ids"]) for micro in step for example in micro) for step in plan]
    return sum(per_step[first:]) / count


def profile_one(case: dict, stack: str, args: argparse.Namespace) -> dict:
    """In the child: memory_speed's run of the stack with the profiler watching; the row plus its profile."""
    from benchmarks import profile_hooks, profile_trace

    folder = Path(args.trace) if args.trace else Path(tempfile.mkdtemp(prefix="tuift-profile-"))
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / f"profile-{args.tag}-{case['model']}-{stack.replace(':', '-')}.json"
    observer = profile_hooks.ProfilingObserver(args.warmup, args.record, trace)
    row = stacks.run_one(case, stack, args.warmup + args.record, args.set, args.smoke, observer)
    started = time.perf_counter()
    payload = json.loads(trace.read_text(encoding="utf-8"))
    rank = lora_rank(case, stack, args.set, args.smoke)
    vocab = stacks.model_spec(case["model"]).vocab_size
    row["profile"] = profile_trace.analyse(payload, rank, vocab)
    row["profile"].update(lora_rank=rank, vocab=vocab, analyse_s=time.perf_counter() - started,
                          warmup=args.warmup, record=args.record, step_seconds=observer.step_seconds,
                          recompute_layers_tagged=observer.tagged_layers, loss_tagged=observer.loss_tagged,
                          useful_tokens_per_step=useful_tokens_per_step(case, args.warmup, args.record, vocab,
                                                                        row["batching"]))
    if args.trace:
        with trace.open("rb") as source, gzip.open(f"{trace}.gz", "wb") as target:
            shutil.copyfileobj(source, target)
        row["profile"]["trace"] = f"{trace}.gz"
    trace.unlink()
    if not args.trace:
        shutil.rmtree(folder, ignore_errors=True)
    row.pop("losses", None)
    return row


def run_all(cases: list[dict], stack_names: list[str], args: argparse.Namespace) -> list[dict]:
    """Each (case, stack) in its own child, as memory_speed runs them; the report rewritten after each."""
    command = memory_speed.recorded_command(MODULE)
    common = ["--warmup", str(args.warmup), "--record", str(args.record), "--tag", args.tag]
    common += (["--smoke"] if args.smoke else []) + (["--trace", args.trace] if args.trace else [])
    for item in args.set:
        common += ["--set", item]
    rows: list[dict] = []
    built: set[str] = set()
    for case in cases:
        if case["model"] not in built and not args.smoke:  # --smoke: the child builds the tiny model
            build_args = ["--steps", "1"] + [x for item in args.set for x in ("--set", item)]
            error = memory_speed.ensure_model(case, args, build_args)
            if error:
                rows += [{"stack": s, **case, "error": error} for s in stack_names]
                profile_report.write_results(rows, command, Path(args.out), args.tag)
                continue
            built.add(case["model"])
        for stack in stack_names:  # as memory_speed.measure: --baseline-uncapped lifts the cap for the baseline
            capped = bool(case.get("cap_gb")) and not (stack == "baseline" and args.baseline_uncapped)
            child_case = memory_speed.case_text(case if capped else {**case, "cap_gb": None})
            started = time.perf_counter()
            row, output = memory_speed.run_child(["--cases", child_case, "--one", stack] + common,
                                                 args.smoke, args.stack_timeout or None, module=MODULE,
                                                 stack=stack)
            if row is None:
                row = {"stack": stack, **case, "error": memory_speed.error_of(output)}
                log = memory_speed.save_log(Path(args.out), f"profile-{args.tag}", f"{case['model']}-{stack}", output)
                print(f"  log: {log}", flush=True)
            row.update(cap_gb=case.get("cap_gb"), cap_applied=capped, wall_s=time.perf_counter() - started)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            profile_report.write_results(rows, command, Path(args.out), args.tag)
    if args.drop_models:
        for key in built:
            shutil.rmtree(stacks.model_folder(key), ignore_errors=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated model:method:seq:batch[:capGB][:real] (memory_speed's)")
    parser.add_argument("--stacks", help="comma-separated memory_speed stacks (default: ours:universal,baseline)")
    parser.add_argument("--warmup", type=int, help=f"plain steps before recording (default {DEFAULT_WARMUP})")
    parser.add_argument("--record", type=int, help=f"steps recorded by the profiler (default {DEFAULT_RECORD})")
    parser.add_argument("--trace", help="also keep each stack's chrome trace, gzipped, in this folder (large)")
    memory_speed.add_run_options(parser, tag_help="result files: <out>/profile-<tag>.md and .json")
    parser.add_argument("--smoke", action="store_true",
                        help=f"test the script on the CPU: {SMOKE_CASE}, {SMOKE_STACKS}, "
                             f"{SMOKE_WARMUP} + {SMOKE_RECORD} steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: profile the one case on this stack
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.stacks = args.cases or SMOKE_CASE, args.stacks or SMOKE_STACKS
        args.warmup = SMOKE_WARMUP if args.warmup is None else args.warmup
        args.record = args.record or SMOKE_RECORD
    args.stacks = args.stacks or "ours:universal,baseline"
    args.warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    args.record = args.record or DEFAULT_RECORD
    if not args.cases:
        parser.error("--cases is required (or --smoke)")
    if args.warmup < 0 or args.record < 1:
        parser.error("--warmup must be at least 0 and --record at least 1")
    try:
        cases = [memory_speed.parse_case(c, args.cap_gb) for c in args.cases.split(",") if c.strip()]
        stack_names = memory_speed.parse_stacks(args.stacks)
        for case in cases:  # a bad --set fails here, not in every child
            stacks.ours_recipe(stacks.model_folder(case["model"]), case, "auto", args.set, args.smoke)
    except (memory_speed.CaseError, ValueError) as err:  # RecipeError is a ValueError
        parser.error(str(err))
    if args.one:
        row = profile_one(cases[0], memory_speed.parse_stack(args.one), args)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows = run_all(cases, stack_names, args)
    path = Path(args.out) / f"profile-{args.tag}.md"
    print(path.read_text() if path.exists() else "no results")
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
