"""The ``tui-finetune`` argument parser: every command and option, and nothing else.

argparse only: building the parser imports none of the command modules, so ``tui-finetune --help``
answers at once. The commands themselves live one group a module beside this one.
"""

from __future__ import annotations

import argparse

from tui_finetune.core.export_spec import QUANTS, TARGETS

SET_HELP = "override a recipe value, e.g. --set train.max_steps=20 (repeatable)"
COLUMNS_HELP = "column mapping, e.g. prompt=question,reply=answer (the recipe's data.columns)"
ALLOW_DROP_HELP = "train on the usable rows even when more than data.max_drop_fraction (5%%) are dropped"
FORMAT_HELP = "force a format: alpaca, sharegpt, messages, prompt_completion, text (the recipe's data.format)"
DEVICES_HELP = ("GPUs to train on, data-parallel: a number or 'all' (the recipe's train.devices; default 1). Every GPU "
                "holds the whole model: more GPUs train faster, they don't fit a bigger model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tui-finetune",
        description="Fine-tune an LLM on your own GPU. With no command, opens the wizard.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("doctor", help="report GPUs, driver, torch/CUDA, bitsandbytes, disk and folders")
    _add_plan(sub)
    _add_data(sub)
    _add_run_commands(sub)
    _add_after_training(sub)
    return parser


def _add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="which models and recipes fit a card, with the VRAM breakdown")
    plan.add_argument("--vram", type=float, help="plan for a card with this many GB (default: the GPU here)")
    plan.add_argument("--model", help="only this model (catalog key, Hub id or local folder)")
    plan.add_argument("--recipe", help="plan this recipe file or preset name")
    plan.add_argument("--seq", type=int, help="sequence length to plan for (overrides the recipe)")


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    check = data_sub.add_parser("check", help="the dataset doctor: format, problems, token lengths, a rendered example")
    check.add_argument("file", help="a data file or a folder of data files")
    check.add_argument("--model", help="tokenizer to measure with: catalog key, Hub id or local folder")
    check.add_argument("--seq", type=int, default=1024, help="sequence length cutoff (default 1024)")
    check.add_argument("--format", help=FORMAT_HELP)
    check.add_argument("--columns", help=COLUMNS_HELP)
    check.add_argument("--validation", help="a separate validation file")
    check.add_argument("--allow-drop", action="store_true", help=ALLOW_DROP_HELP)
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                       help="a [data] recipe value, as train takes it, e.g. --set data.columns=prompt=q,reply=a")


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a recipe on a dataset in a background worker, and follow it")
    train.add_argument("recipe", help="a recipe file or a preset name (e.g. demo-cpu)")
    train.add_argument("--data", help="the training data file (a preset may ship its own sample data)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    train.add_argument("--columns", help=COLUMNS_HELP)
    train.add_argument("--allow-drop", action="store_true", help=ALLOW_DROP_HELP)
    train.add_argument("--format", help=FORMAT_HELP)
    train.add_argument("--devices", metavar="N|all", help=DEVICES_HELP)
    train.add_argument("--detach", action="store_true", help="start the run, print its id and return at once")
    sub.add_parser("runs", help="list runs: id, model, state, step, last loss, batch (sequences a step), age")
    logs = sub.add_parser("logs", help="print a run's events")
    logs.add_argument("run", nargs="?", default="last", help="run id (or a unique part of it); default: the last run")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until the run ends")
    stop = sub.add_parser("stop", help="stop a run: it saves a checkpoint and exits (resume it later)")
    stop.add_argument("run")
    stop.add_argument("--no-wait", action="store_true", help="return without waiting for the checkpoint")
    stop.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the checkpoint (default 600)")
    resume = sub.add_parser("resume", help="resume an interrupted run from its newest valid checkpoint")
    resume.add_argument("run")
    resume.add_argument("--detach", action="store_true")
    resume.add_argument("--from", dest="from_step", type=int, metavar="STEP",
                        help="resume from the checkpoint of this step (0: start again from the beginning)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a recipe value for the rest of the run (needs --force unless it is a checkpoint.* key)")
    resume.add_argument("--force", action="store_true",
                        help="resume even though the recipe, model or data changed since the checkpoint")
    resume.add_argument("--devices", metavar="N|all",
                        help="resume on another number of GPUs (needs --force: the data order changes, and so does "
                             "the effective batch unless you change train.grad_accum too)")


def _add_after_training(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="talk to a finished run's fine-tune (or its base model with --base)")
    chat.add_argument("run", help="run id (or a unique part of it, 'last', or a run folder)")
    chat.add_argument("--base", action="store_true", help="answer with the base model (the adapter switched off)")
    chat.add_argument("--prompt", help="print one answer to this message and exit (for scripts)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7,
                      help="sampling temperature of the interactive chat (default 0.7; --prompt is always greedy)")
    export = sub.add_parser("export", help="export a finished run (adapter, merged, GGUF, Ollama), checked before done")
    export.add_argument("run", help="run id (or a unique part of it, 'last', or a run folder)")
    export.add_argument("--to", required=True, choices=TARGETS,
                        help="adapter: peft folder; merged: 16-bit safetensors; gguf: one .gguf file; "
                             "ollama: a GGUF plus a Modelfile")
    export.add_argument("--quant", default="f16", choices=QUANTS,
                        help="gguf/ollama format: f16 (exact), q8_0 (half the size), q4_k_m (needs llama-quantize)")
    export.add_argument("--out", help="output folder (default: RUN/exports/TARGET[-QUANT])")
    export.add_argument("--no-check", action="store_true", help="skip reloading and checking the export (not advised)")
