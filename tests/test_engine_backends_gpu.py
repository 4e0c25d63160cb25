"""On a CUDA GPU: the accelerated backends train through the real worker exactly like the universal path.

For each backend installed on the machine (compiled and Liger need Triton; Unsloth its wheels), a QLoRA run
on a small Llama is killed with SIGKILL after a checkpoint and resumed; it must complete, record its
backend in run.json, train on the same rows as the universal run, and its losses must track the
universal run's. Figures are printed for docs/verification/backends.md.
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
from tui_finetune.core.run_folder.info import read_run_info  # noqa: E402
from tui_finetune.engine.backends import BACKENDS  # noqa: E402
from tui_finetune.engine.model_folder import model_type_of  # noqa: E402
from tui_finetune.core.run_folder.layout import step_of  # noqa: E402
from tui_finetune.core.run_folder.resume import find_resume_checkpoint  # noqa: E402
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


@pytest.fixture(scope="module")
def universal_trace(llama, tmp_path_factory):
    """The uninterrupted universal run every backend is compared with."""
    root = tmp_path_factory.mktemp("universal")
    run = launch(_recipe(llama, "universal"), SAMPLES, root / "home", trace=root / "trace.jsonl")
    assert wait_dead(run, 300) == "completed", (run / "worker.log").read_text()[-3000:]
    return read_trace(root / "trace.jsonl")


@pytest.mark.parametrize("name", ["compiled", "liger", "unsloth"])
def test_backend_trains_checkpoints_resumes_and_tracks_the_universal_path(name, llama, universal_trace, tmp_path):
    why_not = BACKENDS[name].unavailable(model_type_of(llama), _recipe(llama, name), detect_device())
    if why_not:
        pytest.skip(f"{name}: {why_not}")
    home, trace, ref = tmp_path / "home", tmp_path / f"{name}.jsonl", universal_trace
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
