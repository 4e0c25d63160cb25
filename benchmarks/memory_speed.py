"""Peak VRAM, tokens/s and the first losses: our engine's paths against the baseline stack and Unsloth.

Each case is ``model:method:seq:batch`` (catalog key, qlora|lora). For each case the model is built
once with random weights from the catalog's real architecture and saved to a scratch folder, then
every stack trains it in its own process (so peaks don't mix), on the same random tokens with the
same seed, optionally capped to a card size with ``torch.cuda.set_per_process_memory_fraction``:

  ours      the engine's loading and LoRA set-up with the recipe's memory techniques and the
            chunked loss (``tui_finetune.engine``), the default recipe unless --set changes it
  baseline  transformers + peft + bitsandbytes: prepare_model_for_kbit_training, non-reentrant
            checkpointing, SDPA, the model's own loss
  unsloth   FastLanguageModel with use_gradient_checkpointing="unsloth", where it is installed

All stacks use LoRA r16 on all linear layers and paged AdamW 8-bit. The planner's prediction for
"ours" is printed next to what was measured. Results go to benchmarks/results/ as JSON and markdown.

  python -m benchmarks.memory_speed --cases phi-2:qlora:2048:1 --stacks ours,baseline --steps 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
SCRATCH = Path(os.environ.get("TUIFT_BENCH_SCRATCH", "/tmp/tuift-bench"))


def parse_case(text: str) -> dict:
    key, method, seq, batch = text.split(":")
    return {"model": key, "method": method, "seq": int(seq), "batch": int(batch)}


def build_random_model(key: str) -> Path:
    """Random weights of the catalog architecture, saved once per model (bf16 safetensors)."""
    import torch
    import transformers

    from tui_finetune.core.catalog import get_model

    folder = SCRATCH / key
    if (folder / "config.json").exists():
        return folder
    spec = get_model(key)
    config = transformers.AutoConfig.for_model(**spec.to_config_dict())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    save_stand_in_tokenizer(folder, spec.vocab_size)
    del model
    torch.cuda.empty_cache()
    return folder


def save_stand_in_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with the model's vocabulary size: the batches are random token ids, but
    Unsloth's loader insists on a tokenizer beside the weights (and can't convert a slow one here)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    tokenizer.save_pretrained(folder)


def random_batches(vocab: int, seq: int, batch: int, steps: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield {"input_ids": ids.cuda(), "labels": ids.cuda()}


def setup_ours(folder: Path, case: dict, overrides: list[str]):
    from tui_finetune.core.recipe import RecipeSpec, apply_override, recipe_from_dict
    from tui_finetune.engine.lean import lean_causal_lm_loss
    from tui_finetune.engine.loading import add_lora, detect_device, load_base_model

    raw = RecipeSpec(model=str(folder), method=case["method"]).to_dict()
    raw["data"]["seq_len"], raw["train"]["micro_batch"] = case["seq"], case["batch"]
    for item in overrides:
        apply_override(raw, item)
    recipe = recipe_from_dict(raw)
    device = detect_device()
    model = add_lora(load_base_model(folder, recipe, device), recipe, device)
    return model, lambda m, b: lean_causal_lm_loss(m, b, recipe.memory), recipe


def setup_baseline(folder: Path, case: dict, overrides: list[str]):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}, "attn_implementation": "sdpa"}
    if case["method"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if case["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, lambda m, b: m(**b).loss, None


def setup_unsloth(folder: Path, case: dict, overrides: list[str]):
    from unsloth import FastLanguageModel  # noqa: I001 - must come before transformers

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=case["seq"],
                                                 load_in_4bit=case["method"] == "qlora", dtype=None)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return model, lambda m, b: m(**b).loss, None


STACKS = {"ours": setup_ours, "baseline": setup_baseline, "unsloth": setup_unsloth}


def run_one(case: dict, stack: str, steps: int, cap_gb: float | None, overrides: list[str]) -> dict:
    """Train one case on one stack in this process and measure it."""
    if stack == "unsloth":
        import unsloth  # noqa: F401 - patches transformers, so it must be imported first
    import torch

    from tui_finetune.core.catalog import get_model

    if cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap_gb * GIB / total, 1.0))
    folder = SCRATCH / case["model"]
    model, loss_fn, recipe = STACKS[stack](folder, case, overrides)
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    vocab = get_model(case["model"]).vocab_size
    for batch in random_batches(vocab, case["seq"], case["batch"], steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    timed = times[3:] or times
    result = {
        "stack": stack, **case, "cap_gb": cap_gb, "steps": steps,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "tokens_per_s": case["seq"] * case["batch"] * len(timed) / sum(timed),
        "losses": losses,
    }
    if recipe is not None:
        from tui_finetune.core.planner import GIB as PGIB, PlanCase, estimate_peak_vram, profile_from_memory

        plan = PlanCase.from_recipe(get_model(case["model"]), recipe)
        estimate = estimate_peak_vram(plan, profile_from_memory(recipe.memory))
        result["planner_torch_gib"] = estimate.torch_peak / PGIB
        result["planner_total_gib"] = estimate.total / PGIB
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_results(rows: list[dict], command: str, out_dir: Path, tag: str) -> Path:
    import torch

    card = torch.cuda.get_device_name(0)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {"date": stamp, "card": card, "versions": versions(), "command": command, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Memory and speed: {tag}", "", f"- date: {stamp}", f"- card: {card}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in payload['versions'].items())}",
             f"- command: `{command}`", "",
             "| case | stack | cap GiB | peak reserved GiB | tokens/s | planner GiB (torch) | loss 1 | loss last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} {r['method']} seq {r['seq']} x{r['batch']} | {r['stack']} | "
                         f"{r.get('cap_gb') or '-'} | {r['error']} | | | | |")
            continue
        plan = f"{r['planner_torch_gib']:.2f}" if "planner_torch_gib" in r else "-"
        lines.append(f"| {r['model']} {r['method']} seq {r['seq']} x{r['batch']} | {r['stack']} | "
                     f"{r.get('cap_gb') or '-'} | {r['peak_reserved_gib']:.2f} | {r['tokens_per_s']:.0f} | {plan} | "
                     f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
    path = out_dir / f"{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, help="comma-separated model:method:seq:batch")
    parser.add_argument("--stacks", default="ours,baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cap-gb", type=float, default=None, help="cap the process to a card of this size")
    parser.add_argument("--set", action="append", default=[], help="recipe override for 'ours' (key=value)")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: 'stack'
    args = parser.parse_args()
    cases = [parse_case(c) for c in args.cases.split(",")]
    if args.one:
        print("RESULT " + json.dumps(run_one(cases[0], args.one, args.steps, args.cap_gb, args.set)), flush=True)
        return 0
    rows = []
    for case in cases:
        build_random_model(case["model"])
        for stack in args.stacks.split(","):
            cmd = [sys.executable, "-m", "benchmarks.memory_speed", "--cases", ":".join(
                str(case[k]) for k in ("model", "method", "seq", "batch")), "--one", stack,
                "--steps", str(args.steps)] + (["--cap-gb", str(args.cap_gb)] if args.cap_gb else [])
            for item in args.set:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                row = json.loads(found[-1][7:])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                row = {"stack": stack, **case, "cap_gb": args.cap_gb,
                       "error": ("OOM" if "OutOfMemory" in proc.stderr else "failed") + ": " + tail[0][:160]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    command = "python -m benchmarks.memory_speed " + " ".join(sys.argv[1:])
    print(write_results(rows, command, Path(args.out), args.tag).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
