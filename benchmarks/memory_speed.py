"""Issues #7 and #14: peak VRAM, tokens/s (all and useful) and the first 50 losses of our engine's
backends against the baseline stack and Unsloth, in the same run on the same card, with the
planner's prediction checked.

Each case is ``model:method:seq:batch[xaccum][:capGB][:real]``: a catalog key, qlora|lora, sequence length,
micro-batch (``4x4``: micro-batch 4 x gradient accumulation 4, 16 rows a step, a hobbyist recipe's
shape; ``4`` is accumulation 1, as before), optionally the cap in GiB that torch may reserve (``torch.cuda.set_per_process_memory_fraction``;
for an N GB card, N - 0.45 leaves the CUDA context its room), and optionally ``real``: rows of
chat-like lengths instead of ``seq`` tokens each (benchmarks/batches.py says which lengths and how
each stack batches them). ``--cap-gb`` is the default cap. Random weights of the real architecture
are built once per model; then every stack trains the case in its own process (so peaks don't mix)
on the same random token rows with the same seed:

  ours[:backend][:variant]  our engine through engine/backends.py; backend auto (the default), universal,
                  compiled, liger or unsloth; on real lengths it trains the engine's length groups (the recipe's
                  default data.group_by_length = true; ``:grouped`` says so), ``:rows`` sets it false
                  (``batch`` padded rows a pass, the baseline's batches), ``:packed`` sets data.packing =
                  true (the engine's bins); batches.py says how each batches; ``:fitted`` auto-fits the
                  recipe to the case's cap as the worker does to a card (with room, layers keep their
                  activations); ``ours:compiled:dynamic`` compiles the layers with dynamic=True; --set
                  changes its recipe (e.g. --set memory.offload_activations=true)
  baseline        transformers + peft + bitsandbytes (prepare_model_for_kbit_training); on real
                  lengths each batch padded to its longest row, as HF Trainer's defaults do
  unsloth         Unsloth's own FastLanguageModel (batched like the baseline)

Each row records peak max_memory_reserved, tokens/s and useful (non-pad) tokens/s (without the first
3 steps), every loss, and for ours the backend chosen and why, and the planner's torch peak against
the measured one (goal: within 10%). Parity is the worst relative difference of the first 50 losses
from the baseline's (goal: 1%). ``--repeat N`` runs the stacks N times in turn (A, B, A, B, ...) and
reports each stack's mean and spread; ``--append`` adds the rounds to those already in the tag's
results, so rounds can be spread over several calls. Results go to ``--out`` as ``<tag>.json`` and ``<tag>.md``,
rewritten after every row, with the card, the date, the package versions and the exact command. See
benchmarks/README.md for a GPU machine.

  python -m benchmarks.memory_speed --cases phi-2:qlora:2048:1:3.55 --stacks ours,baseline,unsloth
  python -m benchmarks.memory_speed --cases gemma-2b:qlora:1024:1x16:real \
      --stacks ours:universal,ours:universal:rows,baseline --repeat 3
  python -m benchmarks.memory_speed --smoke --out /tmp/bench   # tests the script on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import batches, report, stacks
from tui_finetune.core.gpu_allocator import ALLOCATOR_VARIABLES, allocator_env
from tui_finetune.core.recipe import BACKENDS as OURS_BACKENDS

METHODS = ("qlora", "lora")
OTHER_STACKS = ("baseline", "unsloth")
SMOKE_CASE = f"{stacks.SMOKE_MODEL}:lora:512:2x2:real"
SMOKE_STACKS = f"ours:universal,ours:universal:{stacks.ROWS},ours:universal:{stacks.PACKED},baseline"
SMOKE_STEPS = 6
REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDED_ENV = ("UNSLOTH_COMPILE_DISABLE", *ALLOCATOR_VARIABLES, "TUIFT_BENCH_SCRATCH", "CUDA_VISIBLE_DEVICES")
"""Environment variables that change what is measured: the recorded command starts with them."""


class CaseError(ValueError):
    """A --cases or --stacks entry that can't be read; the message says what a good one looks like."""


def parse_case(text: str, default_cap: float | None = None) -> dict:
    """``model:method:seq:batch[xaccum][:capGB][:real]`` -> {model, method, seq, batch, accum, cap_gb, lengths}."""
    parts = text.strip().split(":")
    lengths = parts.pop() if len(parts) > 4 and parts[-1] in batches.LENGTH_MODES else "fixed"
    if len(parts) not in (4, 5):
        raise CaseError(f"case '{text}': expected model:method:seq:batch[xaccum][:capGB][:real], "
                        "e.g. gemma-2b:qlora:1024:1:3.55 or gemma-2b:qlora:1024:1x16:real")
    model, method, seq, batch = parts[:4]
    if method not in METHODS:
        raise CaseError(f"case '{text}': method '{method}' is not one of {', '.join(METHODS)}")
    micro, times, accum = batch.partition("x")
    try:
        seq_n, batch_n, accum_n = int(seq), int(micro), int(accum) if times else 1
        cap = float(parts[4]) if len(parts) == 5 and parts[4] else default_cap
    except ValueError:
        raise CaseError(f"case '{text}': seq, batch and accum must be whole numbers (batch 4 or 4x4: micro-batch 4 "
                        "x accumulation 4), capGB a number and the last field a number or one of "
                        f"{', '.join(batches.LENGTH_MODES)}, e.g. mistral-7b:qlora:2048:1:15.55") from None
    if seq_n < 2 or batch_n < 1 or accum_n < 1 or (cap is not None and cap <= 0):
        raise CaseError(f"case '{text}': seq must be at least 2, batch at least 1, accum at least 1 and capGB above 0")
    return {"model": model, "method": method, "seq": seq_n, "batch": batch_n, "accum": accum_n, "cap_gb": cap,
            "lengths": lengths}


def case_text(case: dict) -> str:
    accum = batches.accumulation(case)
    parts = [case["model"], case["method"], str(case["seq"]), f"{case['batch']}" + (f"x{accum}" if accum > 1 else "")]
    parts += [f"{case['cap_gb']:g}"] if case.get("cap_gb") else []
    return ":".join(parts + ([case["lengths"]] if case.get("lengths", "fixed") != "fixed" else []))


def parse_stack(text: str) -> str:
    """``ours`` -> ``ours:auto``, ``ours:packed`` -> ``ours:auto:packed``; ``ours:<backend>[:variant]``
    (variant packed, grouped, rows, fitted or dynamic), ``baseline`` and ``unsloth`` as they are."""
    name = text.strip()
    if name in OTHER_STACKS:
        return name
    kind, *rest = name.split(":")
    variant = rest[-1] if rest and rest[-1] in stacks.VARIANTS else ""
    rest = rest[:-1] if variant else rest
    if variant == stacks.DYNAMIC and rest != ["compiled"]:
        raise CaseError(f"stack '{text}': the {stacks.DYNAMIC} variant is the compiled backend's "
                        f"(ours:compiled:{stacks.DYNAMIC})")
    if kind == "ours" and len(rest) <= 1 and (rest or ["auto"])[0] in OURS_BACKENDS:
        return ":".join(["ours", (rest or ["auto"])[0]] + ([variant] if variant else []))
    choices = ", ".join([f"ours:{b}" for b in OURS_BACKENDS] + list(OTHER_STACKS))
    general = [v for v in stacks.VARIANTS if v != stacks.DYNAMIC]
    raise CaseError(f"stack '{text}': expected ours (= ours:auto), {choices}, or ours[:backend]:VARIANT with "
                    f"one VARIANT of {', '.join(general)}, or ours:compiled:{stacks.DYNAMIC}")


def parse_stacks(text: str) -> list[str]:
    names = [parse_stack(item) for item in text.split(",") if item.strip()]
    return list(dict.fromkeys(names))  # each stack once, in the order given


# ---------------------------------------------------------------- child processes

def child_env(smoke: bool, stack: str = "") -> dict[str, str]:
    """The environment of a child; an ``ours`` stack's gets the allocator setting the product's launcher gives
    its workers (core/gpu_allocator.py), the other stacks keep PyTorch's default, as a notebook runs."""
    env = allocator_env(os.environ) if stack.startswith("ours") else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p)
    if smoke:  # the CPU, and no network
        env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_child(args: list[str], smoke: bool, timeout: float | None,
              module: str = "benchmarks.memory_speed", stack: str = "") -> tuple[dict | None, str]:
    """Run ``python -m <module> <args>`` (this script, or profile_step.py's child); (the RESULT row or None,
    the output for logs)."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(smoke, stack),
                            cwd=REPO_ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        return None, f"TIMEOUT after {timeout:g} s\n{stdout}\n{stderr}"
    found = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(found[-1][7:]) if found else None), stdout + "\n" + stderr


def kill_tree(pid: int) -> None:
    """The timed-out child and what it started (torch.compile workers), so none keeps GPU memory."""
    try:
        import psutil

        for child in psutil.Process(pid).children(recursive=True):
            child.kill()
    except Exception:  # noqa: BLE001 - no psutil, or they are gone already
        pass
    os.kill(pid, signal.SIGKILL)


def error_of(output: str) -> str:
    """A one-line cause for the table: OOM, timeout, or the last error line of the traceback."""
    if output.startswith("TIMEOUT"):
        return output.splitlines()[0].lower()
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line or line.startswith("no CUDA")]
    last = (errors or lines or ["no output"])[-1]
    kind = "OOM" if "OutOfMemory" in output or "out of memory" in output.lower() else "failed"
    return f"{kind}: {last[:200]}".replace("|", "/")


def save_log(out_dir: Path, tag: str, name: str, output: str) -> Path:
    """Append a failed child's output to ``<out>/<tag>.log`` (one file, so a device's $OUT stays small) and
    echo its last lines, so they show in the command's own output too."""
    lines = output.splitlines()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tag}.log"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"===== {name}\n" + "\n".join(lines[-400:]) + "\n")
    print("\n".join(f"  | {line}" for line in lines[-15:]), flush=True)
    return path


def recorded_command(module: str = "benchmarks.memory_speed") -> str:
    """The command line as run, with the environment variables that change what it measures."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in RECORDED_ENV if k in os.environ]
    return " ".join([*env, f"python -m {module}", *map(shlex.quote, sys.argv[1:])])


def ensure_model(case: dict, args: argparse.Namespace, common: list[str]) -> str | None:
    """Build the case's random model in a child of its own (so no stack sees its memory); the error or None."""
    print(f"building random {case['model']} in {stacks.model_folder(case['model'])}", flush=True)
    row, output = run_child(["--cases", case_text(case), "--build"] + common, args.smoke, None)
    if row is not None:
        return None
    print(f"  log: {save_log(Path(args.out), args.tag, 'build-' + case['model'], output)}", flush=True)
    return "build " + error_of(output)


def measure(case: dict, stack: str, args: argparse.Namespace, common: list[str]) -> dict:
    """One (case, stack) in its own process. With --baseline-uncapped the baseline ignores the cap, so its
    losses and speed are there to compare even where it can't fit the card."""
    capped = bool(case.get("cap_gb")) and not (stack == "baseline" and args.baseline_uncapped)
    child_case = case_text(case if capped else {**case, "cap_gb": None})
    started = time.perf_counter()
    row, output = run_child(["--cases", child_case, "--one", stack] + common, args.smoke, args.stack_timeout or None,
                            stack=stack)
    if row is None:
        row = {"stack": stack, **case, "error": error_of(output)}
        print(f"  log: {save_log(Path(args.out), args.tag, f'{case_text(case)}-{stack}', output)}", flush=True)
    row.update(cap_gb=case.get("cap_gb"), cap_applied=capped, wall_s=time.perf_counter() - started)
    return row


def previous_results(out_dir: Path, tag: str) -> tuple[list[dict], str]:
    """--append: the rows and command(s) of ``<out>/<tag>.json``, each row in a round (``rep``; 1 if it had none)."""
    path = out_dir / f"{tag}.json"
    if not path.exists():
        return [], ""
    payload = json.loads(path.read_text(encoding="utf-8"))
    rows = [{"rep": 1, **row} for row in payload["rows"]]
    return rows, payload["command"]


def next_round(rows: list[dict], case: dict) -> int:
    """The first round number after the case's rounds so far (1 for a case with none)."""
    return 1 + max((r.get("rep", 1) for r in rows if report.case_key(r) == report.case_key(case)), default=0)


def run_all(cases: list[dict], stack_names: list[str], args: argparse.Namespace) -> list[dict]:
    rows, before = previous_results(Path(args.out), args.tag) if args.append else ([], "")
    command = "; ".join(c for c in (before, recorded_command()) if c)
    rounds = args.repeat > 1 or args.append  # a single run's rows carry no round
    common = ["--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
    for item in args.set:
        common += ["--set", item]
    built: set[str] = set()
    for case in cases:
        if case["model"] not in built and not args.smoke:  # --smoke: the first child builds the tiny model
            error = ensure_model(case, args, common)
            if error:
                rows += [{"stack": s, **case, "error": error} for s in stack_names]
                report.write_results(rows, command, args.steps, Path(args.out), args.tag)
                continue
            built.add(case["model"])
        first = next_round(rows, case)
        for rep in range(first, first + args.repeat):  # A, B, A, B, ...: drift on the machine hits every stack alike
            for stack in stack_names:
                rows.append(measure(case, stack, args, common) | ({"rep": rep} if rounds else {}))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
                report.write_results(rows, command, args.steps, Path(args.out), args.tag)  # a killed run keeps its rows
    if args.drop_models:
        for key in built:
            shutil.rmtree(stacks.model_folder(key), ignore_errors=True)
    return rows


# ---------------------------------------------------------------- command line

def add_run_options(parser: argparse.ArgumentParser, tag_help: str) -> None:
    """The options memory_speed and profile_step share: the cap, recipe overrides, where results go, the
    per-stack timeout, the uncapped baseline and dropping the random models."""
    parser.add_argument("--cap-gb", type=float, default=None, help="default cap in GiB for cases without one")
    parser.add_argument("--set", action="append", default=[], help="recipe override for ours (key=value)")
    parser.add_argument("--tag", default="latest", help=tag_help)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stack-timeout", type=float, default=0, help="seconds per (case, stack); 0: none")
    parser.add_argument("--baseline-uncapped", action="store_true",
                        help="run the baseline without the card cap, so parity and speed have a reference")
    parser.add_argument("--drop-models", action="store_true", help="delete the random models built by this run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated model:method:seq:batch[xaccum][:capGB][:real]")
    parser.add_argument("--stacks", help="comma-separated: ours (= ours:auto), ours:universal, ours:compiled, "
                                         "ours:liger, ours:unsloth, each optionally :packed, :grouped, :rows or "
                                         ":fitted (ours:packed = ours:auto:packed), ours:compiled:dynamic, baseline, "
                                         "unsloth (default: ours,baseline)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the stacks N times in turn (A, B, A, B, ...); the report gives each stack's "
                             "mean and spread, and ratios as the mean over the runs of the same round")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of <out>/<tag>.json and add this call's as further rounds, so rounds "
                             "spread over several calls (each under a time limit) report together")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per stack (default {report.PARITY_STEPS})")
    add_run_options(parser, tag_help="result file name: <out>/<tag>.json and .md")
    parser.add_argument("--smoke", action="store_true",
                        help=f"test the script on the CPU: {SMOKE_CASE}, {SMOKE_STACKS}, {SMOKE_STEPS} steps, "
                             "torch AdamW, no cap")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: train the one case on this stack
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # child: build the model
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.stacks = args.cases or SMOKE_CASE, args.stacks or SMOKE_STACKS
        args.steps = args.steps or SMOKE_STEPS
    args.stacks, args.steps = args.stacks or "ours,baseline", args.steps or report.PARITY_STEPS
    if not args.cases:
        parser.error("--cases is required (or --smoke)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        cases = [parse_case(c, args.cap_gb) for c in args.cases.split(",") if c.strip()]
        stack_names = parse_stacks(args.stacks)
        for case in cases:  # a bad --set fails here, not in every child
            stacks.ours_recipe(stacks.model_folder(case["model"]), case, "auto", args.set, args.smoke)
    except (CaseError, ValueError) as err:  # RecipeError is a ValueError
        parser.error(str(err))
    if args.build:
        print(f"RESULT {json.dumps({'folder': str(stacks.build_model(cases[0]['model']))})}", flush=True)
        return 0
    if args.one:
        row = stacks.run_one(cases[0], parse_stack(args.one), args.steps, args.set, args.smoke)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows = run_all(cases, stack_names, args)
    path = Path(args.out) / f"{args.tag}.md"
    print(path.read_text() if path.exists() else "no results")
    return 0 if any("error" not in r for r in rows) else 1  # an OOM row is a result, not a failure


if __name__ == "__main__":
    sys.exit(main())
