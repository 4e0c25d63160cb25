"""Backend choice and fallback (engine/backends.py), on the CPU with a tiny local Llama.

On a CPU the accelerated backends are never available, so these tests show the other half of the
contract: each is passed over with a reason, a backend that raises while loading or on its probe
step ends the process with its reason and the worker restarts without it, an out-of-memory is not
mistaken for a backend failure, and whatever is chosen trains. The accelerated backends themselves run in
tests/test_engine_backends_gpu.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine_tiny import build_tiny_llama
from tui_finetune.core.recipe import RecipeSpec
from tui_finetune.engine import backends, kernel_support, model_folder, unsloth_import
from tui_finetune.engine.backends import BACKENDS, UniversalBackend, candidates, load_for_training
from tui_finetune.engine.loading import DeviceFacts

CPU = DeviceFacts(has_cuda=False, supports_bf16=False, name="CPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("backends") / "model")


def _recipe(model, backend="auto") -> RecipeSpec:
    recipe = RecipeSpec(model=str(model), method="lora")
    recipe.memory.backend = backend
    return recipe


def _train_one_step(loaded, recipe) -> float:
    ids = torch.arange(3, 40).unsqueeze(0)
    loss = loaded.backend.loss(loaded.model, {"input_ids": ids, "labels": ids}, recipe.memory)
    loss.backward()
    grads = [p.grad for p in loaded.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return float(loss.detach())


def test_candidates_try_the_request_then_the_universal_path():
    assert candidates("auto") == ["unsloth", "compiled", "universal"]
    assert candidates("liger") == ["liger", "universal"]
    assert candidates("universal") == ["universal"]


def test_auto_on_a_cpu_passes_over_unsloth_with_its_reason(tiny):
    recipe = _recipe(tiny)
    loaded = load_for_training(tiny, recipe, CPU)
    assert loaded.choice.name == loaded.backend.name == "universal"
    assert [s.split(":")[0] for s in loaded.choice.skipped] == ["unsloth", "compiled"]
    for line in loaded.choice.skipped:  # not installed here, or installed but no GPU: either way, said
        assert any(why in line for why in ("not installed", "needs an NVIDIA GPU")), line
    assert loaded.choice.reason.startswith("pure PyTorch")
    assert _train_one_step(loaded, recipe) > 0


def test_a_requested_backend_that_is_missing_falls_back_and_says_so(tiny):
    loaded = load_for_training(tiny, _recipe(tiny, "liger"), CPU)
    assert (loaded.choice.requested, loaded.choice.name) == ("liger", "universal")
    assert loaded.choice.skipped[0].startswith("liger: ") and "liger" in loaded.choice.reason


def test_universal_on_request_has_nothing_to_skip(tiny):
    loaded = load_for_training(tiny, _recipe(tiny, "universal"), CPU)
    assert loaded.choice.skipped == [] and loaded.choice.reason.endswith("as the recipe asks")


class _Usable(UniversalBackend):
    """A real loader that reports itself available on this machine; subclasses break it on purpose."""

    name = "liger"

    def unavailable(self, model_type, recipe, device):
        return None


class _RaisesWhileLoading(_Usable):
    def load(self, folder, recipe, device):
        super().load(folder, recipe, device)  # a model really is built, then the patching fails
        raise RuntimeError("triton: failed to compile kernel for sm_61\nmore detail")


class _RaisesOnTheProbe(_Usable):
    def loss(self, model, inputs, memory, num_items_in_batch=None):
        raise ValueError("unsupported head dimension 80")


class _NanOnTheProbe(_Usable):
    def loss(self, model, inputs, memory, num_items_in_batch=None):
        return super().loss(model, inputs, memory, num_items_in_batch) * float("nan")


class _OutOfMemory(_Usable):
    def load(self, folder, recipe, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("broken, expected", [
    (_RaisesWhileLoading, "RuntimeError: triton: failed to compile kernel for sm_61"),
    (_RaisesOnTheProbe, "ValueError: unsupported head dimension 80"),
    (_NanOnTheProbe, "RuntimeError: the probe step's loss is nan"),
])
def test_a_backend_that_raises_ends_the_process_with_its_reason(tiny, monkeypatch, broken, expected):
    """Liger and Unsloth patch transformers' classes process-wide: the fallback needs a fresh process."""
    monkeypatch.setitem(BACKENDS, "liger", broken())
    with pytest.raises(backends.BackendFailed) as failed:
        load_for_training(tiny, _recipe(tiny, "liger"), CPU)
    assert (failed.value.name, failed.value.reason) == ("liger", expected)
    assert "the liger backend failed (" in str(failed.value)


def test_the_fresh_process_skips_the_failed_backend_and_trains_on_the_universal_path(tiny, monkeypatch):
    monkeypatch.setitem(BACKENDS, "liger", _RaisesWhileLoading())
    recipe = _recipe(tiny, "liger")
    loaded = load_for_training(tiny, recipe, CPU, {"liger": "RuntimeError: triton: failed to compile"})
    assert loaded.choice.name == "universal" and type(loaded.backend) is UniversalBackend
    assert loaded.choice.skipped == ["liger: failed in an earlier attempt (RuntimeError: triton: failed to compile)"]
    assert "failed in an earlier attempt" in loaded.choice.reason
    direct = load_for_training(tiny, _recipe(tiny, "universal"), CPU).model.state_dict()
    lora = [k for k in direct if "lora_" in k]
    assert lora and all(torch.equal(direct[k], loaded.model.state_dict()[k]) for k in lora)
    assert _train_one_step(loaded, recipe) > 0


def test_the_worker_records_the_failure_and_re_executes_itself(tiny, tmp_path, monkeypatch):
    from tui_finetune.core.events import WarningEvent, read_events
    from tui_finetune.core.run_folder.info import create_run, read_run_info
    from tui_finetune.engine import worker

    run_dir = create_run(_recipe(tiny, "liger"), tiny / "data.jsonl", base=tmp_path)
    execs = []
    monkeypatch.setattr(worker.os, "execv", lambda path, argv: execs.append(argv))
    worker.Worker(run_dir)._restart_without(backends.BackendFailed("liger", "RuntimeError: no kernel"))
    assert read_run_info(run_dir).backend_failures == {"liger": "RuntimeError: no kernel"}
    assert execs and execs[0][1:] == ["-m", "tui_finetune.engine.worker", str(run_dir)]
    warnings = [e for e in read_events(run_dir / "events.jsonl")[0] if isinstance(e, WarningEvent)]
    assert "restarting the worker without it" in warnings[-1].message


def test_an_oom_while_loading_drops_only_a_backend_that_loads_differently(tiny, tmp_path, monkeypatch):
    """Liger and Unsloth load their own way, so the universal path gets its chance; the compiled backend
    loads the universal path's weights, so an OOM there is the card's answer: refused with advice."""
    from tui_finetune.core.run_folder.info import create_run
    from tui_finetune.engine import worker
    from tui_finetune.engine.recipe_refit import FitRefused

    run_dir = create_run(_recipe(tiny, "auto"), tiny / "data.jsonl", base=tmp_path)
    execs = []
    monkeypatch.setattr(worker.os, "execv", lambda path, argv: execs.append(argv))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(FitRefused, match="doesn't fit this card"):
        worker.Worker(run_dir)._refuse_load_oom(oom, "compiled")
    assert execs == []
    with pytest.raises(FitRefused):  # the test's execv returns, so the refusal follows the restart here
        worker.Worker(run_dir)._refuse_load_oom(oom, "unsloth")
    assert len(execs) == 1


def test_an_out_of_memory_is_not_a_backend_failure(tiny, monkeypatch):
    monkeypatch.setitem(BACKENDS, "liger", _OutOfMemory())
    with pytest.raises(torch.OutOfMemoryError):
        load_for_training(tiny, _recipe(tiny, "liger"), CPU)


def test_the_universal_path_failing_is_an_error_not_a_fallback(tiny, monkeypatch):
    class Broken(UniversalBackend):
        def load(self, folder, recipe, device):
            raise RuntimeError("config.json is damaged")

    monkeypatch.setitem(BACKENDS, "universal", Broken())
    with pytest.raises(RuntimeError, match="damaged"):
        load_for_training(tiny, _recipe(tiny, "universal"), CPU)


def test_unsloth_is_passed_over_for_architectures_it_lacks_full_fine_tuning_and_packing(monkeypatch):
    monkeypatch.setattr(kernel_support, "module_installed", lambda name: True)
    monkeypatch.setattr(kernel_support, "why_no_triton", lambda has_cuda: None)
    unsloth = BACKENDS["unsloth"]
    recipe = RecipeSpec(model="x")
    assert unsloth.unavailable("mistral", recipe, CPU) is None
    assert "'phi' architecture" in unsloth.unavailable("phi", recipe, CPU)
    assert recipe.data.group_by_length  # length groups are plain padded rows: Unsloth stays allowed
    recipe.data.packing = True
    assert "packing" in unsloth.unavailable("mistral", recipe, CPU)
    recipe.method = "full"
    assert "full fine-tuning" in unsloth.unavailable("mistral", recipe, CPU)


def test_triton_backends_need_a_volta_or_newer_card(monkeypatch):
    monkeypatch.setattr(kernel_support, "cuda_capability", lambda: (6, 1))
    gpu = DeviceFacts(has_cuda=True, supports_bf16=False, name="GeForce GTX 1080")
    assert "compute capability 7.0" in kernel_support.why_no_triton(gpu.has_cuda)
    monkeypatch.setattr(kernel_support, "cuda_capability", lambda: (8, 6))
    monkeypatch.setattr(kernel_support, "module_installed", lambda name: name != "triton")
    assert "Triton is not installed" in kernel_support.why_no_triton(gpu.has_cuda)
    monkeypatch.setattr(kernel_support.sys, "platform", "win32")  # where torch comes without it: say what to install
    windows = kernel_support.why_no_triton(gpu.has_cuda)
    assert "pip install" in windows and "triton-windows" in windows


def test_the_triton_windows_release_named_is_the_one_this_torch_was_built_with(monkeypatch):
    """torch's metadata pins Triton (Linux wheels install it); triton-windows follows its minor versions."""
    import importlib.metadata

    pinned = [line for line in importlib.metadata.requires("torch") or [] if line.startswith("triton")]
    if pinned:  # a CUDA-capable torch wheel
        minor = pinned[0].split("==")[1].split(".")[:2]
        assert kernel_support.triton_windows_requirement() == (
            f'"triton-windows>={minor[0]}.{minor[1]},<{minor[0]}.{int(minor[1]) + 1}"')
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ['triton==3.7.1; platform_system == "Linux"'])
    assert kernel_support.triton_windows_requirement() == '"triton-windows>=3.7,<3.8"'
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ["filelock"])  # a build that names none
    assert kernel_support.triton_windows_requirement() == "triton-windows"


def test_model_loss_backends_let_the_trainer_scale_for_accumulation():
    from tui_finetune.core.recipe import MemorySpec

    assert BACKENDS["universal"].uses_model_loss(MemorySpec(chunked_loss=False))
    assert not BACKENDS["universal"].uses_model_loss(MemorySpec())
    assert not BACKENDS["liger"].uses_model_loss(MemorySpec(chunked_loss=False))
    assert BACKENDS["unsloth"].uses_model_loss(MemorySpec())


def test_expected_backend_names_what_will_load_so_the_planner_can_model_it(tiny, monkeypatch):
    assert backends.expected_backend(tiny, _recipe(tiny), CPU) == "universal"
    monkeypatch.setitem(BACKENDS, "unsloth", _Usable())
    assert backends.expected_backend(tiny, _recipe(tiny), CPU) == "unsloth"
    assert backends.expected_backend(tiny, _recipe(tiny), CPU, {"unsloth": "RuntimeError"}) == "universal"
    assert backends.expected_backend(tiny, _recipe(tiny, "universal"), CPU) == "universal"
    monkeypatch.setitem(BACKENDS, "liger", _Usable())
    assert backends.expected_backend(tiny, _recipe(tiny, "liger"), CPU) == "liger"


def test_a_resume_may_change_the_backend_and_maths_preserving_memory_switches_but_not_precision(tmp_path):
    """Gradient checkpointing among them: it recomputes the same forward with the RNG state it had."""
    import json

    from tui_finetune.core.run_folder.layout import RUN_STATE
    from tui_finetune.core.run_folder.resume import checkpoint_state, resume_differences

    then = _recipe(tmp_path, "unsloth")
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / RUN_STATE).write_text(json.dumps(checkpoint_state(then, "abc", 4, None)))
    now = _recipe(tmp_path, "universal")  # the advice after a backend failure
    now.memory.offload_activations, now.memory.mlp_chunk_tokens = True, 4096
    now.train.gradient_checkpointing = not then.train.gradient_checkpointing  # the OOM advice's tip
    assert resume_differences(checkpoint, now, "abc") == []
    now.memory.adapter_dtype = "compute"
    assert resume_differences(checkpoint, now, "abc") == ["memory.adapter_dtype: 'fp32' -> 'compute'"]


def unset_until_teardown(monkeypatch, *names: str) -> None:
    """Unset ``names`` for the test and restore them after it, also when they were unset before and the
    code under test sets them: ``delenv`` of an absent variable records nothing to undo, so the value
    prepare_process sets would leak into every later test of the session (the GPU tests' Unsloth too)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_unsloths_compiled_cache_goes_to_our_cache_folder_not_the_run_folder(tmp_path, monkeypatch):
    """Unsloth writes ./unsloth_compiled_cache unless told otherwise before it imports; the worker's
    working directory is the run folder."""
    monkeypatch.setenv("TUI_FINETUNE_CACHE", str(tmp_path / "cache"))
    unset_until_teardown(monkeypatch, "UNSLOTH_COMPILE_LOCATION", "UNSLOTH_COMPILE_DISABLE")
    monkeypatch.setattr(unsloth_import, "_import_error", None)
    monkeypatch.setattr(kernel_support, "module_installed", lambda name: True)  # as on a GPU box with the extra
    monkeypatch.setattr(kernel_support, "cuda_capability", lambda: (8, 9))
    monkeypatch.setitem(__import__("sys").modules, "unsloth", None)  # its import fails here: recorded, not raised
    unsloth_import.prepare_process("auto")
    import os

    assert os.environ["UNSLOTH_COMPILE_LOCATION"] == str(tmp_path / "cache" / "unsloth_compiled_cache")
    assert unsloth_import.import_error() is not None


def test_gemma_gets_unsloths_compiler_off_before_unsloth_imports_and_others_keep_it(tmp_path, monkeypatch):
    """Gemma's compiled backward fails in Inductor (docs/verification/speed.md section 7): the worker sets
    UNSLOTH_COMPILE_DISABLE before the import for it alone, and never over the user's own setting."""
    monkeypatch.setenv("TUI_FINETUNE_CACHE", str(tmp_path / "cache"))
    unset_until_teardown(monkeypatch, "UNSLOTH_COMPILE_LOCATION", "UNSLOTH_COMPILE_DISABLE")
    monkeypatch.setattr(unsloth_import, "_import_error", None)
    monkeypatch.setattr(kernel_support, "module_installed", lambda name: True)
    monkeypatch.setattr(kernel_support, "cuda_capability", lambda: (8, 9))
    monkeypatch.setitem(__import__("sys").modules, "unsloth", None)
    import os

    for model_type, user_setting, expected in (("gemma", None, "1"), ("llama", None, None), ("gemma", "0", "0")):
        if user_setting is None:
            monkeypatch.delenv("UNSLOTH_COMPILE_DISABLE", raising=False)
        else:
            monkeypatch.setenv("UNSLOTH_COMPILE_DISABLE", user_setting)
        unsloth_import.prepare_process("auto", None, model_type)
        assert os.environ.get("UNSLOTH_COMPILE_DISABLE") == expected, model_type
    monkeypatch.delenv("UNSLOTH_COMPILE_DISABLE", raising=False)
    unsloth_import.prepare_process("universal", None, "gemma")  # a run that can't use Unsloth changes nothing
    assert "UNSLOTH_COMPILE_DISABLE" not in os.environ


def test_the_model_type_is_known_before_any_download(tmp_path, monkeypatch):
    assert model_folder.model_type_before_loading("gemma-2b") == "gemma"
    assert model_folder.model_type_before_loading("google/gemma-2b") == "gemma"
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    assert model_folder.model_type_before_loading(str(tmp_path)) == "mistral"
    monkeypatch.setenv("HOME", str(tmp_path.parent))  # '~' is expanded, as resolve_model expands it
    assert model_folder.model_type_before_loading(f"~/{tmp_path.name}") == "mistral"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # a Hub model already downloaded: its cached config
    snapshot = tmp_path / "hub" / "models--someone--gemma-tune" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "gemma", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 256}))
    assert model_folder.model_type_before_loading("someone/gemma-tune") == "gemma"
    assert model_folder.model_type_before_loading("someone/not-in-the-catalog") == ""  # only a download would tell
