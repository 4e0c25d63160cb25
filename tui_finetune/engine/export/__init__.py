"""Export a finished run: ``run_export(run_dir, spec, progress) -> ExportResult``.

One module per target (adapter, merged, gguf, ollama); this one runs the common steps in order:
open the run, check disk and RAM (preflight), measure the reference (adapter on base), write the
export to a temporary name and rename it, reload and check it, and record the result in
export.json. Nothing is reported done before its checks ran.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tui_finetune.core.export_spec import ExportResult, ExportSpec, record_export

Progress = Callable[[str], None]


def run_export(run_dir: Path, spec: ExportSpec, progress: Progress | None = None) -> ExportResult:
    """Write, check and record one export; raises ExportError (with the fix) when it can't start."""
    from tui_finetune.engine.export import checks, preflight
    from tui_finetune.engine.run_model import count_parameters, load_reference, open_run, stored_dtype
    from tui_finetune.engine.samples import stop_token_ids

    import torch

    say = progress or (lambda message: None)
    start = time.time()
    run = open_run(run_dir)
    dest = spec.folder(run_dir)
    if spec.uses_gguf:
        from tui_finetune.engine.export.gguf_arch import arch_for

        arch_for(run.base_folder)  # refuse an unsupported architecture before any work
    params = count_parameters(run.base_folder)
    bytes_per_param = stored_dtype(run.base_folder).itemsize
    adapter_bytes = sum(p.stat().st_size for p in run.adapter_dir.iterdir() if p.is_file())
    preflight.check_room(spec, preflight.estimate_needs(spec, params, adapter_bytes, bytes_per_param), dest)
    run.check_dtype = {4: torch.float32, 2: stored_dtype(run.base_folder)}[
        preflight.check_bytes_per_param(params, bytes_per_param)]

    say(f"measuring the fine-tune (adapter on base, {str(run.check_dtype).removeprefix('torch.')}) on the check prompts")
    prompts = checks.check_prompts(run)
    reference_model = load_reference(run, run.check_dtype)
    stops = stop_token_ids(run.tokenizer, reference_model)
    reference = checks.measure(reference_model, prompts, stops, run.tokenizer.pad_token_id, spec.max_new_tokens)
    del reference_model

    result = ExportResult(target=spec.target, quant=spec.quant if spec.uses_gguf else "", path=str(dest))
    say(f"writing {spec.target} to {dest}")
    to_check: list[Callable[[], list]] = []
    if spec.target == "adapter":
        from tui_finetune.engine.export.adapter import check_adapter, write_adapter

        result.files = write_adapter(run, dest)
        to_check.append(lambda: check_adapter(run, dest, reference, prompts, spec))
    elif spec.target == "merged":
        from tui_finetune.engine.export.merged import check_merged, write_merged

        result.files = write_merged(run, dest, stops)
        to_check.append(lambda: check_merged(run, dest, reference, prompts, spec))
    else:
        from tui_finetune.engine.export.gguf_target import check_gguf, write_gguf_export

        gguf_file = write_gguf_export(run, dest, spec, stops, say)
        result.path, result.files = str(gguf_file), [gguf_file.name]
        result.next_steps = [f"llama-cli -m {gguf_file} -cnv"]
        to_check.append(lambda: check_gguf(run, gguf_file, reference, prompts, spec))
        if spec.target == "ollama":
            from tui_finetune.engine.export.ollama import check_modelfile, write_modelfile

            modelfile, result.next_steps = write_modelfile(run, dest, gguf_file, say)
            result.path, result.files = str(dest), sorted(p.name for p in dest.iterdir())
            to_check.append(lambda: check_modelfile(run, modelfile, gguf_file, prompts, spec))
    if spec.check:
        say("reloading the export and checking it against the fine-tune")
        result.checks = [outcome for step in to_check for outcome in step()]
    result.seconds = round(time.time() - start, 1)
    record_export(run_dir, result)
    return result
