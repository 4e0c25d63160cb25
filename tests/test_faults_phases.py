"""Nothing after training may cost the adapter, and no phase builds full-vocabulary logits (issue 11).

On a 4 GB card the final evaluation asked for 1000 MiB of fp32 logits after two good training steps,
and the run failed with no adapter; every resume failed the same way. Here each late phase is made to
run out of memory by the test hook (engine/faults.py), on the real worker: the run must complete with
the adapter saved, say what it skipped, and a resume must not repeat what failed. An OOM in training
on an accelerated backend must drop that backend before any shrinking.
"""

from __future__ import annotations

import pytest
import torch

from engine_runs import events_of, tiny_recipe
from engine_tiny import build_tiny_llama, write_alpaca
from faults_support import fault_recipe, launch, wait_dead
from tui_finetune.core.events import EventLog, PhaseEvent, SampleEvent, WarningEvent
from tui_finetune.core.recipe import MemorySpec
from tui_finetune.core.run_folder.info import create_run, read_run_info, update_run_info
from tui_finetune.core.run_folder.layout import EVENTS_FILE
from tui_finetune.core.run_folder.checkpoints import list_checkpoints

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-phases")
    return build_tiny_llama(root / "model"), write_alpaca(root / "data.jsonl", rows=20)


def test_eval_computes_the_chunked_loss_and_never_the_full_logits(tmp_path):
    """A tiny model with a large vocabulary: evaluation's loss equals the model's own, and the lm_head
    never runs as a module (the full-logits path); the chunked loss multiplies by its weight instead."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from tui_finetune.data.collate import PaddingCollator
    from tui_finetune.engine.training import build_trainer

    torch.manual_seed(0)
    vocab = 50_000
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, use_cache=False)), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = [[(7 * i + 13 * j) % vocab for j in range(40 + 9 * i)] for i in range(6)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=3, use_cpu=True,
                             report_to="none", remove_unused_columns=False, label_names=["labels"],
                             prediction_loss_only=True, disable_tqdm=True)
    trainer = build_trainer(model, None, args, None, data, PaddingCollator(0), [], MemorySpec(loss_chunk_tokens=16))
    full_logits = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: full_logits.append(tuple(out.shape)))

    metrics = trainer.evaluate()
    hook.remove()

    assert full_logits == [], f"evaluation built full logits {full_logits}"
    expected = []
    with torch.no_grad():
        for start in (0, 3):
            batch = PaddingCollator(0)([{"input_ids": i, "labels": i} for i in ids[start:start + 3]])
            expected.append(float(model(**batch).loss))
    assert metrics["eval_loss"] == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_an_oom_in_eval_in_the_samples_and_in_the_save_each_ends_completed_with_the_adapter(tiny, tmp_path):
    model, data = tiny
    home = tmp_path / "home"
    recipe = fault_recipe(model, 6, train={"micro_batch": 2, "grad_accum": 1}, checkpoint={"every_steps": 3})
    run_dir = launch(recipe, data, home, fault="oom:eval:0,oom:sample,oom:save")
    assert wait_dead(run_dir) == "completed", (run_dir / "worker.log").read_text()[-3000:]

    info = read_run_info(run_dir)
    assert sorted(info.failed_phases) == ["eval", "sample-after", "sample-before"]
    assert all("CUDA out of memory" in why for why in info.failed_phases.values())
    warnings = [w.message for w in events_of(run_dir, WarningEvent)]
    assert "CUDA out of memory in evaluation: eval batch 2 -> 1 (training batch unchanged)" in warnings
    assert any(w.startswith("evaluation is off for the rest of this run") for w in warnings)
    assert sum(w.startswith("skipped a generation") for w in warnings) == 2
    assert any("while saving the adapter" in w and "step-000006" in w for w in warnings)
    assert events_of(run_dir, SampleEvent) == []
    final = list_checkpoints(run_dir / "checkpoints")[-1]
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the final checkpoint's copy
        assert (run_dir / "adapter" / name).read_bytes() == (final / name).read_bytes()
    assert (run_dir / "adapter" / "tokenizer_config.json").is_file()
    assert not (run_dir / "adapter.partial").exists()
    assert info.phase_running == ""


def test_a_phase_that_failed_or_was_under_way_when_the_worker_died_is_skipped_on_resume(tmp_path):
    from tui_finetune.core.run_folder.info import mark_interrupted_phase_failed
    from tui_finetune.engine.post_training import run_optional_phase

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    run_dir = create_run(tiny_recipe(tmp_path / "model"), data, base=tmp_path / "runs")
    update_run_info(run_dir, phase_running="eval", failed_phases={"sample-before": "CUDA out of memory: x"})
    mark_interrupted_phase_failed(run_dir)  # what a starting worker does first
    info = read_run_info(run_dir)
    assert info.phase_running == "" and info.failed_phases["eval"].startswith("the worker stopped during it")

    calls = []
    with EventLog(run_dir / EVENTS_FILE) as log:
        run_optional_phase(run_dir, log, "sample-before", "a generation before training", lambda: calls.append(1))
        run_optional_phase(run_dir, log, "eval", "the final evaluation", lambda: calls.append(2))
        run_optional_phase(run_dir, log, "sample-after", "a generation after training", lambda: calls.append(3))
    assert calls == [3]
    assert [w.message.split(":")[0] for w in events_of(run_dir, WarningEvent)] == [
        "skipped a generation before training", "skipped the final evaluation"]
    assert [e.phase for e in events_of(run_dir, PhaseEvent)] == ["sample"]


def test_an_oom_in_training_on_an_accelerated_backend_restarts_on_the_universal_path(tiny, tmp_path, monkeypatch):
    """Before any shrinking: auto must not keep a backend the fit-check can't prove on this card."""
    from tui_finetune.engine import backends, worker
    from tui_finetune.engine.backends import BACKENDS, UniversalBackend
    from tui_finetune.engine.loading import detect_device

    class UsableLiger(UniversalBackend):  # the universal path's code, reporting itself as an available Liger
        name, allocates_like_universal = "liger", False

        def unavailable(self, model_type, recipe, device):
            return None

    model, data = tiny
    monkeypatch.setitem(BACKENDS, "liger", UsableLiger())
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUI_FINETUNE_FAULT", "oom:train:0@1")
    monkeypatch.setattr(worker.StopSignal, "install", lambda self: None)  # keep pytest's own signal handlers
    execs = []

    def execv(path, argv):
        execs.append(argv)
        raise SystemExit(0)  # the process would be replaced here

    monkeypatch.setattr(worker.os, "execv", execv)
    recipe = fault_recipe(model, 4, memory={"backend": "liger"}, train={"micro_batch": 2, "grad_accum": 1})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    with pytest.raises(SystemExit):
        worker.Worker(run_dir).run()
    info = read_run_info(run_dir)
    assert execs and info.backend == "liger" and info.oom_shrinks == []  # dropped before any shrink
    assert list(info.backend_failures) == ["liger"]
    assert info.backend_failures["liger"].startswith("CUDA out of memory in the fit-check")

    monkeypatch.delenv("TUI_FINETUNE_FAULT")  # the restarted worker, on a card where universal fits
    assert worker.Worker(run_dir).run() == 0
    info = read_run_info(run_dir)
    assert (info.state, info.backend) == ("completed", "universal")
    assert any(s.startswith("liger: failed in an earlier attempt (CUDA out of memory") for s in info.backend_skipped)
    assert backends.expected_backend(model, recipe, detect_device(), info.backend_failures) == "universal"


def test_an_oom_on_the_compiled_backend_shrinks_the_batch_and_drops_it_only_at_micro_batch_1(
        tiny, tmp_path, monkeypatch):
    """The compiled backend allocates like the universal path, so an OOM is answered as there: the batch
    shrinks and the run keeps its speed. At micro-batch 1 the input embedding goes to CPU RAM first (it
    cuts no row); only then is the backend dropped, before the sequence would be cut."""
    from tui_finetune.engine import worker
    from tui_finetune.engine.backends import BACKENDS, CompiledBackend, UniversalBackend

    class UsableCompiled(UniversalBackend):  # the universal path's code, as an available compiled backend
        name, allocates_like_universal = "compiled", CompiledBackend.allocates_like_universal
        loading_note = CompiledBackend.loading_note

        def unavailable(self, model_type, recipe, device):
            return None

    model, data = tiny
    monkeypatch.setitem(BACKENDS, "compiled", UsableCompiled())
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(worker.StopSignal, "install", lambda self: None)
    execs = []

    def execv(path, argv):
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(worker.os, "execv", execv)
    recipe = fault_recipe(model, 4, memory={"backend": "compiled"}, train={"micro_batch": 2, "grad_accum": 1})
    monkeypatch.setenv("TUI_FINETUNE_FAULT", "oom:train:1@2")  # micro-batch 2 runs out of memory from step 2
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    assert worker.Worker(run_dir).run() == 0
    info = read_run_info(run_dir)
    assert (info.state, info.backend, execs) == ("completed", "compiled", [])  # kept, not restarted
    assert [shrink["micro_batch"] for shrink in info.oom_shrinks] == [[2, 1]]
    load = [e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "load"]
    assert load and load[0].endswith("then compiling its decoder layers with torch.compile (up to a minute on a "
                                     "first start, cached for later runs)"), load  # a compile is not a hang

    def dropped_at_micro_batch_1(fault: str, **checkpoint):
        """Run until the worker re-executes itself without compiled; its run.json."""
        execs.clear()
        monkeypatch.setenv("TUI_FINETUNE_FAULT", fault)
        recipe = fault_recipe(model, 4, memory={"backend": "compiled"}, train={"micro_batch": 1, "grad_accum": 2},
                              checkpoint=checkpoint)
        run_dir = create_run(recipe, data, base=tmp_path / "runs")
        with pytest.raises(SystemExit):
            worker.Worker(run_dir).run()
        info = read_run_info(run_dir)
        assert execs and info.oom_shrinks == [] and list(info.backend_failures) == ["compiled"]
        return run_dir, info

    _, info = dropped_at_micro_batch_1("oom:train:0@1")  # not even micro-batch 1 fits
    assert info.backend_failures["compiled"].startswith("CUDA out of memory in the fit-check at micro-batch 1")
    assert any("embeddings_on_cpu" in change for change in info.autofit)  # the lever tried before the drop
    assert not any("seq_len" in change for change in info.autofit)  # no row was cut

    # after a checkpoint the length is fixed, so the backend goes, not the run
    run_dir, info = dropped_at_micro_batch_1("oom:train:0@3", every_steps=2)
    assert info.backend_failures["compiled"].startswith("CUDA out of memory in training")
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-000002"]


def _unprobed_liger(loss):
    from tui_finetune.engine.backends import UniversalBackend

    class UnprobedLiger(UniversalBackend):  # an available accelerated backend with no probe step
        name, probes = "liger", False

        def unavailable(self, model_type, recipe, device):
            return None

        def loss(self, model, inputs, memory, num_items_in_batch=None):
            return loss(super().loss(model, inputs, memory, num_items_in_batch))

    return UnprobedLiger()


def _raise_unsupported(value):
    raise ValueError("unsupported head dimension 80\nmore detail")


def _run_on_unprobed_liger(tiny, tmp_path, monkeypatch, loss):
    from tui_finetune.engine import worker
    from tui_finetune.engine.backends import BACKENDS

    model, data = tiny
    monkeypatch.setitem(BACKENDS, "liger", _unprobed_liger(loss))
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(worker.StopSignal, "install", lambda self: None)
    execs = []

    def execv(path, argv):
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(worker.os, "execv", execv)
    run_dir = create_run(fault_recipe(model, 4, memory={"backend": "liger"}), data, base=tmp_path / "runs")
    return run_dir, worker.Worker(run_dir), execs


@pytest.mark.parametrize("loss, reason", [
    (_raise_unsupported, "ValueError in the fit-check: unsupported head dimension 80"),
    (lambda value: value * float("nan"), "RuntimeError in the fit-check: the fit-check's loss is nan"),
])
def test_an_unprobed_backend_that_fails_in_the_fit_check_is_dropped_like_a_failed_probe(tiny, tmp_path, monkeypatch,
                                                                                           loss, reason):
    """Unsloth skips the 16-token probe (backends.Backend.probes): the fit-check is its probe, so any failure
    of its step there, a non-finite loss included, restarts the worker without it."""
    run_dir, work, execs = _run_on_unprobed_liger(tiny, tmp_path, monkeypatch, loss)
    with pytest.raises(SystemExit):
        work.run()
    info = read_run_info(run_dir)
    assert execs and info.backend == "liger" and info.oom_shrinks == []
    assert info.backend_failures == {"liger": reason}  # loading passed (no probe ran); the fit-check named it


def test_a_failure_before_the_fit_checks_step_is_not_blamed_on_the_unprobed_backend(tiny, tmp_path, monkeypatch):
    """What Trainer.train does before the check's step (a checkpoint, the data) is not the backend's fault."""
    from tui_finetune.engine import fit_check

    def broken_batch(*args, **kwargs):
        raise ValueError("a broken row")

    monkeypatch.setattr(fit_check, "longest_batch", broken_batch)
    run_dir, work, execs = _run_on_unprobed_liger(tiny, tmp_path, monkeypatch, lambda value: value)
    assert work.run() != 0
    info = read_run_info(run_dir)
    assert not execs and info.backend_failures == {} and info.state == "failed"


def test_an_oom_with_kept_layers_first_turns_them_back_to_recomputing_and_keeps_the_micro_batch(tiny, tmp_path,
                                                                                                monkeypatch):
    """Kept layers are what auto-fit spent a card's room on: an out-of-memory takes that back before the
    micro-batch shrinks, and training goes on from the same initial adapter with every layer recomputing."""
    from tui_finetune.core.run_folder.info import read_run_recipe
    from tui_finetune.engine import worker

    model, data = tiny
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUI_FINETUNE_FAULT", "oom:kept:0@2")  # from step 2 on, while any layer keeps its own
    monkeypatch.setattr(worker.StopSignal, "install", lambda self: None)
    recipe = fault_recipe(model, 4, train={"gradient_checkpointing": True},
                          memory={"layers_keeping_activations": 1})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    assert worker.Worker(run_dir).run() == 0
    info = read_run_info(run_dir)
    assert info.state == "completed" and info.oom_shrinks == []  # the micro-batch stayed
    assert info.autofit == ["CUDA out of memory in training: memory.layers_keeping_activations 1 -> 0 (every layer "
                            "recomputes its activations again; the micro-batch stays): "
                            "--set memory.layers_keeping_activations=0"]
    fitted = read_run_recipe(run_dir)
    assert fitted.memory.layers_keeping_activations == 0 and fitted.train.micro_batch == recipe.train.micro_batch
    phases = [e.message for e in events_of(run_dir, PhaseEvent) if e.phase == "train"]
    assert any(m.startswith("continuing with every layer recomputing from ") for m in phases)


def test_on_an_accelerated_backend_an_oom_takes_the_kept_layers_back_before_the_backend(tiny, tmp_path, monkeypatch):
    """The room spent on kept layers is undone first: the run stays on its backend (no restart) and completes."""
    from tui_finetune.engine import worker
    from tui_finetune.engine.backends import BACKENDS

    model, data = tiny
    monkeypatch.setitem(BACKENDS, "liger", _unprobed_liger(lambda value: value))
    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUI_FINETUNE_FAULT", "oom:kept:0@2")
    monkeypatch.setattr(worker.StopSignal, "install", lambda self: None)
    execs = []
    monkeypatch.setattr(worker.os, "execv", lambda path, argv: execs.append(argv))
    recipe = fault_recipe(model, 4, train={"gradient_checkpointing": True},
                          memory={"backend": "liger", "layers_keeping_activations": 2})
    run_dir = create_run(recipe, data, base=tmp_path / "runs")
    assert worker.Worker(run_dir).run() == 0
    info = read_run_info(run_dir)
    assert execs == [] and (info.state, info.backend) == ("completed", "liger") and info.backend_failures == {}
    assert info.oom_shrinks == [] and "memory.layers_keeping_activations 2 -> 0" in info.autofit[-1]
