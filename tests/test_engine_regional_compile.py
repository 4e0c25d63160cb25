"""The compiled backend (engine/regional_compile.py, ``memory.backend = "compiled"``), on the CPU.

Dynamo traces the decoder layers here exactly as on a GPU; only the last stage differs (``aot_eager`` runs the
traced graphs instead of Inductor's Triton kernels), so these tests show what compiling does to the training:
the same losses and gradients with checkpointing and kept layers, no graph break, evaluation and generation
left eager, and a compiler that fails on the probe, or layers that compile nothing, end in the usual backend
fallback. Inductor's kernels on a card run in tests/test_engine_backends_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from engine_tiny import build_tiny_llama
from test_engine_kept_layers import config_dict, lora_model
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.engine import backends, kernel_support, regional_compile
from tui_finetune.engine.backends import BACKENDS, CompiledBackend, load_for_training
from tui_finetune.engine.loading import DeviceFacts
from tui_finetune.engine.memory_techniques import keep_activations

CPU = DeviceFacts(has_cuda=False, supports_bf16=False, name="CPU")


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test compiles from nothing, and the eager fallback a passing probe turns on is undone after it."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # older torch has no such setting
        monkeypatch.setattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint", False)
    yield
    torch._dynamo.reset()


def _train(model, steps=3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A few SGD steps on batches of different lengths (the dynamic-shape path), from a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 64), generator=generator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(steps):
        batch = ids[:, :64 - 8 * step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("kept", [0, 1])
def test_compiled_layers_train_exactly_like_eager_ones_with_checkpointing(kept):
    eager = lora_model(config_dict("llama"), kept, "fp32", dtype=torch.float32)
    compiled = lora_model(config_dict("llama"), kept, "fp32", dtype=torch.float32)
    keep_activations(eager, kept), keep_activations(compiled, kept)
    assert regional_compile.compile_decoder_layers(compiled, "aot_eager") == 3
    assert regional_compile.is_compiled(compiled) and not regional_compile.is_compiled(eager)
    eager_losses, eager_weights = _train(eager)
    compiled_losses, compiled_weights = _train(compiled)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[-1] < eager_losses[0]
    assert all(torch.allclose(compiled_weights[k], eager_weights[k], atol=1e-6) for k in eager_weights)


def test_evaluation_and_generation_run_the_compiled_layers_eager():
    model = lora_model(config_dict("llama"), 0, "fp32", dtype=torch.float32).eval()
    regional_compile.compile_decoder_layers(model, "aot_eager")
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad(), regional_compile.eager():
        first = model(input_ids=ids).logits
        again = model(input_ids=ids[:, :20]).logits
    assert counters["stats"]["calls_captured"] == 0, "a compile ran inside the eager block"
    with torch.no_grad():
        compiled = model(input_ids=ids).logits
    assert counters["stats"]["calls_captured"] > 0
    assert torch.allclose(compiled, first, atol=1e-5) and torch.allclose(again, first[:, :20], atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("compiled") / "model")


def _recipe(model, backend) -> RecipeSpec:
    recipe = RecipeSpec(model=str(model), method="lora")
    recipe.memory.backend = backend
    return recipe


def test_on_a_machine_without_triton_compiled_falls_back_to_the_universal_path_and_says_why(tiny):
    loaded = load_for_training(tiny, _recipe(tiny, "compiled"), CPU)
    assert (loaded.choice.requested, loaded.choice.name) == ("compiled", "universal")
    assert loaded.choice.skipped == ["compiled: needs an NVIDIA GPU"]
    assert not regional_compile.is_compiled(loaded.model)


def test_the_compiled_backend_loads_probes_and_trains_like_the_universal_path(tiny, monkeypatch):
    monkeypatch.setattr(kernel_support, "why_no_triton", lambda has_cuda: None)
    monkeypatch.setattr(CompiledBackend, "compiler", "aot_eager")
    loaded = load_for_training(tiny, _recipe(tiny, "compiled"), CPU)
    assert loaded.choice.name == "compiled" and "compiled" in loaded.choice.reason
    assert regional_compile.is_compiled(loaded.model)
    assert counters["stats"]["calls_captured"] > 0, "the probe step did not run the compiled layers"
    assert torch._dynamo.config.suppress_errors, "a later compile failure would end the run"
    again = load_for_training(tiny, _recipe(tiny, "compiled"), CPU)  # dynamo's graphs guard on code, not layer:
    assert again.choice.name == "compiled", "a second load in one process must not look like nothing compiled"
    universal = load_for_training(tiny, _recipe(tiny, "universal"), CPU)
    ids = torch.arange(3, 40).unsqueeze(0)
    losses = [float(x.backend.loss(x.model, {"input_ids": ids, "labels": ids}, _recipe(tiny, "universal").memory).detach())
              for x in (loaded, universal)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_compiler_that_fails_on_the_probe_drops_the_backend(tiny, monkeypatch):
    def broken_compiler(graph, example_inputs):
        raise RuntimeError("triton: no kernel image for sm_61")

    monkeypatch.setattr(kernel_support, "why_no_triton", lambda has_cuda: None)
    monkeypatch.setattr(CompiledBackend, "compiler", staticmethod(broken_compiler))
    with pytest.raises(backends.BackendFailed) as failed:
        load_for_training(tiny, _recipe(tiny, "compiled"), CPU)
    assert failed.value.name == "compiled" and "no kernel image for sm_61" in failed.value.reason
    assert not torch._dynamo.config.suppress_errors
    assert "compiled" in BACKENDS and backends.candidates("compiled") == ["compiled", "universal"]


_ACTIVE: list[int] = []
"""What transformers 5.25's attention does through the kernels package (``use_kernelized_func``): module-level
state set before the attention runs and put back after it, inside the checkpointed forward. A stack here: dynamo
treats its push and pop as a side effect under checkpointing as it does the kernels package's variable."""


def _attention_that_sets_and_resets_a_global(original):
    def forward(self, *args, **kwargs):
        _ACTIVE.append(1)
        try:
            return original(self, *args, **kwargs)
        finally:
            _ACTIVE.pop()
    return forward


def _load_compiled_with_that_attention(tiny, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaAttention

    monkeypatch.setattr(kernel_support, "why_no_triton", lambda has_cuda: None)
    monkeypatch.setattr(CompiledBackend, "compiler", "aot_eager")
    monkeypatch.setattr(LlamaAttention, "forward", _attention_that_sets_and_resets_a_global(LlamaAttention.forward))
    recipe = _recipe(tiny, "compiled")
    recipe.memory.layers_keeping_activations = 0  # every layer checkpointed: the side effect is under the HOP
    return load_for_training(tiny, recipe, CPU)


def test_a_side_effect_under_checkpointing_like_transformers_5_25s_still_compiles(tiny, monkeypatch):
    loaded = _load_compiled_with_that_attention(tiny, monkeypatch)
    assert loaded.choice.name == "compiled"
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert _ACTIVE == []


def test_layers_dynamo_cannot_capture_drop_the_backend_with_the_graph_break_as_the_reason(tiny, monkeypatch):
    """Without the flag that lets dynamo keep that side effect (older torch lacks it), the layer breaks the
    graph and would run eager under a backend named compiled: slower than universal, a compile's start-up for
    nothing, and run.json wrong. The probe says so, and the universal path takes over."""
    monkeypatch.setattr(regional_compile, "allow_side_effects_under_checkpointing", lambda: None)
    with pytest.raises(backends.BackendFailed) as failed:
        _load_compiled_with_that_attention(tiny, monkeypatch)
    assert failed.value.name == "compiled"
    assert failed.value.reason.startswith("its decoder layers did not compile, so they would run eager: ")
    assert "side effect" in failed.value.reason.lower()
    assert not torch._dynamo.config.suppress_errors, "a dropped backend must not leave the eager fallback on"


def test_layers_dynamo_skips_altogether_drop_the_backend_too(tiny, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    monkeypatch.setattr(kernel_support, "why_no_triton", lambda has_cuda: None)
    monkeypatch.setattr(CompiledBackend, "compiler", "aot_eager")
    monkeypatch.setattr(LlamaDecoderLayer, "forward", torch._dynamo.disable(LlamaDecoderLayer.forward))
    with pytest.raises(backends.BackendFailed, match="would run eager: dynamo captured no graph"):
        load_for_training(tiny, _recipe(tiny, "compiled"), CPU)


def test_an_oom_in_the_compiled_probe_drops_the_backend_rather_than_refusing_the_run(tiny, monkeypatch):
    """The weights loaded; only the probe ran out. The universal path has no probe, and its fit-check's OOM
    can still move the embedding or shorten rows, so this is the backend's failure, not the card's refusal."""
    def out_of_memory(graph, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(kernel_support, "why_no_triton", lambda has_cuda: None)
    monkeypatch.setattr(CompiledBackend, "compiler", staticmethod(out_of_memory))
    with pytest.raises(backends.BackendFailed) as failed:
        load_for_training(tiny, _recipe(tiny, "compiled"), CPU)
    assert failed.value.name == "compiled"
    assert failed.value.reason.startswith("CUDA out of memory in its probe step: CUDA out of memory. Tried")


@pytest.mark.parametrize("dynamic, graphs_so_far", [(None, [1, 2, 2, 3]), (True, [1, 1, 1, 2])])
def test_dynamic_shapes_decide_how_many_graphs_a_run_compiles(monkeypatch, dynamic, graphs_so_far):
    """The probe's 16 tokens, two training rows of other lengths, then a length group of 2 rows. With the
    default (``None``) the probe's graph is static and training compiles again; with ``True`` the probe
    compiles the graph single rows train on, and only a group of several rows adds one (batch size 1 is
    always its own graph). regional_compile.DYNAMIC_SHAPES says why the default stays ``None``."""
    monkeypatch.setattr(regional_compile, "DYNAMIC_SHAPES", dynamic)
    model = lora_model(config_dict("llama"), 0, "fp32", dtype=torch.float32)
    regional_compile.compile_decoder_layers(model, "aot_eager")
    compiled = []
    for rows, length in ((1, 16), (1, 40), (1, 23), (2, 31)):
        ids = torch.randint(0, 256, (rows, length))
        model(input_ids=ids, labels=ids).loss.backward()
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled == graphs_so_far
