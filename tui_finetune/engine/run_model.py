"""A finished run's fine-tune, loaded back the way it trained: for chat and for every export.

The base is found as the worker found it (engine/model_folder.py) and loaded with engine/loading.py,
so a QLoRA run chats on its 4-bit base on a GPU and a CPU run on fp32. The tokenizer is the one saved
next to the adapter, and the chat template is the one training rendered with (data/render.py): a
tokenizer without a template trained on the ChatML fallback, so chat and exports use that too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tui_finetune.core.export_spec import ExportError
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.core.run_folder.info import read_run_info, read_run_recipe
from tui_finetune.core.run_folder.layout import ADAPTER_DIR
from tui_finetune.core.run_folder.listing import shown_state
from tui_finetune.data.render import TemplateChoice, resolve_template


@dataclass
class RunFinetune:
    """Everything about a finished run that chat and export need, before any weights load."""

    run_dir: Path
    recipe: RecipeSpec
    base_folder: Path
    adapter_dir: Path
    tokenizer: Any
    template: TemplateChoice
    check_dtype: torch.dtype = torch.float32
    """What an export's checks compute in: the reference (adapter on base) and every reload alike, so a
    difference is the format's rounding and not the arithmetic's. fp32 where RAM allows (preflight picks)."""

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation up to the assistant's turn, as training rendered it."""
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template.jinja, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def open_run(run_dir: Path) -> RunFinetune:
    """Read a run's recipe, find its base and load its tokenizer; refuse a run with no adapter yet."""
    from tui_finetune.engine.loading import load_tokenizer
    from tui_finetune.engine.model_folder import resolve_model

    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        state = shown_state(read_run_info(run_dir))
        raise ExportError(f"run {run_dir.name} has no adapter yet (state: {state}): the adapter is written when "
                          "training completes; resume it with 'tui-finetune resume' or pick a completed run")
    recipe = read_run_recipe(run_dir)
    base = resolve_model(recipe.model).folder
    tokenizer = load_tokenizer(adapter, recipe)
    return RunFinetune(run_dir, recipe, base, adapter, tokenizer, resolve_template(tokenizer, recipe.data.template))


def load_chat_model(run: RunFinetune) -> Any:
    """Base plus adapter, on the device and in the precision the run trained with (4-bit for QLoRA)."""
    from peft import PeftModel

    from tui_finetune.engine.loading import detect_device, load_base_model

    device = detect_device()
    recipe = run.recipe if device.has_cuda or run.recipe.method != "qlora" else replace(run.recipe, method="lora")
    base = load_base_model(run.base_folder, recipe, device)
    base.config.use_cache = True  # training turned it off; generation wants it
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    model.eval()
    return model


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the base's weights are stored in (config.json); fp32 for tiny and converted models."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def load_reference(run: RunFinetune, dtype: torch.dtype = torch.float32) -> Any:
    """The adapter on a full-precision base on the CPU: what every export is compared against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(run.base_folder), dtype=dtype,
                                                trust_remote_code=run.recipe.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    model.eval()
    return model


def load_merged(run: RunFinetune, dtype: torch.dtype | None = None) -> Any:
    """The adapter merged into a 16-bit (or, for an fp32-stored base, fp32) reload of the base, on the
    CPU: never into 4-bit weights, whose rounding would lose part of the fine-tune."""
    model = load_reference(run, dtype or stored_dtype(run.base_folder))
    return model.merge_and_unload()


def count_parameters(folder: Path) -> int:
    """Parameters of the base, from its safetensors headers (no weights loaded)."""
    import json
    import struct

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total
