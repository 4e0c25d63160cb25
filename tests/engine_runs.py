"""Helpers for tests that start the real worker: write a recipe, launch, wait, read the events."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tui_finetune.core.events import Event, read_events
from tui_finetune.core.run_folder.control import launch_run
from tui_finetune.core.recipe_io import recipe_from_dict
from tui_finetune.core.run_folder.info import read_run_info
from tui_finetune.core.run_folder.listing import pid_alive

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(model: Path, **sections):
    """A CPU LoRA recipe for the tiny model; ``sections`` override whole tables' keys."""
    data = {"model": str(model), "method": "lora",
            "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            "data": {"seq_len": 128, "eval_split": 0.2},
            "train": {"micro_batch": 4, "grad_accum": 2, "max_steps": 20, "learning_rate": 2e-3,
                      "optimizer": "adamw_torch", "precision": "fp32", "gradient_checkpointing": False,
                      "warmup_ratio": 0.1, "logging_steps": 1, "seed": 7},
            "checkpoint": {"every_steps": 1000, "every_minutes": 0.0, "keep_last": 2}}
    for table, values in sections.items():
        data[table] = {**data.get(table, {}), **values} if isinstance(values, dict) else values
    return recipe_from_dict(data, "test recipe")


def start(recipe, data: Path, home: Path) -> Path:
    """Launch the real detached worker; the Hub is offline and its cache empty, so nothing downloads."""
    env = {**os.environ, "TUI_FINETUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf")}
    return launch_run(recipe, data, base=home / "runs", env=env)


def wait_for_end(run_dir: Path, timeout: float = 120.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = read_run_info(run_dir)
        if not pid_alive(info.pid):
            return read_run_info(run_dir).state
        time.sleep(0.1)
    raise AssertionError(f"worker still running after {timeout}s: {(run_dir / 'worker.log').read_text()[-3000:]}")


def wait_for(run_dir: Path, predicate, timeout: float = 60.0) -> Event:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in read_events(run_dir / "events.jsonl")[0]:
            if predicate(event):
                return event
        pid = read_run_info(run_dir).pid
        if pid is not None and not pid_alive(pid):  # None: the launcher has not started the worker yet
            break
        time.sleep(0.05)
    log = run_dir / "worker.log"
    raise AssertionError(f"event never came: {log.read_text()[-3000:] if log.is_file() else 'no worker.log'}")


def events_of(run_dir: Path, cls) -> list:
    return [e for e in read_events(run_dir / "events.jsonl")[0] if isinstance(e, cls)]


def cli(*args: str, home: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUI_FINETUNE_HOME": str(home), "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "tui_finetune.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def plain_loop_losses(model_dir: Path, data_path: Path, recipe, steps: int, *, gpu: bool = False) -> list[float]:
    """What the engine is compared with: transformers + peft and a hand-written loop on the same rows
    (all 8 training rows in every step), seed, LoRA init, AdamW, schedule and clipping. On the GPU the
    weights are bf16 under autocast; on the CPU, fp32."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler, set_seed

    from tui_finetune.data.prepare import prepare_datasets

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = prepare_datasets(data_path, tokenizer, recipe.data, recipe.train.seed).train
    assert len(train) == 8
    device = "cuda" if gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 device_map={"": 0} if gpu else None)
    model.requires_grad_(False)
    set_seed(recipe.train.seed)
    model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    width = max(len(r) for r in train["input_ids"])
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in train["input_ids"]], device=device)
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in train["labels"]], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in train["input_ids"]], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(recipe.train.scheduler, optimizer,
                              num_warmup_steps=math.ceil(recipe.train.warmup_ratio * steps), num_training_steps=steps)
    losses = []
    model.train()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if gpu:
        del model, optimizer
        torch.cuda.empty_cache()
    return losses
