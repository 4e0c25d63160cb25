"""``--to merged``: the adapter merged into a 16-bit reload of the base (never into 4-bit weights),
saved as safetensors with the tokenizer, its chat template, and every end token in generation_config."""

from __future__ import annotations

from pathlib import Path

from tui_finetune.core.export_spec import CheckResult, ExportSpec
from tui_finetune.engine.export import checks
from tui_finetune.engine.export.staging import staged_folder
from tui_finetune.engine.run_model import RunFinetune, load_merged, stored_dtype


def write_merged(run: RunFinetune, dest: Path, stop_ids: list[int]) -> list[str]:
    model = load_merged(run)
    model.generation_config.eos_token_id = stop_ids  # so transformers, vLLM & co stop at the end of the turn
    with staged_folder(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.chat_template = run.template.jinja
        run.tokenizer.save_pretrained(tmp)
    del model
    return sorted(p.name for p in dest.iterdir())


def check_merged(run: RunFinetune, dest: Path, reference: checks.Behaviour, prompts: list[list[int]],
                 spec: ExportSpec) -> list[CheckResult]:
    """Reload with plain transformers (in the reference's dtype); stop only at the end tokens the export declares."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(dest), dtype=run.check_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    declared = model.generation_config.eos_token_id
    stops = [declared] if isinstance(declared, int) else list(declared or [])
    got = checks.measure(model, prompts, stops, tokenizer.pad_token_id, spec.max_new_tokens)
    stored = stored_dtype(run.base_folder)
    fmt = "fp32" if stored == torch.float32 else ("bf16" if stored == torch.bfloat16 else "f16")
    return [checks.compare_logits(reference, got, fmt),
            checks.compare_replies(reference, got, required=fmt == "fp32", fmt=fmt),
            checks.check_template_roundtrip(run, tokenizer.chat_template, tokenizer),
            checks.check_stops(got, spec.max_new_tokens, checks.stop_names(tokenizer, stops))]
