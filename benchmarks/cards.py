"""Issue #11: does each preset fit, finish and resume on the card it names, as that card's owner would see it?

A big GPU is made to look like a consumer card to everything: a holder process (card_holder.py) takes
VRAM until NVML and ``torch.cuda.mem_get_info`` report the card's free memory; then the product's own
CLI trains the preset (card_run.py), and the run folder says what happened (card_report.py).

Cells are ``PRESET:STATE:INSTALL[:kill]``:
  PRESET   a shipped GPU preset; its name gives the card (``4gb-gemma-2b-qlora``: a 4 GiB card)
  STATE    headless (the card minus 0.3 GiB free) or desktop (minus 1.0 GiB: a browser and compositor open)
  INSTALL  default or unsloth: what this environment has (checked, never installed: with ``unsloth``
           ``import unsloth`` must work in a child; with ``default`` it must not be importable; a cell
           whose install is not the environment's is skipped with the reason, and no row)
  :kill    train --detach, SIGKILL the worker after its first checkpoint, then ``resume`` to the end
``--cells all-default``: every GPU preset x {headless, desktop}, default install. ``--cells issue11``: that,
plus the 4/8/16 GB Unsloth cells, and ``:kill`` on the desktop cell of the first preset of each card size.

Each cell gets a fresh TUI_FINETUNE_HOME and trains ``--steps`` steps (checkpoint every 2) on random
weights of the preset's architecture (built once per model under $TUIFT_BENCH_SCRATCH) and on chat rows,
most longer than every preset's seq_len (write_chat_data). Results go to ``--out``/cards.json and cards.md
after every cell; a cell already there is skipped (``--redo`` runs it again), so a killed call loses at
most one cell.

  python -m benchmarks.cards --cells issue11 --only 4gb- --out "$OUT" --drop-models
  python -m benchmarks.cards --smoke --out /tmp/cards   # tests the script on the CPU (no holder, no NVML)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import card_report, stacks
from benchmarks.card_holder import GIB, HeldCard, HolderFailed, NvmlCard
from benchmarks.card_run import CellJob, run_cell
from benchmarks.memory_speed import REPO_ROOT, child_env, recorded_command, save_log
from tui_finetune.core.presets import list_presets, preset_card_gb

STATE_MARGINS_GIB = {"headless": 0.3, "desktop": 1.0}
"""What the desktop takes from the card: free = card - margin."""
INSTALLS = ("default", "unsloth")
ISSUE11_UNSLOTH = ("4gb-gemma-2b-qlora:desktop:unsloth", "8gb-llama-3.1-8b-qlora:desktop:unsloth",
                   "16gb-mistral-7b-qlora:desktop:unsloth")
DEFAULT_STEPS = 4
LONG_WORDS = 4400
"""Long rows' shortest answer in words (= tokens): above every preset's seq_len (4096 at most)."""
SMOKE_LONG_WORDS = 160
"""The smoke recipe's seq_len is 64: shorter rows, so the CPU tokenizes them in a moment."""
CHECKPOINT_EVERY = 2
FREE_CHECK_GIB = 0.25
"""The most NVML's free figure may move between the holder's READY and the cell's start (more: another
process is using the GPU, and the cell would not measure the card it names)."""
SMOKE_PRESET = "smoke-llama-lora"
SMOKE_CELLS = f"{SMOKE_PRESET}:cpu:default,{SMOKE_PRESET}:cpu:default:kill"
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton", "liger-kernel", "unsloth",
             "unsloth_zoo")


class CellError(ValueError):
    """A --cells entry that can't be read; the message says what a good one looks like."""


@dataclass(frozen=True)
class CellSpec:
    preset: str
    state: str
    install: str
    kill: bool = False

    @property
    def key(self) -> str:
        return ":".join([self.preset, self.state, self.install] + (["kill"] if self.kill else []))

    @property
    def card_gib(self) -> int | None:
        return preset_card_gb(Path(self.preset))

    @property
    def target_free_bytes(self) -> int:
        return int(((self.card_gib or 0) - STATE_MARGINS_GIB[self.state]) * GIB)


# ---------------------------------------------------------------- cells

def gpu_presets() -> list[str]:
    """Every shipped preset whose name starts with ``<N>gb-``, smallest card first."""
    return [p.stem for p in list_presets() if preset_card_gb(p)]


def parse_cell(text: str) -> CellSpec:
    parts = text.strip().split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "kill"):
        raise CellError(f"cell '{text}': expected PRESET:STATE:INSTALL[:kill], "
                        "e.g. 4gb-gemma-2b-qlora:desktop:default:kill")
    preset, state, install = parts[:3]
    if preset == SMOKE_PRESET and state == "cpu":
        return CellSpec(preset, state, install, len(parts) == 4)
    if preset not in gpu_presets():
        raise CellError(f"cell '{text}': '{preset}' is not a GPU preset ({', '.join(gpu_presets())})")
    if state not in STATE_MARGINS_GIB:
        raise CellError(f"cell '{text}': state '{state}' is not one of {', '.join(STATE_MARGINS_GIB)}")
    if install not in INSTALLS:
        raise CellError(f"cell '{text}': install '{install}' is not one of {', '.join(INSTALLS)}")
    return CellSpec(preset, state, install, len(parts) == 4)


def expand_cells(text: str) -> list[CellSpec]:
    """``all-default``, ``issue11`` or comma-separated cells; each cell once, in order."""
    out: list[CellSpec] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item in ("all-default", "issue11"):
            out += grid(item == "issue11")
        else:
            out.append(parse_cell(item))
    return list(dict.fromkeys(out))


def grid(issue11: bool) -> list[CellSpec]:
    cells, kill_cards = [], set()
    for preset in gpu_presets():
        card = preset_card_gb(Path(preset))
        kill = issue11 and card not in kill_cards
        kill_cards.add(card)
        cells += [CellSpec(preset, "headless", "default"), CellSpec(preset, "desktop", "default", kill)]
    return cells + ([parse_cell(c) for c in ISSUE11_UNSLOTH] if issue11 else [])


def model_key(cell: CellSpec) -> str:
    """The catalog key of the preset's ``model``: the random model the cell trains."""
    if cell.preset == SMOKE_PRESET:
        return stacks.SMOKE_MODEL
    from tui_finetune.core.presets import find_recipe
    from tui_finetune.core.recipe_io import load_recipe

    return load_recipe(find_recipe(cell.preset)).model


# ---------------------------------------------------------------- inputs: data, smoke recipe, install, models

def write_chat_data(path: Path, long_words: int = 4400) -> Path:
    """60 chat rows: 42 with answers of ``long_words`` to 18% more words (each word one token of the
    stand-in tokenizer; the default is longer than every preset's seq_len, so the longest batch is a full
    one), 12 of middling length (``long_words`` / 16 to 0.9 x ``long_words``, spread evenly on a log scale,
    so length groups of several padded rows near the group budget occur at every preset's seq_len) and 6
    short ones of 8-40 words. The same rows every time."""
    rng = random.Random(0)
    words = lambda n: " ".join(f"t{rng.randrange(3, 500)}" for _ in range(n))  # noqa: E731 - ids 0-2 are special
    middling = [round(long_words / 16 * (0.9 * 16) ** (i / 11)) for i in range(12)]
    answers = ([rng.randrange(long_words, int(long_words * 1.18)) for _ in range(42)] + middling
               + [rng.randrange(8, 40) for _ in range(6)])
    rows = [{"messages": [{"role": "user", "content": words(rng.randrange(6, 13))},
                          {"role": "assistant", "content": words(n)}]} for n in answers]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_smoke_recipe(path: Path) -> Path:
    """LoRA on the tiny Llama at seq 64, fp32 and torch AdamW: what the CPU can train in seconds."""
    path.write_text(f'model = "{stacks.SMOKE_MODEL}"\nmethod = "lora"\n\n[data]\nseq_len = 64\n\n'
                    '[train]\nmicro_batch = 2\ngrad_accum = 2\nmax_steps = 4\noptimizer = "adamw_torch"\n'
                    'precision = "fp32"\n\n[checkpoint]\nevery_steps = 2\n', encoding="utf-8")
    return path


def check_install(install: str, env: dict[str, str]) -> str | None:
    """None when the environment matches the label; else why not, with the fix."""
    code = ("import unsloth" if install == "unsloth" else
            "import importlib.util, sys; sys.exit(3 if importlib.util.find_spec('unsloth') else 0)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 0:
        return None
    if install == "unsloth":
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"install 'unsloth': 'import unsloth' fails here ({last[:200]}): put Unsloth's wheels on PYTHONPATH"
    return "install 'default': unsloth is importable here, so the worker could pick it: run without it on PYTHONPATH"


BUILD_ERRORS: dict[str, str] = {}
"""Models whose build failed in this call: their other cells fail at once instead of building again."""


def ensure_model(key: str, env: dict[str, str]) -> str | None:
    """Build the random model in a child (the parent never imports torch); the error or None."""
    if (stacks.model_folder(key) / "config.json").exists():
        return None
    if key in BUILD_ERRORS:
        return BUILD_ERRORS[key]
    print(f"building random {key} in {stacks.model_folder(key)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cards", "--build", key], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    BUILD_ERRORS[key] = "model build failed: " + ((proc.stdout + proc.stderr).strip().splitlines()
                                                  or ["no output"])[-1][:300]
    return BUILD_ERRORS[key]


# ---------------------------------------------------------------- running the grid

def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def error_row(message: str) -> dict[str, Any]:
    print(f"  simulator error: {message}", flush=True)
    return {"outcome": card_report.SIMULATOR_ERROR, "simulator_error": message}


def measure(cell: CellSpec, args: argparse.Namespace, env: dict[str, str], nvml: NvmlCard | None,
            recipe: str) -> dict[str, Any]:
    """One cell: hold the card, check its free memory, run it through the CLI, always release the card."""
    home = Path(args.scratch) / "homes" / f"{cell.key.replace(':', '-')}-{time.strftime('%H%M%S')}"
    overrides = [f"model={stacks.model_folder(model_key(cell))}", f"train.max_steps={args.steps}",
                 f"checkpoint.every_steps={CHECKPOINT_EVERY}", *args.set]
    job = CellJob(cell.key, recipe, Path(args.data), overrides, cell.kill, env, home, args.timeout, nvml)
    held, start = None, {}
    try:
        if nvml is not None:
            held = HeldCard.start(cell.target_free_bytes, env, REPO_ROOT)
            free = nvml.free_bytes()
            start = {"target_free_gib": cell.target_free_bytes / GIB, "free_gib_at_start": free / GIB,
                     "cuda_free_gib_at_ready": held.cuda_free_at_ready / GIB,
                     "used_gib_at_start": nvml.used_bytes() / GIB, "holder_gib": held.held_bytes / GIB}
            if abs(free - held.nvml_free_at_ready) > FREE_CHECK_GIB * GIB:
                return {**error_row(f"NVML reports {free / GIB:.2f} GiB free, {held.nvml_free_at_ready / GIB:.2f} "
                                    "when the holder got ready: is another process using the GPU?"), **start}
        row = {**start, **run_cell(job)}
        if row.get("nvml_worker_peak_gib") is None and row.get("nvml_device_peak_gib") is not None:
            # NVML lists pids of another namespace (containers): the card's use above the start is the worker's
            row.update(nvml_worker_peak_gib=row["nvml_device_peak_gib"] - start["used_gib_at_start"],
                       nvml_worker_peak_source="card")
    except HolderFailed as err:
        return error_row(str(err))
    except Exception as err:  # noqa: BLE001 - one broken cell must not cost the rest of the grid
        traceback.print_exc()
        return {**error_row(f"the simulator failed: {type(err).__name__}: {err}"), **start}
    finally:
        if held is not None:
            held.release()
    if row["outcome"] != "completed":
        save_log(Path(args.out), "cards", cell.key, "\n".join(run_logs(home)))
    if not args.keep_runs:
        shutil.rmtree(home, ignore_errors=True)
    return row


def progress_line(row: dict[str, Any]) -> str:
    """One line per cell on the console: what the device's output tail shows."""
    gib = lambda key: "-" if row.get(key) is None else f"{row[key]:.2f}"  # noqa: E731
    error = (row.get("error") or {}).get("message") or row.get("simulator_error") or row.get("cli_error") or ""
    return (f"{row['outcome']} in {row.get('wall_s', 0):.0f} s; free {gib('free_gib_at_start')} GiB, fit-check peak "
            f"{gib('fit_peak_gib')}, NVML worker peak {gib('nvml_worker_peak_gib')}"
            + (f"; {error[:200]}" if error else ""))


def run_logs(home: Path) -> list[str]:
    """The CLI's and the worker's output of a cell that didn't complete, for ``cards.log``."""
    paths = sorted(home.glob("*.log")) + sorted(home.glob("runs/*/worker.log"))
    return [f"--- {p.name}\n" + p.read_text(encoding="utf-8", errors="replace")[-20000:] for p in paths]


def run_grid(cells: list[CellSpec], args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """Run the cells not yet in ``--out``, model by model; (the results, the keys skipped for their install)."""
    out_dir, started = Path(args.out), time.monotonic()
    results = card_report.load_results(out_dir)
    todo = [c for c in cells if args.redo or not card_report.is_done(results, c.key)]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {out_dir / card_report.RESULTS_JSON}", flush=True)
    env = child_env(args.smoke)
    nvml = None if args.smoke else NvmlCard()
    if nvml is not None:
        nvml.check_shareable()
    invocation = {"date": datetime.now().isoformat(timespec="seconds"), "card": nvml.describe() if nvml else {},
                  "versions": versions(), "command": recorded_command("benchmarks.cards"), "cells": []}
    write_chat_data(Path(args.data), SMOKE_LONG_WORDS if args.smoke else LONG_WORDS)
    recipe_of = {SMOKE_PRESET: str(write_smoke_recipe(Path(args.scratch) / f"{SMOKE_PRESET}.toml"))}
    installs = {i: check_install(i, env) for i in sorted({c.install for c in todo})}
    skipped: set[str] = set()
    by_model: dict[str, list[CellSpec]] = {}
    for cell in todo:
        by_model.setdefault(model_key(cell), []).append(cell)
    for key, group in by_model.items():
        for cell in group:
            if args.budget and time.monotonic() - started > args.budget:
                print(f"--budget {args.budget:g} s spent: run the same command again to continue", flush=True)
                return results, skipped
            if installs[cell.install]:  # the wrong environment for this cell: no row, a later call runs it
                print(f"== {cell.key}: skipped: {installs[cell.install]}", flush=True)
                skipped.add(cell.key)
                continue
            print(f"== {cell.key}", flush=True)
            error = ensure_model(key, env)
            row = error_row(error) if error else measure(cell, args, env, nvml, recipe_of.get(cell.preset, cell.preset))
            row.update(cell=cell.key, date=invocation["date"], install=cell.install)
            results["cells"][cell.key] = row
            if not invocation["cells"]:  # a call that ran nothing adds no header
                results["invocations"].append(invocation)
            invocation["cells"].append(cell.key)
            card_report.write_results(results, out_dir)
            print("  " + progress_line(row), flush=True)
        if args.drop_models and key != stacks.SMOKE_MODEL:
            shutil.rmtree(stacks.model_folder(key), ignore_errors=True)
    return results, skipped


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", help="comma-separated PRESET:STATE:INSTALL[:kill], all-default or issue11")
    parser.add_argument("--only", default="", help="comma-separated parts of cell keys: run only the cells that "
                                                   "contain one (e.g. --only 4gb-,6gb- or --only mistral)")
    parser.add_argument("--steps", type=int, default=0, help=f"optimizer steps per cell (default {DEFAULT_STEPS})")
    parser.add_argument("--set", action="append", default=[], help="one more recipe override for every cell")
    parser.add_argument("--out", default="benchmarks/results", help="folder of cards.json / cards.md / cards.log")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell before it is killed")
    parser.add_argument("--budget", type=float, default=0, help="start no cell after this many seconds (0: none)")
    parser.add_argument("--redo", action="store_true", help="run cells again that cards.json already has")
    parser.add_argument("--drop-models", action="store_true", help="delete each random model after its cells")
    parser.add_argument("--keep-runs", action="store_true", help="keep each cell's TUI_FINETUNE_HOME in the scratch")
    parser.add_argument("--smoke", action="store_true", help=f"test the script on the CPU: {SMOKE_CELLS}, "
                                                            "no holder, no NVML")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # child: build this random model
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.build:
        print(stacks.build_model(args.build), flush=True)
        return 0
    if args.smoke:
        args.cells = args.cells or SMOKE_CELLS
    args.steps = args.steps or DEFAULT_STEPS
    args.scratch = str(stacks.scratch_dir())
    args.data = str(Path(args.scratch) / ("cards-chat-smoke.jsonl" if args.smoke else "cards-chat.jsonl"))
    if not args.cells:
        build_parser().error("--cells is required (or --smoke)")
    try:
        cells = expand_cells(args.cells)
    except CellError as err:
        build_parser().error(str(err))
    wanted = [part for part in args.only.split(",") if part]
    cells = [c for c in cells if not wanted or any(part in c.key for part in wanted)]
    previous = signal.signal(signal.SIGTERM, raise_interrupt)  # a killed call still releases the card (try/finally)
    try:
        results, skipped = run_grid(cells, args)
    except KeyboardInterrupt:
        print("interrupted: the cells written so far are kept; run the same command again to continue")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = Path(args.out) / card_report.RESULTS_MD
    print(report.read_text(encoding="utf-8") if report.exists() else f"no results in {args.out}")
    runnable = [c for c in cells if c.key not in skipped]  # a cell for the other install is a later call's
    done = [results["cells"].get(c.key, {}).get("outcome") for c in runnable]
    return 0 if runnable and all(o and o != card_report.SIMULATOR_ERROR for o in done) else 1


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt()


if __name__ == "__main__":
    sys.exit(main())
