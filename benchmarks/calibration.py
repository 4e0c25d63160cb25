"""Peak ``max_memory_reserved`` measured on real GPUs, that the planner is calibrated against.

Each row: (model key, method, seq_len, micro_batch, profile, measured GiB, where it was measured).
``python -m benchmarks.calibration`` prints the planner's error on each row; the tests assert it.
"""

from __future__ import annotations

# H200, transformers 5.17, peft 0.21.2, bitsandbytes 0.50.2: prepare_model_for_kbit_training,
# non-reentrant gradient checkpointing, SDPA, paged AdamW 8-bit, LoRA r16 on all linear layers.
BASELINE_H200 = "H200, transformers 5.17 + peft 0.21.2 + bitsandbytes 0.50.2 (issue #2)"
PROBE_H200 = "H200, plain-PyTorch feasibility probe (issue #7)"
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
]


def calibration_errors() -> list[tuple[str, float, float, float]]:
    """(label, measured GiB, predicted torch-reserved GiB, relative error) for each row."""
    from tui_finetune.core.catalog import get_model
    from tui_finetune.core.planner import GIB, PlanCase, estimate_peak_vram, profile_named, PROBE

    rows = []
    for key, method, seq, batch, profile, measured, _ in CALIBRATION:
        case = PlanCase(get_model(key), method=method, seq_len=seq, micro_batch=batch)
        predicted = estimate_peak_vram(case, PROBE if profile == "probe" else profile_named(profile)).torch_peak / GIB
        rows.append((f"{key} {method} seq {seq} x{batch}", measured, predicted, predicted / measured - 1))
    return rows


if __name__ == "__main__":
    for label, measured, predicted, err in calibration_errors():
        print(f"{label:32s} measured {measured:6.2f}  predicted {predicted:6.2f}  {err:+6.1%}")
