"""A/B: our Unsloth backend with and without its 16-token probe step, against Unsloth called directly.

One case (Gemma-2B QLoRA seq 1024 under a 3.55 GiB cap, 30 steps), one process per run:
  python -m benchmarks.unsloth_probe_ab probe|noprobe|direct
The model must exist in TUIFT_BENCH_SCRATCH (any memory_speed run of the case builds it).
"""
import sys

from benchmarks import stacks
from benchmarks.memory_speed import parse_case

mode = sys.argv[1]
case = parse_case("gemma-2b:qlora:1024:1:3.55")
if mode == "noprobe":
    from tui_finetune.engine import backends

    backends.probe_step = lambda *a, **k: None
row = stacks.run_one(case, "unsloth" if mode == "direct" else "ours:unsloth", 30, [], False)
print("AB", mode, round(row["peak_reserved_gib"], 2), round(row["tokens_per_s"]), flush=True)
