"""On a CUDA GPU: the input embedding in CPU RAM (``memory.embeddings_on_cpu``) frees its VRAM and changes no loss.

A random-weight Llama with a large vocabulary (so the embedding is most of the weights), loaded as the
worker loads it (engine/backends.py, QLoRA 4-bit through ``device_map={"": 0}``, and bf16 LoRA), with
the lever off and on: the allocated memory after loading drops by the embedding's bytes, the model's
device stays the GPU, the losses of a few steps with gradient checkpointing are the same, and a
generation works. Skipped without CUDA.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_runs import tiny_recipe  # noqa: E402
from engine_tiny import build_tokenizer  # noqa: E402

VOCAB, HIDDEN = 32768, 512
EMBEDDING_BYTES = VOCAB * HIDDEN * 2  # bf16: 32 MiB
SLACK = 2 * 1024**2


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide-llama")
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _load(folder, method: str, on_cpu: bool):
    from tui_finetune.engine import backends
    from tui_finetune.engine.loading import detect_device

    recipe = tiny_recipe(folder, method=method, memory={"embeddings_on_cpu": on_cpu, "backend": "universal"},
                         train={"precision": "auto", "gradient_checkpointing": True, "optimizer": "adamw_torch"},
                         quant={"compute_dtype": "auto"})
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    loaded = backends.load_for_training(folder, recipe, detect_device())
    torch.cuda.synchronize()
    return loaded, recipe, torch.cuda.memory_allocated() - before


def _losses(loaded, recipe, steps: int = 3) -> list[float]:
    model, backend = loaded.model, loaded.backend
    torch.manual_seed(3)
    ids = torch.randint(10, VOCAB, (2, 64), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = backend.loss(model, dict(batch), recipe.memory)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_the_lever_frees_the_embeddings_vram_and_changes_no_loss(wide_llama, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from tui_finetune.engine.embedding_offload import input_embedding_on_cpu

    runs = {}
    for on_cpu in (False, True):
        loaded, recipe, held = _load(wide_llama, method, on_cpu)
        model = loaded.model
        assert input_embedding_on_cpu(model) == on_cpu
        assert model.device.type == "cuda"
        if on_cpu:
            assert model.get_input_embeddings().weight.device.type == "cpu"
            assert all(p.device.type == "cuda" for p in model.parameters())
        losses = _losses(loaded, recipe)
        runs[on_cpu] = held, losses, _greedy(model)
        del loaded, model
        torch.cuda.empty_cache()
    (held_off, losses_off, tokens_off), (held_on, losses_on, tokens_on) = runs[False], runs[True]
    assert held_off - held_on >= EMBEDDING_BYTES - SLACK, (held_off, held_on)
    assert losses_on == pytest.approx(losses_off, rel=1e-3), (losses_on, losses_off)
    assert tokens_on == tokens_off and len(tokens_on) == 8


def _greedy(model) -> list[int]:
    """What engine/samples.py's generation does, as token ids (the tiny tokenizer can't spell this vocabulary)."""
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8]], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             use_cache=True, pad_token_id=0)
    model.train()
    return out[0].tolist()
