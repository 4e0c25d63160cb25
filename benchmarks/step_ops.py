"""Issue #14: how many aten ops one optimizer step dispatches, ours against the baseline, by phase and source.

On the H200 our universal path is launch-bound (the GPU idled 84% of a Gemma-2B step between kernels,
benchmarks/results/profile-gemma-2b-1024-real.md): a step costs about its number of ops times the host's
overhead per op. That number doesn't depend on the card or the width, so it is counted here on the CPU,
deterministically, on a model of the catalog's architecture with its real layers and vocabulary but a tiny
width (hidden 64), built with the GPU's dtypes: bf16 base weights (QLoRA: bitsandbytes NF4 with bf16
compute, which runs on the CPU too) and each stack's adapter dtype. The stacks are memory_speed's
(benchmarks/stacks.py): ours set up as the engine sets it up (``add_seeded_lora``, the backend's loss),
the baseline as plain transformers + peft (+ ``prepare_model_for_kbit_training`` for QLoRA). One step is
memory_speed's: forward and backward of each micro-batch (with the recompute of the checkpointed layers),
then ``optimizer.step()`` and ``zero_grad(set_to_none=True)``; the second step is counted (the first
creates the optimizer's state).

A ``TorchDispatchMode`` counts every op that reaches the kernels (below autograd and the composite
decompositions): on a GPU each is about one launch, except the views (``view``, ``t``, ``expand``, ...),
which cost host time but no kernel; they are counted apart. Each op's phase is forward, recompute (a
checkpointed layer run again in backward), backward or optimizer; its source is the innermost frame of
known code (peft's LoRA layers, bitsandbytes, the model's norm / attention / MLP / rotary classes, our
chunked loss, ...), and in backward the source of the forward op whose autograd node runs it. The
optimizer here is torch's AdamW (the CPU's; on a GPU memory_speed uses bitsandbytes' paged AdamW 8-bit),
the same for both stacks. bitsandbytes' CPU dequantize is counted, but it is other ops than its one
CUDA kernel: read its row as the same for both stacks, not as the GPU's figure.

What a count can't show: a host sync inside a kernel (a boolean-mask index runs a nonzero and waits for
it on a GPU) is one op here; only explicit reads (``item``, ``_local_scalar_dense``) are visible as
syncs. And the step is memory_speed's, without autocast: the product's Trainer runs under bf16 autocast,
which adds casts of its own to both stacks' matmuls.

  python -m benchmarks.step_ops --model gemma-2b --method qlora --seq 1024 --stacks ours:universal,baseline
  python -m benchmarks.step_ops --smoke          # a quick check of the script (tests/test_benchmarks_step_ops.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import stacks

PHASES = ("forward", "recompute", "backward", "optimizer")
WIDTH = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 32}
VIEW_OPS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
                      "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "reshape",
                      "_reshape_alias", "view_as_real", "view_as_complex", "unfold", "diagonal", "narrow"})
"""Ops whose result is a view: host overhead, no kernel on a GPU."""
SMOKE = {"model": "gemma-2b", "method": "lora", "seq": 64, "layers": 2, "vocab": 1024, "stacks": "ours:universal,baseline"}


def tiny_config(key: str, layers: int = 0, vocab: int = 0) -> dict:
    """The catalog model's config with a tiny width; its layers and vocabulary unless given."""
    from tui_finetune.core.catalog import get_model

    config = get_model(key).to_config_dict()
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    config.update(WIDTH, num_attention_heads=2, num_key_value_heads=1 if kv_heads < heads else 2)
    if layers:
        config["num_hidden_layers"] = layers
    if vocab:
        config["vocab_size"] = vocab
    return config


def build_tiny(key: str, layers: int, vocab: int) -> Path:
    """Random weights (seed 0) saved once under the benchmarks' scratch folder."""
    import torch
    import transformers

    config = tiny_config(key, layers, vocab)
    folder = stacks.scratch_dir() / f"step-ops-{key}-{config['num_hidden_layers']}l-{config['vocab_size']}v"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(folder)
    return folder


def setup(stack: str, folder: Path, case: dict, overrides: list[str]) -> tuple[Any, stacks.LossFn]:
    """The stack as memory_speed sets it up, with a bf16 GPU's dtypes on the CPU."""
    import torch

    kind, backend, variant = stacks.split_stack(stack)
    if kind == "baseline":
        model, loss, _ = stacks.setup_baseline(folder, case, gpu=False, dtype=torch.bfloat16)
        return model, loss
    if kind != "ours" or backend != "universal":  # it builds the universal path: another name would mislabel it
        raise SystemExit(f"step_ops counts ours:universal and baseline, not {stack}")
    from transformers import AutoModelForCausalLM

    from tui_finetune.engine import backends
    from tui_finetune.engine.loading import DeviceFacts, base_model_kwargs

    recipe = stacks.ours_recipe(folder, case, "universal", overrides, smoke=True, variant=variant)
    gpu = DeviceFacts(has_cuda=True, supports_bf16=True, name="CPU with a bf16 GPU's dtypes")
    model = AutoModelForCausalLM.from_pretrained(str(folder), **base_model_kwargs(recipe, gpu))
    model.config.use_cache = False
    model = backends.add_seeded_lora(model, recipe, gpu)
    return model, stacks.ours_loss(backends.BACKENDS["universal"], recipe.memory)


# ---------------------------------------------------------------- attributing an op to its source

def frame_source(frame: Any) -> str | None:
    """The source a frame stands for, or None to look further out (torch's own code, unknown code)."""
    path, name = frame.f_code.co_filename.replace("\\", "/"), frame.f_code.co_name
    owner = type(frame.f_locals.get("self", None)).__name__ if "self" in frame.f_code.co_varnames else ""
    if name in ("__torch_function__", "__torch_dispatch__", "stack_source"):  # this module's counting modes
        return None
    if "/torch/optim/" in path:
        return "optimizer"
    if "/torch/" in path and "site-packages/torch" in path or path.startswith("<"):
        return None
    for marker, source in (("/peft/tuners/lora/", "LoRA adapters (peft)"), ("/bitsandbytes/", "4-bit base matmul (bnb)"),
                           ("embedding_offload.py", "embedding offload"), ("/transformers/loss/", "loss (transformers)"),
                           ("sdpa_attention.py", "attention (sdpa)"), ("masking_utils.py", "attention mask"),
                           ("/accelerate/", "accelerate hooks"), ("/peft/", "peft other")):
        if marker in path:
            return source
    if path.endswith("memory_techniques.py"):
        return "loss (ours, chunked)" if "loss" in name or owner == "" and name in ("forward", "backward") \
            or "CrossEntropy" in owner else f"memory techniques: {name}"
    if "/transformers/models/" in path:
        if name in ("apply_rotary_pos_emb", "rotate_half") or "Rotary" in owner:
            return "rotary"
        for part, source in (("Norm", "norms"), ("Attention", "attention projections glue"), ("MLP", "MLP glue"),
                             ("DecoderLayer", "decoder layer (residuals)"), ("ForCausalLM", "lm_head + loss glue"),
                             ("Model", "embedding + model glue")):
            if part in owner:
                return source
        return f"model: {name}"
    if "/transformers/" in path:
        return f"transformers: {Path(path).stem}"
    if path.endswith(("step_ops.py", "stacks.py")):
        return "step loop"
    return None


def stack_source() -> tuple[str, bool, bool]:
    """(source, inside a decoder layer, inside a checkpoint's recompute) from the Python stack."""
    frame, source, in_layer, recompute = sys._getframe(2), None, False, False
    while frame is not None:
        if source is None:
            source = frame_source(frame)
        if "DecoderLayer" in type(frame.f_locals.get("self", None)).__name__:
            in_layer = True
        if frame.f_code.co_filename.endswith("torch/utils/checkpoint.py") and "recompute" in frame.f_code.co_name:
            recompute = True
        frame = frame.f_back
    return source or "other", in_layer, recompute


class OpCounter:
    """Counts the ops of one step: (phase, source, in a layer, op name) -> calls."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, bool, str]] = Counter()
        self.node_sources: dict[Any, tuple[str, bool]] = {}
        self.optimizer = False

    def modes(self) -> tuple[Any, Any]:
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class TagNodes(TorchFunctionMode):
            """Above autograd: the nodes a torch function creates get the source of its caller."""

            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                pending = [t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
                if pending and any(node not in counter.node_sources for node in pending):
                    source, in_layer, _ = stack_source()
                    while pending:
                        node = pending.pop()
                        if node is None or node in counter.node_sources:
                            continue
                        counter.node_sources[node] = (source, in_layer)
                        pending.extend(next_node for next_node, _ in node.next_functions)
                return out

        class CountOps(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                node = torch._C._current_autograd_node()
                if counter.optimizer:
                    phase, (source, in_layer) = "optimizer", ("optimizer", False)
                else:
                    source, in_layer, recompute = stack_source()
                    phase = "recompute" if node is not None and recompute else "forward"
                    if node is not None and not recompute:
                        phase, (source, in_layer) = "backward", counter.node_sources.get(node, ("autograd engine", False))
                counter.counts[(phase, source, in_layer, func.overloadpacket.__name__)] += 1
                return func(*args, **(kwargs or {}))

        return TagNodes(), CountOps()


def one_step(model: Any, loss_fn: stacks.LossFn, optimizer: Any, batch: dict, counter: OpCounter | None) -> float:
    """memory_speed's step (stacks.train_and_measure) on one micro-batch, counted when ``counter`` is given."""
    from contextlib import ExitStack

    with ExitStack() as modes:
        if counter is not None:
            for mode in counter.modes():
                modes.enter_context(mode)
        loss = loss_fn(model, batch, None)
        loss.backward()
        if counter is not None:
            counter.optimizer = True
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
    return value


def count_stack(stack: str, folder: Path, case: dict, overrides: list[str]) -> dict:
    import torch

    model, loss_fn = setup(stack, folder, case, overrides)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = stacks.make_optimizer(params, gpu=False)
    generator = torch.Generator().manual_seed(1234)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (case["batch"], case["seq"]), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    first = one_step(model, loss_fn, optimizer, batch, None)
    counter = OpCounter()
    second = one_step(model, loss_fn, optimizer, batch, counter)
    layers = model.config.num_hidden_layers if hasattr(model, "config") else 0
    rows = [{"phase": p, "source": s, "in_layer": i, "op": o, "calls": n} for (p, s, i, o), n in counter.counts.items()]
    return {"stack": stack, "layers": layers, "trainable_tensors": len(params), "losses": [first, second], "ops": rows}


# ---------------------------------------------------------------- the report

def totals(rows: list[dict], key: Any, views: bool | None = None) -> Counter:
    out: Counter = Counter()
    for row in rows:
        if views is None or (row["op"] in VIEW_OPS) == views:
            out[key(row)] += row["calls"]
    return out


def report(results: list[dict], case: dict) -> str:
    names = [r["stack"] for r in results]
    lines = [f"# Ops a step: {case['model']} {case['method']} seq {case['seq']} x{case['batch']}, "
             f"{results[0]['layers']} layers, hidden {WIDTH['hidden_size']}", ""]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines += ["All ops (views: no kernel on a GPU)", "", head]
    for label, views in (("ops", None), ("of which views", True), ("kernel ops", False)):
        lines.append(f"| {label} | " + " | ".join(str(sum(totals(r["ops"], lambda x: 1, views).values())) for r in results) + " |")
    for phase in PHASES:
        lines.append(f"| kernel ops: {phase} | " + " | ".join(
            str(totals(r["ops"], lambda x: x["phase"], False)[phase]) for r in results) + " |")
    for r in results:
        in_layers = totals(r["ops"], lambda x: x["in_layer"], False)
        lines.append(f"| {r['stack']}: kernel ops per decoder layer | " + (f"{in_layers[True] / r['layers']:.1f}" if r["layers"] else "-")
                     + f", outside layers {in_layers[False]} |" + " |" * (len(names) - 1))
    lines += ["", "Kernel ops by source (all phases; f/r/b/o = forward/recompute/backward/optimizer)", "", head]
    sources = sorted({row["source"] for r in results for row in r["ops"]})
    for source in sources:
        cells = []
        for r in results:
            by_phase = totals([x for x in r["ops"] if x["source"] == source], lambda x: x["phase"], False)
            total = sum(by_phase.values())
            cells.append(f"{total} ({'/'.join(str(by_phase[p]) for p in PHASES)})" if total else "-")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines += ["", "Kernel ops by aten op (top 25 by the largest count)", "", head]
    by_op = [totals(r["ops"], lambda x: x["op"], False) for r in results]
    for op in sorted(set().union(*by_op), key=lambda o: -max(c[o] for c in by_op))[:25]:
        lines.append(f"| {op} | " + " | ".join(str(c[op]) for c in by_op) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-2b", help="catalog key (default gemma-2b)")
    parser.add_argument("--method", default="qlora", choices=("qlora", "lora"))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=0, help="0: the model's own")
    parser.add_argument("--vocab", type=int, default=0, help="0: the model's own (sets the loss's chunks)")
    parser.add_argument("--stacks", default="ours:universal,baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="our recipe's key=value")
    parser.add_argument("--json", type=Path, help="write every count here")
    parser.add_argument("--smoke", action="store_true", help=f"a quick run: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    case = {"model": args.model, "method": args.method, "seq": args.seq, "batch": args.batch, "accum": 1,
            "cap_gb": None, "lengths": "fixed"}
    folder = build_tiny(args.model, args.layers, args.vocab)
    results = [count_stack(stack, folder, case, args.overrides) for stack in args.stacks.split(",")]
    text = report(results, case)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"case": case, "results": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
