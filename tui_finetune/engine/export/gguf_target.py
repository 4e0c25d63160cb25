"""``--to gguf``: write the merged fine-tune as F16 or Q8_0 GGUF (or Q4_K_M through llama-quantize), then
check it twice: read back with the gguf package's reader, and loaded by transformers' own GGUF loader
(an independent reading of the same conventions, for the architectures it knows). Both run with the
file's own RoPE (transformers' loader reads no RoPE scaling), and that RoPE is compared on its own with
the frequencies transformers computes from the base config: on a short check prompt, a wrong Llama 3
``rope_freqs`` changes the logits by less than the F16 tolerance, so only that comparison catches it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

from tui_finetune.core.export_spec import CheckResult, ExportError, ExportSpec
from tui_finetune.engine.export import checks
from tui_finetune.engine.export.gguf_arch import arch_for, from_gguf, tensor_names
from tui_finetune.engine.export.gguf_rope import (ROPE_FREQS, FileRope, apply_file_rope, full_attention_inv_freq,
                                                  read_file_rope)
from tui_finetune.engine.export.gguf_writer import write_gguf
from tui_finetune.engine.export.staging import staged_file
from tui_finetune.engine.run_model import RunFinetune, load_merged

QUANTIZE_TOOL = "llama-quantize"


def gguf_path(run: RunFinetune, dest: Path, quant: str) -> Path:
    return dest / f"{run.run_dir.name}-{quant}.gguf"


def write_gguf_export(run: RunFinetune, dest: Path, spec: ExportSpec, stop_ids: list[int],
                      say: Callable[[str], None]) -> Path:
    arch = arch_for(run.base_folder)
    target = gguf_path(run, dest, spec.quant)
    if spec.quant == "q4_k_m" and shutil.which(QUANTIZE_TOOL) is None:
        raise ExportError(f"--quant q4_k_m needs llama.cpp's {QUANTIZE_TOOL} on PATH, and it isn't: use "
                          "--quant q8_0 (written in plain Python), or install llama.cpp and try again")
    say("merging the adapter into the base")
    model = load_merged(run)
    python_quant = "f16" if spec.quant == "q4_k_m" else spec.quant
    written = gguf_path(run, dest, python_quant) if spec.quant == "q4_k_m" else target
    dest.mkdir(parents=True, exist_ok=True)
    say(f"writing {written.name}")
    write_gguf(model, arch, written, python_quant, name=run.run_dir.name, tokenizer=run.tokenizer,
               tokenizer_folder=run.adapter_dir, chat_template=run.template.jinja, stop_ids=stop_ids, progress=say)
    del model
    if spec.quant == "q4_k_m":
        say(f"quantizing to Q4_K_M with {QUANTIZE_TOOL}")
        with staged_file(target) as tmp:
            subprocess.run([QUANTIZE_TOOL, str(written), str(tmp), "Q4_K_M"], check=True, capture_output=True)
        written.unlink()
    return target


def read_metadata(reader: Any, gguf_arch: str, config: Any) -> dict[str, Any]:
    """The GGUF fields the checks need, as plain values (``rope``: a FileRope)."""
    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    return {"chat_template": value("tokenizer.chat_template"), "eos": value("tokenizer.ggml.eos_token_id"),
            "eot": value("tokenizer.ggml.eot_token_id"), "tokens": value("tokenizer.ggml.tokens"),
            "rope": read_file_rope(reader, gguf_arch, config)}


def declared_stops(meta: dict[str, Any]) -> list[int]:
    return sorted({int(meta[k]) for k in ("eos", "eot") if meta.get(k) is not None})


def load_with_reader(run: RunFinetune, path: Path) -> tuple[Any, dict[str, Any]]:
    """Read every tensor back with gguf's reader, undo the llama.cpp conventions, load into an HF model.
    The model keeps the RoPE transformers builds from the base config; the file's is in ``meta["rope"]``."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = arch_for(run.base_folder)
    config = AutoConfig.from_pretrained(str(run.base_folder))
    model = AutoModelForCausalLM.from_config(config, dtype=run.check_dtype)
    names = {g: h for h, g in tensor_names(arch, config, list(model.state_dict())).items()}
    reader = gguf.GGUFReader(str(path))
    state = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # not a weight: read into meta["rope"]
        hf_name = names[tensor.name]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32")
        state[hf_name] = torch.from_numpy(from_gguf(arch, config, hf_name, data).copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ExportError(f"{path.name}: tensors missing {missing[:3]} or unexpected {unexpected[:3]} on reading back")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model, read_metadata(reader, arch.gguf_arch, config)


def check_gguf(run: RunFinetune, path: Path, reference: checks.Behaviour, prompts: list[list[int]],
               spec: ExportSpec) -> list[CheckResult]:
    fmt = "q8_0" if spec.quant == "q8_0" else ("f16" if spec.quant == "f16" else "q8_0")
    model, meta = load_with_reader(run, path)
    rope_check = check_rope(model, meta["rope"])
    apply_file_rope(model, meta["rope"])  # from here on the model runs the file's RoPE, as llama.cpp will
    stops = declared_stops(meta)
    names = checks.stop_names(run.tokenizer, stops)
    got = checks.measure(model, prompts, stops, run.tokenizer.pad_token_id, spec.max_new_tokens)
    del model
    results = [rope_check, _renamed(checks.compare_logits(reference, got, fmt), "gguf reader: "),
               _renamed(checks.compare_replies(reference, got, required=fmt == "f16", fmt=fmt), "gguf reader: "),
               checks.check_stops(got, spec.max_new_tokens, names)]
    vocab = run.tokenizer.get_vocab()
    tokens = meta["tokens"] or []
    same_vocab = all(vocab.get(t, i) == i for i, t in enumerate(tokens) if not t.startswith("[PAD"))
    results.append(CheckResult("tokenizer tokens", same_vocab,
                               f"{len(tokens)} tokens in the file, each at the id the tokenizer gives it"
                               if same_vocab else "a token in the file sits at another id than in the tokenizer"))
    results += _check_with_transformers(run, path, reference, prompts, spec, fmt, meta)
    return results


def _check_with_transformers(run: RunFinetune, path: Path, reference: checks.Behaviour, prompts: list[list[int]],
                             spec: ExportSpec, fmt: str, meta: dict[str, Any]) -> list[CheckResult]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = arch_for(run.base_folder)
    if not arch.transformers_reads:
        why = f"transformers has no GGUF reader for {arch.model_type}; checked with the gguf reader only"
        return [CheckResult("transformers reload", False, why, skipped=True),
                checks.check_template_roundtrip(run, meta["chat_template"], run.tokenizer)]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=run.check_dtype)
    rope_applied = apply_file_rope(model, meta["rope"])  # transformers' GGUF loader reads no RoPE scaling
    stops = declared_stops(meta)
    got = checks.measure(model, prompts, stops, run.tokenizer.pad_token_id, spec.max_new_tokens)
    del model
    logits = checks.compare_logits(reference, got, fmt)
    if rope_applied:
        logits.detail += " (with the file's RoPE scaling, which transformers' GGUF loader doesn't read)"
    results = [_renamed(logits, "transformers reload: "),
               _renamed(checks.compare_replies(reference, got, required=fmt == "f16", fmt=fmt), "transformers reload: ")]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # an older transformers may not rebuild every tokenizer; the template still counts
        results.append(CheckResult("transformers tokenizer", False, f"could not rebuild it ({err})", skipped=True))
        tokenizer = run.tokenizer
    results.append(checks.check_template_roundtrip(run, meta["chat_template"], tokenizer))
    return results


def check_rope(model: Any, rope: FileRope) -> CheckResult:
    """The file's RoPE (freq_base, rotary dimensions, rope_freqs or linear factor) against the frequencies
    transformers computes from the base config with its own code (ROPE_INIT_FUNCTIONS)."""
    name = "RoPE matches the model's"
    table = full_attention_inv_freq(model)
    if table is None:
        return CheckResult(name, False, "the model has no full-attention layer to compare with", skipped=True)
    expected = table.double().cpu().numpy()
    got = rope.inv_freq().astype("float64")
    same = expected.shape == got.shape and bool((abs(got - expected) <= 1e-5 * abs(expected)).all())
    scaled = "unscaled" if rope.factors is None else \
        f"scaled by {float(rope.factors.min()):g} to {float(rope.factors.max()):g}"
    return CheckResult(name, same,
                       f"{len(got)} rotary frequencies from freq_base {rope.theta:g}, {scaled}, "
                       + ("equal to transformers' for this config" if same else
                          f"differ from transformers' ({len(expected)} frequencies) for this config"))


def _renamed(result: CheckResult, prefix: str) -> CheckResult:
    result.name = prefix + result.name
    return result
