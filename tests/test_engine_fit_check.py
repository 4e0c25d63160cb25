"""The fit-check on the CPU with a tiny Llama, peft LoRA and our real Trainer: it runs the training step
and the optimizer step, leaves no trace, and runs once as training begins.

A CUDA OOM can't happen here, so the OOM test uses a backend whose loss raises torch.OutOfMemoryError:
the same exception the GPU raises.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine_tiny import build_tokenizer, write_alpaca
from tui_finetune.core.recipe import DataSpec, MemorySpec
from tui_finetune.data.collate import PaddingCollator, make_collator
from tui_finetune.engine.backends import UniversalBackend
from tui_finetune.engine.fit_check import FitCheckCallback, fit_check_step, longest_batch, longest_rows, row_lengths


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def lora_model(tokenizer):
    return build_lora(tokenizer)


def rows_of(lengths):
    import datasets

    ids = [[7 + (i + j) % 20 for j in range(n)] for i, n in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "length": list(lengths),
                                       "sample_id": list(range(len(lengths)))})


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def trainer_for(model, data, tmp_path, backend=None, callbacks=(), max_steps=3, optimizer="adamw_torch"):
    from transformers import TrainingArguments

    from tui_finetune.engine.training import build_trainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=max_steps, learning_rate=1e-2,
                             optim=optimizer, use_cpu=True, report_to="none", save_strategy="no",
                             logging_steps=1, remove_unused_columns=False, label_names=["labels"],
                             disable_tqdm=True, seed=3, data_seed=3, dataloader_num_workers=0)
    return build_trainer(model, None, args, data, None, PaddingCollator(0), list(callbacks), MemorySpec(),
                         backend=backend)


def test_the_check_takes_a_real_step_and_leaves_weights_optimizer_grads_mode_and_rng_as_they_were(lora_model, tmp_path):
    data = rows_of([40, 90, 60, 120])
    trainer = trainer_for(lora_model, data, tmp_path)
    trainer.create_optimizer()
    stepped = []  # inside the check, the optimizer really stepped and really moved the weights
    trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: stepped.append(
        sum(len(s) for s in opt.state.values())))
    before = lora_state(lora_model)
    lora_model.eval()
    rng = torch.random.get_rng_state()

    result = fit_check_step(trainer, PaddingCollator(0)(longest_rows(data, 2)))

    assert math.isfinite(result.loss) and result.loss > 0
    assert (result.rows, result.tokens) == (2, 2 * 120) and result.seconds > 0
    assert result.peak_allocated_bytes is None and result.peak_reserved_bytes is None  # CPU: no figures
    assert stepped and stepped[0] > 0, "the optimizer's states were created by a real step"
    after = lora_state(lora_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lora_model.parameters())
    assert not trainer.optimizer.state, "a fresh optimizer is fresh again"
    assert not lora_model.training
    assert torch.equal(torch.random.get_rng_state(), rng)  # LoRA dropout drew; the run will draw the same
    assert "2 example(s) in 2 x 120 tokens" in result.message(2) and "GiB" not in result.message(2)


def test_a_resumed_optimizers_moments_are_put_back(lora_model, tmp_path):
    data = rows_of([40, 90, 60, 120])
    trainer = trainer_for(lora_model, data, tmp_path)
    trainer.create_optimizer()
    batch = PaddingCollator(0)(longest_rows(data, 2))
    lora_model(**batch).loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    moments = {k: {n: v.clone() for n, v in state.items()} for k, state in trainer.optimizer.state.items()}

    fit_check_step(trainer, batch)

    state = trainer.optimizer.state
    assert moments and len(state) == len(moments)
    for param, saved in zip(state.values(), moments.values()):
        assert all(torch.equal(param[n], v) for n, v in saved.items())


def test_an_oom_in_the_check_propagates_after_putting_everything_back(lora_model, tmp_path):
    class OutOfMemory(UniversalBackend):
        def loss(self, model, inputs, memory, num_items_in_batch=None):
            lean = super().loss(model, inputs, memory, num_items_in_batch)
            lean.backward(retain_graph=True)  # some gradients exist when the OOM strikes
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = rows_of([30, 50])
    trainer = trainer_for(lora_model, data, tmp_path, backend=OutOfMemory())
    trainer.create_optimizer()
    before = lora_state(lora_model)
    with pytest.raises(torch.OutOfMemoryError):
        fit_check_step(trainer, PaddingCollator(0)(longest_rows(data, 2)))
    assert all(torch.equal(before[k], v) for k, v in lora_state(lora_model).items())
    assert all(p.grad is None for p in lora_model.parameters())


def test_in_train_the_check_runs_once_before_the_first_step_and_changes_no_loss(tokenizer, tmp_path):
    """The same seed trains to the same losses with and without the check: it leaves no trace."""
    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses, self.order = [], []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])
                self.order.append("step")

    data = rows_of([40, 90, 60, 120, 30, 70, 80, 20])
    runs = {}
    for checked in (False, True):
        model = build_lora(tokenizer)
        losses = Losses()
        trainer = trainer_for(model, data, tmp_path / str(checked), callbacks=[losses])
        results = []
        if checked:
            check = FitCheckCallback(trainer, data, PaddingCollator(0),
                                     lambda result, results=results, losses=losses: (results.append(result), losses.order.append("fit")))
            trainer.callback_handler.callbacks.insert(0, check)
        trainer.train()
        runs[checked] = losses.losses
        if checked:
            assert check.passed and len(results) == 1 and results[0].tokens == 2 * 120
            assert losses.order[0] == "fit" and losses.order.count("fit") == 1
    assert len(runs[True]) == 3 and runs[True] == runs[False]


def build_lora(tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, use_cache=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def test_longest_rows_picks_the_longest_first_and_ties_by_position():
    data = rows_of([5, 30, 12, 30, 7, 29])
    assert [r["sample_id"] for r in longest_rows(data, 3)] == [1, 3, 5]
    assert row_lengths(data) == [5, 30, 12, 30, 7, 29]
    assert [len(r["input_ids"]) for r in longest_rows(data, 10)] == [30, 30, 29, 12, 7, 5]
    plain = [{"input_ids": [1] * n} for n in (3, 9, 4)]  # no length column: counted
    assert [len(r["input_ids"]) for r in longest_rows(plain, 1)] == [9]


def test_longest_batch_from_prepared_data_padded_and_packed(tokenizer, tmp_path):
    from tui_finetune.data.prepare import prepare_datasets

    data = prepare_datasets(write_alpaca(tmp_path / "d.jsonl", rows=24), tokenizer, DataSpec(seq_len=128), 7)
    lengths = sorted(data.train["length"], reverse=True)
    padded = longest_batch(data.train, make_collator(tokenizer, packing=False), 4)
    assert padded["input_ids"].shape == (4, lengths[0])
    assert int(padded["attention_mask"].sum()) == sum(lengths[:4])
    packed = longest_batch(data.train, make_collator(tokenizer, packing=True), 4)
    assert packed["input_ids"].shape == (1, sum(lengths[:4]))  # one flattened row of the 4 longest examples
