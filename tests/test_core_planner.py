"""The VRAM planner against real measurements, and the suggestions and plan command built on it."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from argparse import Namespace

import pytest
from rich.console import Console

from tui_finetune.core.catalog import CATALOG, get_model
from tui_finetune.core.planner import (
    BASELINE,
    GIB,
    LEAN,
    TIGHT_MARGIN,
    PlanCase,
    estimate_peak_vram,
    lora_params,
    loss_chunk_size,
    mlp_chunk_size,
    profile_from_memory,
    profile_named,
)
from tui_finetune.core.recipe import MemorySpec, RecipeSpec
from tui_finetune.core.suggest import FITS, WONT_FIT, CardSpec, classify_fit, suggest
from tui_finetune.cli.plan import run_plan_command

# The calibration table: peak torch.cuda.max_memory_reserved measured on real GPUs.
# Each row: (model key, method, seq_len, micro_batch, engine profile, measured GiB, where).
# H200, transformers 5.17, peft 0.21.2, bitsandbytes 0.50.2: prepare_model_for_kbit_training,
# non-reentrant gradient checkpointing, SDPA, paged AdamW 8-bit, LoRA r16 on all linear layers.
BASELINE_H200 = "H200, transformers 5.17 + peft 0.21.2 + bitsandbytes 0.50.2 (issue #2)"
PROBE_H200 = "H200, plain-PyTorch feasibility probe (issue #7)"
LEAN_H100 = "H100 2026-11-26, torch 2.11, transformers 5.17, peft 0.21.2, bitsandbytes 0.50.2"
LEAN_H200 = "H200 2026-11-26, torch 2.11, transformers 5.17, peft 0.21.2, bitsandbytes 0.50.2"
H200_DEC = "H200 2026-12-02/03, torch 2.11, triton 3.6, transformers 5.17, peft 0.21.2, unsloth 2026.10.9"
CALIBRATION: list[tuple[str, str, int, int, str, float, str]] = [
    ("mistral-7b", "qlora", 2048, 1, "baseline", 9.18, BASELINE_H200),
    ("mistral-7b", "qlora", 4096, 1, "baseline", 18.37, BASELINE_H200),
    ("mistral-7b", "qlora", 512, 4, "baseline", 7.48, BASELINE_H200),
    ("llama-3.1-8b", "qlora", 2048, 1, "baseline", 13.52, BASELINE_H200),
    ("gemma-2b", "qlora", 512, 1, "baseline", 5.58, BASELINE_H200),
    ("gemma-2b", "qlora", 1024, 1, "baseline", 8.03, BASELINE_H200),
    ("gemma-2b", "qlora", 2048, 1, "baseline", 11.93, BASELINE_H200),
    ("phi-2", "qlora", 1024, 1, "baseline", 3.96, BASELINE_H200),
    ("phi-2", "qlora", 2048, 1, "baseline", 5.25, BASELINE_H200),
    ("mistral-7b", "lora", 2048, 1, "baseline", 15.89, BASELINE_H200),
    ("gemma-2b", "lora", 2048, 1, "baseline", 14.31, BASELINE_H200),
    ("phi-2", "lora", 2048, 1, "baseline", 7.78, BASELINE_H200),
    # The feasibility probe of issue #7 on the same H200: plain PyTorch, no upcast, bf16 LoRA weights,
    # non-reentrant checkpointing, SDPA, cross-entropy chunked over 1024 tokens.
    ("mistral-7b", "qlora", 2048, 1, "probe", 5.37, PROBE_H200),
    ("mistral-7b", "qlora", 8192, 1, "probe", 8.92, PROBE_H200),
    ("phi-2", "qlora", 2048, 1, "probe", 3.13, PROBE_H200),
    ("gemma-2b", "qlora", 1024, 1, "probe", 5.73, PROBE_H200),
    ("llama-3.1-8b", "qlora", 2048, 1, "probe", 8.08, PROBE_H200),
    # Our engine's default lean path (fp32 adapters, auto-sized loss chunks), measured with
    # benchmarks/memory_speed.py; see benchmarks/results/{compare,fit4gb,fit16gb}.md.
    ("phi-2", "qlora", 2048, 1, "lean", 2.97, LEAN_H200),
    ("phi-2", "qlora", 1024, 1, "lean", 2.59, LEAN_H200),
    ("gemma-2b", "qlora", 1024, 1, "lean", 2.80, LEAN_H200),
    ("mistral-7b", "qlora", 2048, 1, "lean", 5.82, LEAN_H200),
    ("mistral-7b", "qlora", 4096, 2, "lean", 10.47, LEAN_H200),
    # The same engine on an H100 with bf16 adapters and CPU-offloaded checkpoints
    # (benchmarks/results/h100-*.md); seq 32768 ran under a 15.5 GiB cap.
    ("gemma-2b", "qlora", 1024, 1, "lean", 2.80, LEAN_H100),
    ("mistral-7b", "qlora", 2048, 1, "lean+offload", 4.84, LEAN_H100),
    ("llama-3.1-8b", "qlora", 2048, 1, "lean+offload", 6.29, LEAN_H100),
    ("mistral-7b", "qlora", 32768, 1, "lean+offload", 15.07, LEAN_H100),
    # Session 2 (fused cross-entropy, the MLP in token chunks above 16k tokens), each under its card's
    # cap, from benchmarks/results/h100-*-backends.md, h100-mistral-40k-chunked.md, h100-mistral-liger.md.
    ("gemma-2b", "qlora", 1024, 1, "lean", 2.80, LEAN_H100),
    ("phi-2", "qlora", 2048, 1, "lean", 2.95, LEAN_H100),
    ("mistral-7b", "qlora", 2048, 1, "lean", 5.81, LEAN_H200),
    ("gemma-2b", "qlora", 2048, 1, "lean+offload+chunks", 2.73, LEAN_H100),
    ("mistral-7b", "qlora", 2048, 1, "lean+offload+chunks", 4.93, LEAN_H100),
    ("llama-3.1-8b", "qlora", 2048, 1, "lean+offload+chunks", 6.39, LEAN_H100),
    ("mistral-7b", "qlora", 40960, 1, "lean+offload+chunks", 12.96, LEAN_H100),
    ("gemma-2b", "qlora", 1024, 1, "liger", 2.91, LEAN_H200),  # gpu-gemma-liger-lean-ce.md
    ("mistral-7b", "qlora", 2048, 1, "liger", 5.69, LEAN_H200),
    ("gemma-2b", "qlora", 1024, 1, "unsloth", 2.85, LEAN_H100),
    ("gemma-2b", "qlora", 2048, 1, "unsloth", 3.01, LEAN_H100),
    ("mistral-7b", "qlora", 2048, 1, "unsloth", 4.96, LEAN_H100),
    ("llama-3.1-8b", "qlora", 2048, 1, "unsloth", 5.83, LEAN_H100),
    # Sessions 9-11: the compiled backend, and the Unsloth backend again (benchmarks/results/i14-compiled-*.md,
    # i14-s11-*.md); Gemma and Phi-2 under a 3.55 GiB cap, the 7-8B models under 15.55 GiB.
    ("gemma-2b", "qlora", 1024, 1, "compiled", 2.87, H200_DEC),
    ("phi-2", "qlora", 2048, 1, "compiled", 2.95, H200_DEC),
    ("mistral-7b", "qlora", 2048, 1, "compiled", 5.93, H200_DEC),
    ("llama-3.1-8b", "qlora", 2048, 1, "compiled", 7.27, H200_DEC),
    ("mistral-7b", "qlora", 2048, 1, "unsloth", 5.03, H200_DEC),
    ("llama-3.1-8b", "qlora", 2048, 1, "unsloth", 6.47, H200_DEC),
]


PROBE = replace(LEAN, name="probe", adapter_dtype="bf16", ce_chunk_tokens=1024, layer_factor=1.5,
                mlp_chunk_tokens=-1)
"""The stack of the plain-PyTorch feasibility probe measured before our engine existed: the lean profile
with bf16 adapters. Calibration rows only; no recipe runs it."""


def _calibration_profile(name: str):
    if name == "probe":
        return PROBE
    if name == "lean+offload":
        # Measured before the MLP ran in chunks: the engine then always ran it over the whole sequence.
        return profile_from_memory(MemorySpec(adapter_dtype="compute", offload_activations=True, mlp_chunk_tokens=-1))
    if name == "lean+offload+chunks":
        return profile_from_memory(MemorySpec(adapter_dtype="compute", offload_activations=True))
    if name in ("liger", "unsloth", "compiled"):  # our engine on that backend, default recipe
        return profile_from_memory(MemorySpec(backend=name))
    return profile_named(name)


def calibration_errors() -> list[tuple[str, float, float, float]]:
    """(label, measured GiB, predicted torch-reserved GiB, relative error) for each row."""
    rows = []
    for key, method, seq, batch, profile, measured, _ in CALIBRATION:
        case = PlanCase(get_model(key), method=method, seq_len=seq, micro_batch=batch)
        predicted = estimate_peak_vram(case, _calibration_profile(profile)).torch_peak / GIB
        rows.append((f"{key} {method} seq {seq} x{batch}", measured, predicted, predicted / measured - 1))
    return rows



@pytest.mark.parametrize("row", calibration_errors(), ids=lambda r: r[0])
def test_estimate_within_15_percent_of_measured_peak(row):
    label, measured, predicted, error = row
    assert abs(error) <= 0.15, f"{label}: predicted {predicted:.2f} GiB, measured {measured:.2f} GiB"


def test_our_engine_on_every_backend_is_planned_within_10_percent():
    """Issue #7: the planner models each backend and the lean path within 10% of the measured peaks."""
    ours = [(row, r) for row, r in zip(CALIBRATION, calibration_errors())
            if row[4] not in ("baseline", "probe")]
    assert {row[4] for row, _ in ours} >= {"lean", "lean+offload+chunks", "liger", "unsloth"}
    worst = max(ours, key=lambda pair: abs(pair[1][3]))
    assert abs(worst[1][3]) <= 0.10, f"{worst[0]}: {worst[1]}"


def test_the_unsloth_backend_has_its_own_profile_and_ignores_our_memory_table():
    case = PlanCase(get_model("gemma-2b"), seq_len=2048)
    unsloth = estimate_peak_vram(case, profile_from_memory(MemorySpec(backend="unsloth"))).torch_peak
    same = estimate_peak_vram(case, profile_from_memory(MemorySpec(backend="unsloth", offload_activations=True,
                                                                   adapter_dtype="compute"))).torch_peak
    lean = estimate_peak_vram(case, profile_from_memory(MemorySpec(backend="liger"))).torch_peak
    assert unsloth == same and unsloth != lean
    assert profile_from_memory(MemorySpec(backend="auto")) == profile_from_memory(MemorySpec(backend="universal"))


def test_calibration_table_covers_the_issue_figures():
    baseline = {(k, m, s, b): gib for k, m, s, b, p, gib, _ in CALIBRATION if p == "baseline"}
    assert baseline[("mistral-7b", "qlora", 2048, 1)] == 9.18
    assert baseline[("gemma-2b", "qlora", 2048, 1)] == 11.93
    assert baseline[("phi-2", "lora", 2048, 1)] == 7.78
    assert len(baseline) == 12


def test_breakdown_names_every_part_and_adds_up():
    estimate = estimate_peak_vram(PlanCase(get_model("mistral-7b"), seq_len=2048), BASELINE)
    assert {"weights", "lora", "activations", "slack", "cuda_context"} <= set(estimate.parts)
    assert {"logits", "layer"} & set(estimate.parts)
    assert estimate.total == pytest.approx(sum(estimate.parts.values()))
    assert estimate.torch_peak < estimate.total  # the CUDA context is outside torch's accounting


def test_nf4_weights_cost_4_127_bits_and_embeddings_stay_16_bit():
    model = get_model("mistral-7b")
    lean = estimate_peak_vram(PlanCase(model, seq_len=512), LEAN).parts["weights"]
    linear = model.num_layers * model.block_linear_params()
    assert lean == pytest.approx(linear * 4.127 / 8 + (model.embedding_params() + 2 * 32 * 4096 + 4096) * 2, rel=1e-3)


def test_lora_parameter_count_matches_peft_convention():
    # r * (in + out) per adapted linear: Mistral-7B at r=16 on all linear layers has 41.9M.
    assert lora_params(get_model("mistral-7b"), 16) == 41_943_040
    assert lora_params(get_model("mistral-7b"), 16, ("q_proj", "v_proj")) < lora_params(get_model("mistral-7b"), 16)


def test_memory_techniques_move_the_estimate_the_right_way():
    case = PlanCase(get_model("gemma-2b"), seq_len=2048)
    lean = estimate_peak_vram(case, LEAN).total
    assert estimate_peak_vram(case, BASELINE).total > 2 * lean  # fp32 upcast and full logits
    no_chunk = profile_from_memory(MemorySpec(chunked_loss=False))
    assert estimate_peak_vram(case, no_chunk).total > lean + 3 * GIB  # Gemma's 256k-vocab logits
    offload = profile_from_memory(MemorySpec(offload_activations=True))
    assert estimate_peak_vram(case, offload).parts.get("activations", 0) == 0
    longer = estimate_peak_vram(PlanCase(get_model("gemma-2b"), seq_len=4096), LEAN).total
    assert longer > lean


def test_loss_chunk_is_sized_to_the_vocabulary():
    assert loss_chunk_size(32768) == 1024
    assert loss_chunk_size(256000) == 128
    assert all(64 <= loss_chunk_size(v) <= 4096 for v in (1000, 10**6))


def test_fit_colours_follow_the_safety_margin():
    estimate = estimate_peak_vram(PlanCase(get_model("phi-2"), seq_len=1024), LEAN)
    assert classify_fit(estimate, CardSpec(estimate.total_gib / 0.85)) == FITS
    assert classify_fit(estimate, CardSpec(estimate.total_gib * 0.9)) == WONT_FIT
    busy = CardSpec(estimate.total_gib / 0.85, used_by_others_gib=1.0)
    assert classify_fit(estimate, busy) != FITS  # the desktop's VRAM counts against the card


def test_suggestions_for_a_4gb_card_fit_and_explain_themselves():
    options = suggest(CardSpec(4))
    keys = [o.model.key for o in options]
    assert "phi-2" in keys and "gemma-2b" in keys
    assert "mistral-7b" not in keys
    for option in options:
        assert option.estimate.total_gib <= 4 * 0.9 or option.fit != FITS
        assert "GiB" in option.reason and str(option.seq_len) in option.reason
    big = suggest(CardSpec(16))
    assert big[0].model.published_params > 7e9  # a 16 GB card gets a 7-8B model first


def plan_output(**kwargs) -> tuple[int, str]:
    console = Console(width=160, record=True, force_terminal=False)
    args = Namespace(vram=None, model=None, recipe=None, seq=None)
    args.__dict__.update(kwargs)
    code = run_plan_command(args, console)
    return code, console.export_text()


def _preset_fit(text: str, preset: str) -> str:
    line = next(line for line in text.splitlines() if line.strip("│ ").startswith(preset))
    return "won't fit" if "won't fit" in line else ("fits" if "fits" in line else "tight")


def test_plan_vram_4_lists_phi2_and_gemma_presets_as_fitting():
    code, text = plan_output(vram=4)
    assert code == 0
    assert _preset_fit(text, "4gb-phi-2-qlora") == "fits"
    assert _preset_fit(text, "4gb-gemma-2b-qlora") == "fits"
    assert _preset_fit(text, "16gb-mistral-7b-qlora") == "won't fit"


def test_plan_vram_16_lists_mistral_qlora():
    code, text = plan_output(vram=16)
    assert _preset_fit(text, "16gb-mistral-7b-qlora") == "fits"
    assert any("mistral-7b" in line and "qlora" in line and "fits" in line for line in text.splitlines())


def test_every_preset_fits_the_card_it_names():
    from tui_finetune.core.presets import list_presets, preset_card_gb
    from tui_finetune.core.recipe_io import load_recipe
    from tui_finetune.core.suggest import plan_case

    for path in list_presets():
        gb = preset_card_gb(path)
        if gb is None:
            continue
        recipe = load_recipe(path)
        option = plan_case(PlanCase.from_recipe(get_model(recipe.model), recipe), CardSpec(gb),
                           profile_from_memory(recipe.memory))
        assert option.fit == FITS, f"{path.name}: {option.reason}"


def test_plan_recipe_shows_breakdown_and_advice_when_it_wont_fit():
    code, text = plan_output(vram=6, recipe="16gb-mistral-7b-qlora")
    assert code == 1
    assert "weights" in text and "activations" in text and "won't fit" in text
    assert "To fit, try one of: sequence length" in text and "--set data.seq_len=" in text


def test_plan_command_runs_headless_without_torch():
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from tui_finetune.cli import main; rc = main(['plan', '--vram', '8']);"
                          "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "NOTORCH" in out.stdout and "llama-3.1-8b" in out.stdout


def test_catalog_models_all_have_an_option_on_a_24gb_card():
    assert len(suggest(CardSpec(24))) == len(CATALOG)
    assert RecipeSpec(model="x").memory.chunked_loss  # the lean path is the default the planner assumes


def test_chunked_mlp_lets_mistral_7b_train_40k_tokens_under_15_5_gib():
    # Measured on an H100 without chunking: seq 32768 peaked at 15.07 GiB and 40960 ran out of a 15.5 GiB cap.
    case = PlanCase(get_model("mistral-7b"), seq_len=40960)

    def peak(mlp_chunk_tokens: int) -> float:
        memory = MemorySpec(adapter_dtype="compute", offload_activations=True, mlp_chunk_tokens=mlp_chunk_tokens)
        return estimate_peak_vram(case, profile_from_memory(memory)).torch_peak / GIB

    whole, auto, small = peak(-1), peak(0), peak(2048)
    assert whole > 15.5  # the OOM the planner must predict
    assert auto < whole - 5 and small < auto  # the MLP term now scales with the chunk
    assert auto < 15.5 * (1 - TIGHT_MARGIN)


def test_mlp_chunking_follows_the_recipe_rule():
    assert mlp_chunk_size(0, 8192) == 0 and mlp_chunk_size(0, 16385) == 4096
    assert mlp_chunk_size(-1, 10**6) == 0 and mlp_chunk_size(512, 100) == 512
    short = PlanCase(get_model("mistral-7b"), seq_len=2048)
    never = replace(LEAN, mlp_chunk_tokens=-1)
    assert estimate_peak_vram(short, LEAN).total == estimate_peak_vram(short, never).total
    assert BASELINE.mlp_chunk_tokens == PROBE.mlp_chunk_tokens == -1  # the calibration stacks never chunked


@pytest.mark.parametrize("key, method", [("llama-3.1-8b", "qlora"), ("phi-2", "qlora"), ("mistral-7b", "lora")])
def test_the_input_embedding_in_cpu_ram_leaves_the_weights_of_an_untied_model(key, method):
    model = get_model(key)
    case = PlanCase(model, method=method, seq_len=256)
    on_gpu = estimate_peak_vram(case, profile_from_memory(MemorySpec()))
    in_ram = estimate_peak_vram(case, profile_from_memory(MemorySpec(embeddings_on_cpu=True)))
    embedding_bytes = model.vocab_size * model.hidden_size * 2  # bf16; the lm_head stays
    assert not model.tied_embeddings
    assert on_gpu.parts["weights"] - in_ram.parts["weights"] == pytest.approx(embedding_bytes)
    assert on_gpu.total - in_ram.total >= embedding_bytes


@pytest.mark.parametrize("key, memory, method", [
    ("gemma-2b", MemorySpec(embeddings_on_cpu=True), "qlora"),  # tied: the lm_head is the input embedding
    ("llama-3.2-3b", MemorySpec(embeddings_on_cpu=True), "qlora"),  # tied too
    ("llama-3.1-8b", MemorySpec(embeddings_on_cpu=True, backend="unsloth"), "qlora"),  # Unsloth loads its own way
    ("llama-3.1-8b", MemorySpec(embeddings_on_cpu=True), "full"),  # a trained embedding stays with its optimizer
])
def test_the_input_embedding_stays_where_it_cant_leave(key, memory, method):
    case = PlanCase(get_model(key), method=method, seq_len=256)
    stays = estimate_peak_vram(case, profile_from_memory(replace(memory, embeddings_on_cpu=False)))
    assert estimate_peak_vram(case, profile_from_memory(memory)) == stays


def test_the_plan_says_when_embeddings_on_cpu_has_no_effect_and_the_ram_estimate_keeps_the_embedding():
    from tui_finetune.core.recipe_io import recipe_from_dict
    from tui_finetune.core.suggest import estimate_cpu_ram_gib, plan_recipe

    def recipe(model, on_cpu):
        return recipe_from_dict({"model": model, "memory": {"embeddings_on_cpu": on_cpu}})

    assert "has no effect here" in plan_recipe(recipe("gemma-2b", True), CardSpec(8)).reason
    assert "has no effect" not in plan_recipe(recipe("llama-3.1-8b", True), CardSpec(8)).reason
    assert estimate_cpu_ram_gib(recipe("phi-2", True)) == estimate_cpu_ram_gib(recipe("phi-2", False))


def test_the_cpu_ram_estimate_of_a_packed_run_sizes_a_full_bin_not_the_longest_row():
    """Packed, a micro-batch is a bin of up to seq_len tokens of rows, however short each row is."""
    from tui_finetune.core.recipe_io import recipe_from_dict
    from tui_finetune.core.suggest import estimate_cpu_ram_gib

    def recipe(packing, grouping=True):
        return recipe_from_dict({"model": "phi-2", "data": {"seq_len": 1024, "packing": packing,
                                                            "group_by_length": grouping}})

    assert estimate_cpu_ram_gib(recipe(False), longest_row_tokens=72) < estimate_cpu_ram_gib(recipe(False))
    assert estimate_cpu_ram_gib(recipe(True), longest_row_tokens=72) == estimate_cpu_ram_gib(recipe(True))
    # length groups hold micro_batch x the longest row padded: the longest row still sizes them, as for rows
    assert (estimate_cpu_ram_gib(recipe(False, True), longest_row_tokens=72)
            == estimate_cpu_ram_gib(recipe(False, False), longest_row_tokens=72))


def test_plan_recipe_says_what_auto_fit_will_spend_a_roomy_cards_memory_on():
    code, text = plan_output(vram=24, recipe="4gb-phi-2-qlora")
    assert code == 0
    room = " ".join(text.split())
    match = re.search(r"Room to spare: auto-fit will let (\d+) of 32 layers keep their activations", room)
    assert match and 0 < int(match.group(1)) <= 32
    assert "--set memory.layers_keeping_activations=0" in room
    assert "Room to spare" not in plan_output(vram=3.5, recipe="4gb-phi-2-qlora")[1]  # a tight card: nothing to spend


def test_plans_room_on_a_card_without_bf16_counts_adapters_fp32_as_the_worker_does():
    from tui_finetune.cli.plan import room_sentence
    from tui_finetune.core.recipe_io import recipe_from_dict

    def phi2(adapter_dtype):
        return recipe_from_dict({"model": "phi-2", "memory": {"adapter_dtype": adapter_dtype}})

    fp16_card, bf16_card = CardSpec(8, supports_bf16=False), CardSpec(8)
    assert room_sentence(phi2("compute"), get_model("phi-2"), fp16_card) == \
        room_sentence(phi2("fp32"), get_model("phi-2"), fp16_card)
    assert room_sentence(phi2("compute"), get_model("phi-2"), bf16_card) != \
        room_sentence(phi2("fp32"), get_model("phi-2"), bf16_card)  # with bf16 the compute dtype is smaller
