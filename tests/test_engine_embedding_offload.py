"""The input embedding in CPU RAM (``memory.embeddings_on_cpu``, engine/embedding_offload.py), on real tiny models.

On the CPU the "GPU" is the CPU too, so the cross-device move is proven here on the ``meta`` device (the
decoder's weights there, the embedding in RAM) and for real in tests/test_embeddings_gpu.py. What the
CPU proves: nothing of the embedding stays registered in the model, the losses and gradients equal the
lever-off run's, generation works, a tied model keeps its embedding, the fit-check's out-of-memory rule
turns the lever on before it shortens anybody's rows, and a resume keeps it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine_runs import tiny_recipe
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import fault_recipe
from tui_finetune.core.events import EventLog, WarningEvent, read_events
from tui_finetune.core.run_folder.checkpoints import list_checkpoints
from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe
from tui_finetune.core.run_folder.layout import CHECKPOINTS_DIR, EVENTS_FILE
from tui_finetune.engine import backends, embedding_offload
from tui_finetune.engine.embedding_offload import CpuInputEmbedding, move_input_embedding_to_cpu
from tui_finetune.engine.loading import count_parameters, detect_device


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings-on-cpu")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


def _load(model_dir, on_cpu: bool, checkpointing: bool = True):
    recipe = tiny_recipe(model_dir, memory={"embeddings_on_cpu": on_cpu},
                         train={"gradient_checkpointing": checkpointing})
    loaded = backends.load_for_training(model_dir, recipe, detect_device())
    return loaded.model, loaded.backend, recipe


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def test_the_embedding_waits_outside_the_models_parameters_and_state(tiny):
    model_dir, _ = tiny
    plain, _, _ = _load(model_dir, False)
    model, _, _ = _load(model_dir, True)
    wrapper = model.get_input_embeddings()
    assert isinstance(wrapper, CpuInputEmbedding) and embedding_offload.input_embedding_on_cpu(model)
    assert wrapper.weight.device.type == "cpu" and wrapper.weight.shape == plain.get_input_embeddings().weight.shape
    assert list(wrapper.parameters()) == [] and list(wrapper.state_dict()) == []
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())
    assert set(plain.state_dict()) - set(model.state_dict()) == {"base_model.model.model.embed_tokens.weight"}
    decoder_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert model.device == decoder_weight.device == wrapper.output_device
    assert count_parameters(model) == count_parameters(plain)  # the embedding still counts, in RAM
    assert move_input_embedding_to_cpu(model)  # a second call changes nothing
    assert model.get_input_embeddings() is wrapper


def test_the_wrapper_returns_its_output_on_the_device_of_the_decoders_weights():
    """The decoder on ``meta`` (a device other than the CPU that needs no GPU), the embedding in RAM: the
    wrapper finds the decoder's device, looks up on the CPU and hands the vectors over there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.requires_grad_(False)
    rows = model.get_input_embeddings().weight[[3, 5]].clone()
    for part in (model.model.layers, model.model.norm, model.lm_head):
        part.to("meta")
    assert move_input_embedding_to_cpu(model)
    wrapper = model.get_input_embeddings()
    assert wrapper.output_device.type == "meta" and model.device.type == "meta"
    out = wrapper(torch.tensor([[3, 5]]))  # (ids on a real GPU are copied to the CPU; meta ones hold no values)
    assert out.device.type == "meta" and out.shape == (1, 2, 32)
    assert torch.equal(wrapper.cpu_embedding(torch.tensor([[3, 5]]))[0], rows)  # the CPU lookup itself


def test_training_with_the_lever_gives_the_lever_off_losses_and_gradients(tiny):
    """Gradient checkpointing on: transformers' require-grads hook was registered on the original module
    before the swap (loading order), and must still make the checkpointed blocks see an input that needs
    a gradient."""
    model_dir, _ = tiny
    torch.manual_seed(1)
    ids = torch.randint(6, 100, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    runs = {}
    for on_cpu in (False, True):
        model, backend, recipe = _load(model_dir, on_cpu)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        losses, grads = [], []
        for _ in range(3):
            loss = backend.loss(model, dict(batch), recipe.memory)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[on_cpu] = losses, grads
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6, abs=1e-7)
    assert runs[False][0][2] < runs[False][0][0]  # it trained
    for with_lever, without in zip(runs[True][1], runs[False][1]):
        assert torch.allclose(with_lever, without, atol=1e-7) and without.abs().sum() > 0


@pytest.mark.parametrize("hook_first", [True, False])
def test_the_require_grads_hook_works_in_either_order(tiny, hook_first):
    model_dir, _ = tiny
    model, _, _ = _load(model_dir, False, checkpointing=False)
    base = model.get_base_model()
    if hook_first:
        base.enable_input_require_grads()
    move_input_embedding_to_cpu(model)
    if not hook_first:
        base.enable_input_require_grads()
    assert model.get_input_embeddings()(torch.tensor([[7, 8]])).requires_grad


def test_generation_works_with_the_lever_and_gives_the_same_tokens(tiny):
    from transformers import AutoTokenizer

    from tui_finetune.engine.samples import generate_sample

    model_dir, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("What is 3 + 4?")["input_ids"]
    texts = [generate_sample(_load(model_dir, on_cpu)[0], tokenizer, prompt, max_new_tokens=8)
             for on_cpu in (False, True)]
    assert texts[0] == texts[1] and len(texts[1]) > 0


def test_a_tied_model_keeps_its_embedding_where_the_lm_head_needs_it():
    model = _tied_llama()
    model.requires_grad_(False)
    embedding = model.get_input_embeddings()
    assert embedding_offload.input_embedding_is_tied(model)
    assert not move_input_embedding_to_cpu(model)
    assert model.get_input_embeddings() is embedding and model.lm_head.weight is embedding.weight


def test_an_embedding_that_trains_stays_where_its_optimizer_is(tiny):
    model = _tied_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    embedding = model.get_input_embeddings()
    assert not move_input_embedding_to_cpu(model)  # full fine-tuning: every weight still trains
    assert model.get_input_embeddings() is embedding

    model_dir, _ = tiny  # LoRA on the embedding itself: the recipe asks for the lever, the model keeps it
    recipe = tiny_recipe(model_dir, memory={"embeddings_on_cpu": True},
                         lora={"target_modules": ["q_proj", "v_proj", "embed_tokens"]})
    loaded = backends.load_for_training(model_dir, recipe, detect_device())
    assert not embedding_offload.input_embedding_on_cpu(loaded.model)
    assert any("lora_embedding" in name for name, p in loaded.model.named_parameters() if p.requires_grad)


def test_the_planner_saves_nothing_for_an_embedding_that_is_a_lora_target():
    from tui_finetune.core.catalog import get_model
    from tui_finetune.core.planner import LEAN, PlanCase, adapts_input_embedding, embedding_params_on_cpu

    llama = get_model("llama-3.1-8b")
    lever = replace(LEAN, input_embedding_on_cpu=True)
    assert embedding_params_on_cpu(PlanCase(model=llama), lever) == llama.input_embedding_params() > 0
    assert embedding_params_on_cpu(PlanCase(model=llama, lora_targets=("q_proj", "embed_tokens")), lever) == 0
    assert adapts_input_embedding("embed_tokens") and not adapts_input_embedding("all-linear")
    assert adapts_input_embedding(["model.embed_tokens"]) and not adapts_input_embedding(("q_proj", "lm_head"))


# ------------------------------------------------------------ the fit-check's out-of-memory rule, on the worker

def _run_worker(run_dir, oom_calls: int = 0, stop_after_a_checkpoint: bool = False, oom_at_call: int = 0):
    """The real worker in this process. ``oom_calls``: the first that many training micro-steps (the
    fit-check's first) raise a CUDA out-of-memory at micro-batch 1, as engine/faults.py's hook does;
    ``oom_at_call``: that one micro-step alone does. Returns its exit code and what each
    ``move_input_embedding_to_cpu`` call returned."""
    from tui_finetune.engine import training, worker

    calls, moved = {"n": 0}, []
    real_move = embedding_offload.move_input_embedding_to_cpu

    def oom_limit(point, step):
        calls["n"] += point == "train"
        if point == "train" and (calls["n"] <= oom_calls or calls["n"] == oom_at_call):
            return 0
        return None

    def recording_move(model):
        moved.append(real_move(model))
        return moved[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "oom_limit", oom_limit)
        patch.setattr(worker.StopSignal, "install", lambda self: None)  # keep pytest's own signal handlers
        if stop_after_a_checkpoint:
            patch.setattr(worker.StopSignal, "__call__", lambda self: bool(list_checkpoints(run_dir / CHECKPOINTS_DIR)))
        patch.setattr(embedding_offload, "move_input_embedding_to_cpu", recording_move)
        return worker.Worker(run_dir).run(), moved


def test_an_oom_at_micro_batch_one_moves_the_embedding_before_any_row_is_cut_and_a_resume_keeps_it(
        tiny, tmp_path, monkeypatch):
    model_dir, data = tiny
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    recipe = fault_recipe(model_dir, 4, train={"micro_batch": 1, "grad_accum": 2})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")

    code, moved = _run_worker(run_dir, oom_calls=1, stop_after_a_checkpoint=True)
    info, now = read_run_info(run_dir), read_run_recipe(run_dir)
    assert code == 130 and info.state == "interrupted", info.message
    assert moved == [True]
    assert now.memory.embeddings_on_cpu and now.data.seq_len == recipe.data.seq_len  # nothing was cut
    [change] = info.autofit
    assert change.startswith("CUDA out of memory in the fit-check at micro-batch 1: memory.embeddings_on_cpu "
                             "false -> true") and change.endswith("--set memory.embeddings_on_cpu=true")
    warnings = [e for e in read_events(run_dir / EVENTS_FILE)[0] if isinstance(e, WarningEvent)]
    assert any(w.advice == "to keep this value: --set memory.embeddings_on_cpu=true" for w in warnings)

    code, moved = _run_worker(run_dir)  # the resume loads the model with the lever, from recipe.toml
    info = read_run_info(run_dir)
    assert code == 0 and info.state == "completed" and info.resumed_from, info.message
    assert moved == [True] and read_run_recipe(run_dir).memory.embeddings_on_cpu
    assert not any("resuming with changes" in e.message for e in read_events(run_dir / EVENTS_FILE)[0]
                   if isinstance(e, WarningEvent))


def test_with_the_lever_already_on_the_oom_rule_goes_on_to_the_sequence(tiny, tmp_path, monkeypatch):
    """Truncation stays the last lever: here it is all that is left (and these rows are already under the
    floor, so the run is refused on the measurement, with nothing moved twice)."""
    model_dir, data = tiny
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    recipe = fault_recipe(model_dir, 2, memory={"embeddings_on_cpu": True}, train={"micro_batch": 1, "grad_accum": 2})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    code, moved = _run_worker(run_dir, oom_calls=1)
    info = read_run_info(run_dir)
    assert code == 1 and info.state == "failed" and moved == [True]  # moved while loading, as the recipe asks
    assert info.message.startswith("CUDA out of memory in the fit-check at micro-batch 1 x ")
    assert "256-token floor" in info.message and info.autofit == [] and read_run_recipe(run_dir) == recipe


def test_the_oom_rule_leaves_a_tied_model_and_other_backends_alone(tmp_path):
    from tui_finetune.engine.recipe_refit import SequenceTooLong, move_embeddings_after_oom

    recipe = tiny_recipe(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    oom = SequenceTooLong(100, "CUDA out of memory")
    untied = _tied_llama()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    untied.requires_grad_(False)
    with EventLog(run_dir / EVENTS_FILE) as log:
        assert move_embeddings_after_oom(run_dir, recipe, _tied_llama().requires_grad_(False),
                                         backends.BACKENDS["universal"], log, oom) is None
        assert move_embeddings_after_oom(run_dir, recipe, untied, backends.BACKENDS["unsloth"], log, oom) is None
        assert not embedding_offload.input_embedding_on_cpu(untied)
        assert move_embeddings_after_oom(run_dir, recipe, untied, backends.BACKENDS["universal"], log, oom)
    assert embedding_offload.input_embedding_on_cpu(untied) and read_run_recipe(run_dir).memory.embeddings_on_cpu


def test_an_oom_in_a_later_step_starts_over_from_the_initial_adapter(tiny, tmp_path, monkeypatch):
    """An out-of-memory in step 3 (no checkpoint yet) moves the embedding and starts again: from the adapter
    the run began with and the recipe's seed, so the run trains exactly as one with the lever from the start,
    not on from the two steps it had trained before the OOM."""
    from tui_finetune.core.events import StepEvent

    model_dir, data = tiny
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    no_checkpoint = {"every_steps": 100}
    recipe = fault_recipe(model_dir, 4, train={"micro_batch": 1, "grad_accum": 2}, checkpoint=no_checkpoint)
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    code, moved = _run_worker(run_dir, oom_at_call=6)  # the fit-check's step, steps 1 and 2, then step 3's first
    assert code == 0 and read_run_info(run_dir).state == "completed" and moved == [True]
    steps = [e for e in read_events(run_dir / EVENTS_FILE)[0] if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 1, 2, 3, 4]

    lever = fault_recipe(model_dir, 4, train={"micro_batch": 1, "grad_accum": 2}, checkpoint=no_checkpoint,
                         memory={"embeddings_on_cpu": True})
    clean_dir = create_run(lever, data, base=tmp_path / "runs")
    assert _run_worker(clean_dir)[0] == 0
    clean = [e for e in read_events(clean_dir / EVENTS_FILE)[0] if isinstance(e, StepEvent)]
    assert [e.loss for e in steps[2:]] == pytest.approx([e.loss for e in clean], rel=1e-6)
