"""How to use an export elsewhere: the lines the CLI prints and the TUI's export dialog shows after it.

The engine records ready-made commands for GGUF and Ollama exports (``ExportResult.next_steps``);
the adapter and merged folders are used from Python, so the snippet is built here from the folder,
with the base model's id read from the adapter's own ``adapter_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tui_finetune.core.export_spec import ExportResult


def adapter_base_id(adapter_dir: Path) -> str:
    """The base model the adapter was trained on, as peft recorded it ("BASE" when unreadable)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "BASE"
    return str(config.get("base_model_name_or_path") or "BASE")


def usage_lines(result: ExportResult) -> list[str]:
    """Commands or Python that load this export: llama.cpp / ollama lines, or transformers / peft calls."""
    if result.next_steps:
        return list(result.next_steps)
    if result.target == "adapter":
        base = adapter_base_id(Path(result.path))
        return [f'peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{result.path}")']
    if result.target == "merged":
        return [f'transformers: AutoModelForCausalLM.from_pretrained("{result.path}") '
                f'and AutoTokenizer.from_pretrained("{result.path}")']
    return []
