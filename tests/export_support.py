"""A tiny "finished run" for chat and export tests: random tiny model, real tokenizer, nonzero LoRA.

The model is built so greedy generation ends at the end-of-turn token within a few tokens, which a
random model never would: hidden dimension 0 is a constant channel (every embedding has the same
value there, and no layer writes to it), and only the end-of-turn token's output row reads it. So
the "does it stop" check has something real to pass, and a broken stop token really fails it.
The LoRA B matrices are random (not peft's zeros), so merging changes the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine_runs import tiny_recipe

TOKENIZERS = Path(__file__).resolve().parent / "data" / "tokenizers"
ARCHS = ("llama", "llama3", "llama3-tied", "qwen2", "gemma3", "mistral", "gemma", "phi")
"""The tiny models: a model_type, or llama3 (a Llama with Llama 3.1's RoPE scaling, tied or not); the tokenizer is
llama-3's for the Llamas, ChatML (Qwen2.5) for the rest."""
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
"""Llama 3.1's scaling with a 64-token original context, so the tiny model's 8 rotary frequencies
(wavelengths 6 to 20,000 tokens) fall in all three of its bands: kept, blended and divided by 8."""


def _config(arch: str, vocab: int, tokenizer):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch in ("llama3", "llama3-tied"):  # Llama 3.1 8B, and Llama 3.2 3B with its tied embeddings
        return tf.LlamaConfig(**common, tie_word_embeddings=arch.endswith("tied"), rope_parameters=dict(LLAMA3_ROPE))
    if arch == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if arch == "gemma3":
        # head_dim 256 as in every Gemma 3 below 27B: a GGUF stores neither query_pre_attn_scalar (256) nor
        # layer_types (every 6th global), and llama.cpp and transformers' GGUF loader derive them the same way
        # 6 layers, so the last one is global (RoPE base 1e6) and the GGUF's freq_base is used
        return tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=256, sliding_window=64)
    if arch == "phi":
        return tf.PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                            num_key_value_heads=4, partial_rotary_factor=0.5, tie_word_embeddings=False)
    raise ValueError(arch)


def _wire_stop_channel(model, stop_id: int, strength: float) -> None:
    import torch

    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = 0.02  # about the size of the other (random) dimensions
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj", "dense", "fc2")) and hasattr(module, "weight"):
                module.weight[0, :] = 0.0
                if getattr(module, "bias", None) is not None:
                    module.bias[0] = 0.0
        head = model.get_output_embeddings()
        if head.weight.data_ptr() != embed.data_ptr():
            head.weight[:, 0] = 0.0
            head.weight[stop_id, 0] = strength
        else:  # tied (Gemma): the stop token's embedding row carries the channel instead
            embed[stop_id, 0] = strength


STOP_STRENGTH = {"llama": 0.6, "llama3": 0.6, "mistral": 0.55, "qwen2": 0.55, "phi": 2.0, "gemma": 1.5, "gemma3": 6.0,
                 "llama3-tied": 1.5}
"""Measured: each arch stops within a few tokens on the tests' prompts, not at the first one every time;
except Phi-2 (its random biases) and the tied Llama, which stop either at once or never (these values are
well inside "at once")."""


def build_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, stop_strength: float | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    source = TOKENIZERS / ("llama-3" if arch.startswith("llama") else "qwen2.5-chatml")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer), tokenizer), dtype=torch.float32)
    with torch.no_grad():  # transformers starts biases at zero, where a misplaced or misnamed one can't show
        for name, param in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name:
                param.normal_(0.0, 0.02)
    _wire_stop_channel(model, tokenizer.eos_token_id, stop_strength or STOP_STRENGTH[arch])
    model.save_pretrained(folder)
    return folder


def write_chat_data(path: Path, rows: int = 8) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 2?"},
                                                  {"role": "assistant", "content": f"{i} + 2 = {i + 2}"}]}) + "\n")
    return path


def make_finished_run(tmp: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A completed run folder (recipe.toml, run.json, adapter/) for a tiny model of ``arch``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tui_finetune.core.run_folder.info import create_run, update_run_info
    from tui_finetune.core.run_folder.layout import ADAPTER_DIR

    base = build_tiny_model(tmp / f"base-{arch}", arch, seed)
    data = write_chat_data(tmp / "chat.jsonl")
    run_dir = create_run(tiny_recipe(base), data, base=tmp / "runs")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
                if any(part in name for part in ("o_proj", "down_proj", "dense.", "fc2")):
                    param[0, :] = 0.0  # keep the stop channel (engine_tiny's docstring) clean
    peft_model.save_pretrained(run_dir / ADAPTER_DIR, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(run_dir / ADAPTER_DIR)
    update_run_info(run_dir, state="completed", pid=None)
    return run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest
