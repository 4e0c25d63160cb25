"""``--to adapter``: the peft folder plus the tokenizer with the chat template the run trained with,
loadable with plain ``PeftModel.from_pretrained`` (no tui-finetune needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tui_finetune.core.catalog import CATALOG
from tui_finetune.core.export_spec import CheckResult, ExportSpec
from tui_finetune.engine.export import checks
from tui_finetune.engine.export.staging import staged_folder
from tui_finetune.engine.run_model import RunFinetune

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def write_adapter(run: RunFinetune, dest: Path) -> list[str]:
    with staged_folder(dest) as tmp:
        for name in ADAPTER_FILES:
            shutil.copy2(run.adapter_dir / name, tmp / name)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = run.recipe.model
        if model in CATALOG or (model.count("/") == 1 and not Path(model).exists()):
            config["base_model_name_or_path"] = CATALOG[model].hub_id if model in CATALOG else model
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        run.tokenizer.chat_template = run.template.jinja
        run.tokenizer.save_pretrained(tmp)
    return sorted(p.name for p in dest.iterdir())


def check_adapter(run: RunFinetune, dest: Path, reference: checks.Behaviour, prompts: list[list[int]],
                  spec: ExportSpec) -> list[CheckResult]:
    """Reload with plain peft on the base, as a user would, and compare."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tui_finetune.engine.samples import stop_token_ids

    dtype = run.check_dtype
    base = AutoModelForCausalLM.from_pretrained(str(run.base_folder), dtype=dtype,
                                                trust_remote_code=run.recipe.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(dest))
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    stops = stop_token_ids(tokenizer, model)
    got = checks.measure(model, prompts, stops, tokenizer.pad_token_id, spec.max_new_tokens)
    fmt = "fp32" if dtype == torch.float32 else "bf16"
    return [checks.compare_logits(reference, got, fmt), checks.compare_replies(reference, got, required=True, fmt=fmt),
            checks.check_template_roundtrip(run, tokenizer.chat_template, tokenizer),
            checks.check_stops(got, spec.max_new_tokens, checks.stop_names(tokenizer, stops))]
