"""On a CUDA GPU: the accelerated backends train through the real worker exactly like the universal path.

For each backend installed on the machine (Liger; Unsloth where its wheels are present), a QLoRA run
on a small Llama is killed with SIGKILL after a checkpoint and resumed; it must complete, record its
backend in run.json, train on the same rows as the universal run, and its losses must track the
universal run's. Liger's fused cross-entropy must equal the lean chunked loss. Figures are printed for
docs/verification/backends.md.
"""

from __future__ import annotations

import os
import signal

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from engine_runs import REPO, tiny_recipe, wait_for  # noqa: E402
from engine_tiny import build_tokenizer  # noqa: E402
from faults_support import launch, read_trace, relaunch, wait_dead  # noqa: E402
from tui_finetune.core.events import CheckpointEvent  # noqa: E402
from tui_finetune.core.recipe import MemorySpec  # noqa: E402
from tui_finetune.core.runs import read_run_info  # noqa: E402
from tui_finetune.engine.backends import BACKENDS, model_type_of  # noqa: E402
from tui_finetune.engine.checkpoints import find_resume_checkpoint, step_of  # noqa: E402
from tui_finetune.engine.loading import detect_device  # noqa: E402

SAMPLES = REPO / "tests" / "data" / "samples" / "instructions.alpaca.jsonl"
STEPS, KILL_AFTER = 8, 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 4-layer Llama with head_dim 64 (what the kernels are tuned for), random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _recipe(model, backend):
    recipe = tiny_recipe(model, method="qlora", lora={"r": 16, "alpha": 32}, data={"seq_len": 256, "eval_split": 0.05},
                         train={"max_steps": STEPS, "micro_batch": 4, "grad_accum": 2, "learning_rate": 2e-4,
                                "optimizer": "paged_adamw_8bit", "precision": "auto", "gradient_checkpointing": True,
                                "logging_steps": 1},
                         checkpoint={"every_steps": KILL_AFTER, "every_minutes": 0.0, "keep_last": 2},
                         quant={"compute_dtype": "auto"})
    recipe.memory.backend = backend
    return recipe


def test_liger_fused_loss_equals_the_lean_chunked_loss():
    if BACKENDS["liger"].unavailable("llama", tiny_recipe("x"), detect_device()):
        pytest.skip("Liger is not usable here")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tui_finetune.engine.lean import lean_causal_lm_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=3000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 3000, (2, 300), device="cuda")
    labels = ids.clone()
    labels[0, :50] = -100
    results = []
    for loss_of in (lambda b: lean_causal_lm_loss(model, b, MemorySpec()),
                    lambda b: BACKENDS["liger"].loss(model, b, MemorySpec(), 400)):
        model.zero_grad()
        loss = loss_of({"input_ids": ids, "labels": labels})
        loss.backward()
        results.append((loss.detach(), model.model.norm.weight.grad.clone()))
    (lean, lean_grad), (liger, liger_grad) = results
    lean = lean * (labels[:, 1:] != -100).sum() / 400  # the same sum over another denominator
    print(f"\nlean {float(lean):.6f} liger {float(liger):.6f}")
    assert torch.allclose(lean, liger, rtol=1e-4)
    assert torch.allclose(lean_grad * (labels[:, 1:] != -100).sum() / 400, liger_grad, rtol=1e-3, atol=1e-6)


def test_each_backend_trains_checkpoints_resumes_and_tracks_the_universal_path(llama, tmp_path):
    home = tmp_path / "home"
    reference = launch(_recipe(llama, "universal"), SAMPLES, home, trace=tmp_path / "universal.jsonl")
    assert wait_dead(reference, 300) == "completed", (reference / "worker.log").read_text()[-3000:]
    ref = read_trace(tmp_path / "universal.jsonl")
    ran = []
    for name in ("liger", "unsloth"):
        why_not = BACKENDS[name].unavailable(model_type_of(llama), _recipe(llama, name), detect_device())
        if why_not:
            print(f"\n{name}: skipped ({why_not})")
            continue
        trace = tmp_path / f"{name}.jsonl"
        run = launch(_recipe(llama, name), SAMPLES, home, trace=trace)
        wait_for(run, lambda e: isinstance(e, CheckpointEvent) and e.step >= KILL_AFTER, timeout=300)
        os.kill(read_run_info(run).pid, signal.SIGKILL)
        wait_dead(run)
        resumed_from = step_of(find_resume_checkpoint(run / "checkpoints").path)
        relaunch(run, home, trace=trace)
        assert wait_dead(run, 300) == "completed", (run / "worker.log").read_text()[-3000:]
        info = read_run_info(run)
        assert info.backend == name, (info.backend, info.backend_reason, info.backend_skipped)
        got = read_trace(trace)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert all(got[s]["ids"] == ref[s]["ids"] for s in ref), "another backend trained on other rows"
        loss = {s: (float.fromhex(ref[s]["loss"]), float.fromhex(got[s]["loss"])) for s in ref}
        print(f"\n{name} ({info.backend_reason}); killed after step {resumed_from}, resumed")
        for s in sorted(loss):
            print(f"  step {s}: universal {loss[s][0]:.5f}  {name} {loss[s][1]:.5f}")
        assert abs(loss[1][1] - loss[1][0]) / loss[1][0] < 0.01
        assert max(abs(b - a) / a for a, b in loss.values()) < 0.05
        ran.append(name)
    assert "liger" in ran or BACKENDS["liger"].unavailable("llama", _recipe(llama, "liger"), detect_device())
