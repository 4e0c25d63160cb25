"""train.devices without starting anything: the recipe key, the launch command, which cards, the plan's words,
the resume refusal, and the stop that a multi-process run must not get as a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tui_finetune.core.devices import (
    DATA_PARALLEL_NOTE, describe_batch, pick_gpus, pin_gpus, settle_devices, smallest_gpu, worker_command)
from tui_finetune.core.hardware import GpuInfo, GpuProcess, HardwareReport
from tui_finetune.core.recipe import RecipeError, RecipeSpec, TrainSpec
from tui_finetune.core.recipe_io import load_recipe, recipe_to_toml

GIB = 2**30


def _gpu(index: int, gib: float, others_gib: float = 0.0, cc: tuple[int, int] = (8, 6)) -> GpuInfo:
    processes = (GpuProcess(pid=999, used_bytes=int(others_gib * GIB)),) if others_gib else ()
    return GpuInfo(index=index, name=f"GPU{index}", total_bytes=int(gib * GIB), used_bytes=0, free_bytes=int(gib * GIB),
                   compute_capability=cc, processes=processes)


MIXED = HardwareReport(gpus=[_gpu(0, 12), _gpu(1, 24), _gpu(2, 24, others_gib=4)])


def test_train_devices_takes_a_number_or_all_and_multiplies_the_effective_batch(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('model = "phi-2"\n[train]\nmicro_batch = 2\ngrad_accum = 4\ndevices = 2\n', encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.train.devices == 2 and recipe.effective_batch == 16
    assert load_recipe(path, ["train.devices=all"]).train.devices == "all"
    assert load_recipe(path, ["devices=3"]).train.devices == 3  # a bare key finds its table
    assert RecipeSpec(model="m").train.devices == 1  # the default: one GPU, as before
    for bad in ("0", "two", "-1", "true"):
        with pytest.raises(RecipeError, match="train.devices"):
            load_recipe(path, [f"train.devices={bad}"])
    saved = tmp_path / "saved.toml"
    saved.write_text(recipe_to_toml(load_recipe(path, ["train.devices=all"])), encoding="utf-8")
    assert load_recipe(saved).train.devices == "all"


def test_settling_devices_resolves_all_and_refuses_more_gpus_than_the_machine_has():
    assert settle_devices("all", 3) == 3 and settle_devices("all", 0) == 1
    assert settle_devices(2, 3) == 2
    assert settle_devices(2, 0) == 2  # no GPU: processes on the CPU (the tests' gloo runs)
    with pytest.raises(RecipeError, match=r"has 2 NVIDIA GPUs: use --devices 2"):
        settle_devices(3, 2)


def test_more_than_one_device_is_torchrun_with_the_same_interpreter_and_a_free_port():
    run_dir = Path("/runs/r1")
    assert worker_command(run_dir, 1) == [sys.executable, "-m", "tui_finetune.engine.worker", str(run_dir)]
    command = worker_command(run_dir, 4)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command  # its rendezvous store binds port 0: free by construction
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[-3:] == ["-m", "tui_finetune.engine.worker", str(run_dir)]


def test_a_single_device_run_on_a_multi_gpu_machine_is_pinned_to_the_best_card():
    env = pin_gpus({"PATH": "/bin"}, MIXED, 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert pin_gpus({}, MIXED, 2)["CUDA_VISIBLE_DEVICES"] == "1,2"  # the two 24 GB cards, in NVML order
    assert pin_gpus({}, MIXED, 3)["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert "CUDA_VISIBLE_DEVICES" not in pin_gpus({}, HardwareReport(gpus=[_gpu(0, 8)]), 1)  # nothing to choose
    assert pin_gpus({"CUDA_VISIBLE_DEVICES": "3, 5,7"}, MIXED, 1)["CUDA_VISIBLE_DEVICES"] == "3"  # the user's wins
    assert pin_gpus({"CUDA_VISIBLE_DEVICES": ""}, MIXED, 1)["CUDA_VISIBLE_DEVICES"] == ""  # even "no GPU"


def test_the_users_cuda_visible_devices_limits_the_gpus_a_run_may_use():
    from tui_finetune.core.devices import visible_gpu_count

    assert visible_gpu_count(MIXED, {}) == 3
    assert visible_gpu_count(MIXED, {"CUDA_VISIBLE_DEVICES": "2"}) == 1
    assert visible_gpu_count(MIXED, {"CUDA_VISIBLE_DEVICES": ""}) == 0


def test_a_multi_gpu_run_is_planned_for_its_smallest_card():
    assert [g.index for g in pick_gpus(MIXED, 2)] == [1, 2]
    assert smallest_gpu(MIXED, 2).index == 2  # 24 GB, but 4 GB of it held by another program
    assert smallest_gpu(MIXED, 3).index == 0
    assert smallest_gpu(HardwareReport(), 2) is None


def test_the_plan_is_for_the_smallest_of_the_cards_the_users_cuda_visible_devices_pins():
    pinned = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert smallest_gpu(MIXED, 2, pinned).index == 0  # the 12 GB card the user chose, not the best two's
    assert smallest_gpu(MIXED, 2, {}).index == 2  # pinned by us: the best two, as without an environment
    # CUDA's order or UUIDs: which cards they are can't be told, so the plan is for the machine's smallest
    assert smallest_gpu(MIXED, 2, {"CUDA_VISIBLE_DEVICES": "0,1"}).index == 0
    assert smallest_gpu(MIXED, 2, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-1a,GPU-2b"}).index == 0


def test_the_effective_batch_is_shown_whole():
    def recipe(devices: int) -> RecipeSpec:
        return RecipeSpec(model="m", train=TrainSpec(micro_batch=2, grad_accum=4, devices=devices))

    assert describe_batch(recipe(1)) == "8 sequences a step (micro-batch 2 x accumulation 4)"
    assert describe_batch(recipe(2)) == "16 sequences a step (micro-batch 2 x accumulation 4 x 2 GPUs)"
    assert recipe(2).effective_batch == 16  # the one product: the phase line and 'runs' both read it


def test_the_planner_says_a_model_is_not_split_across_cards():
    from tui_finetune.core.suggest import WONT_FIT, CardSpec, plan_recipe

    one = RecipeSpec(model="llama-3.1-8b", method="qlora")
    two = RecipeSpec(model="llama-3.1-8b", method="qlora", train=TrainSpec(devices=2))
    card = CardSpec(total_gib=4)
    assert plan_recipe(two, card).fit == plan_recipe(one, card).fit == WONT_FIT  # two 4 GB cards are not 8 GB
    assert DATA_PARALLEL_NOTE not in plan_recipe(one, card).reason
    assert DATA_PARALLEL_NOTE in plan_recipe(two, card).reason and "not split across cards" in DATA_PARALLEL_NOTE


def test_resume_on_another_number_of_gpus_is_a_change_that_needs_force(tmp_path):
    from tui_finetune.core.run_folder.resume import DEVICES_NOTE, checkpoint_state, resume_differences

    ckpt = tmp_path / "step-000004"
    ckpt.mkdir()
    recipe = RecipeSpec(model="m", train=TrainSpec(devices=2, micro_batch=2, grad_accum=1))
    state = checkpoint_state(recipe, "hash", 4, None)
    assert state["recipe"]["train"]["devices"] == 2  # the ranks that saved it, in the recipe in effect
    (ckpt / "run_state.json").write_text(json.dumps(state), encoding="utf-8")
    assert resume_differences(ckpt, recipe) == []
    [diff] = resume_differences(ckpt, RecipeSpec(model="m", train=TrainSpec(devices=1, micro_batch=2, grad_accum=1)))
    assert diff.startswith("train.devices: 2 -> 1") and diff.endswith(DEVICES_NOTE) and "data order" in diff


def test_stopping_a_multi_process_run_is_the_stop_file_alone(tmp_path):
    """Its pid is torchrun's, which would pass SIGINT on and kill every rank 30 s later, saved or not."""
    from tui_finetune.core.run_folder.control import request_stop
    from tui_finetune.core.run_folder.info import RunInfo, read_run_info, write_run_info
    from tui_finetune.core.run_folder.layout import STOP_FILE

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_run_info(tmp_path, RunInfo(run_id="r", model="m", pid=sleeper.pid, world_size=2))
        request_stop(tmp_path)
        assert (tmp_path / STOP_FILE).exists() and read_run_info(tmp_path).state == "stopping"
        assert sleeper.poll() is None, "no signal went to torchrun"
        write_run_info(tmp_path, RunInfo(run_id="r", model="m", pid=sleeper.pid, world_size=1))
        request_stop(tmp_path)
        assert sleeper.wait(timeout=10) == -signal.SIGINT  # one process: the signal as before
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, signal.SIGKILL)
            sleeper.wait()


def test_a_follower_rank_never_writes_the_run_folder(tmp_path):
    code = ("import sys; from pathlib import Path; from tui_finetune.core.run_folder import info as runs; "
            "from tui_finetune.core.recipe "
            "import RecipeSpec; d = Path(sys.argv[1]); runs.make_run_folders_read_only(); "
            "runs.update_run_info(d, state='failed'); runs.write_run_recipe(d, RecipeSpec(model='other'))")
    from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    run_dir = create_run(RecipeSpec(model="m"), data, tmp_path / "runs")
    before = (run_dir / "run.json").read_bytes(), (run_dir / "recipe.toml").read_bytes()
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert ((run_dir / "run.json").read_bytes(), (run_dir / "recipe.toml").read_bytes()) == before
    assert read_run_info(run_dir).state == "running" and read_run_recipe(run_dir).model == "m"


def test_resume_on_another_number_of_gpus_is_refused_without_force_and_says_why(tmp_path, monkeypatch, capsys):
    """The CLI end of it, on a run folder with one sealed checkpoint; no worker is started."""
    from tui_finetune.cli import main
    from tui_finetune.core.run_folder import control
    from tui_finetune.core.run_folder.checkpoints import finalize_checkpoint
    from tui_finetune.core.run_folder.info import create_run, read_run_info, read_run_recipe, update_run_info
    from tui_finetune.core.run_folder.layout import RECIPE_FILE, STAGING
    from tui_finetune.core.run_folder.resume import checkpoint_state

    monkeypatch.setenv("TUI_FINETUNE_HOME", str(tmp_path / "home"))
    started = []
    monkeypatch.setattr(control, "start_worker_detached", lambda run_dir, env=None: started.append(run_dir) or 0)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    recipe = RecipeSpec(model="m", method="lora", train=TrainSpec(devices=2, micro_batch=2, grad_accum=1))
    run_dir = create_run(recipe, data)
    staged = run_dir / "checkpoints" / STAGING / "checkpoint-4"
    staged.mkdir(parents=True)
    (staged / "run_state.json").write_text(json.dumps(checkpoint_state(recipe, "", 4, None)), encoding="utf-8")
    finalize_checkpoint(staged, run_dir / "checkpoints", 4)
    update_run_info(run_dir, state="interrupted", world_size=2)

    assert main(["resume", run_dir.name, "--devices", "1", "--detach"]) == 2
    out = capsys.readouterr().out
    assert "train.devices: 2 -> 1" in out and "data order changes" in out and "--force" in out
    assert not started and read_run_recipe(run_dir).train.devices == 2  # nothing changed

    assert main(["resume", run_dir.name, "--devices", "1", "--detach", "--force"]) == 0
    assert started == [run_dir] and read_run_recipe(run_dir).train.devices == 1
    assert read_run_info(run_dir).resume_force and (run_dir / RECIPE_FILE).read_text().count("devices = 1") == 1
