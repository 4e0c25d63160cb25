"""Chat and export of a finished run, on tiny local models (issue 12): every target is written, passes
its own checks and is recorded; unsupported architectures, a full disk or RAM, and an interrupted
export are refused or leave nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export_support import make_finished_run
from tui_finetune.core.export_spec import ExportError, ExportSpec, read_exports
from tui_finetune.core.run_folder.info import create_run, read_run_recipe
from tui_finetune.core.run_folder.layout import ADAPTER_DIR


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    return make_finished_run(tmp_path_factory.mktemp("llama"), "llama")


def _export(run: Path, target: str, quant: str = "f16", **kwargs):
    from tui_finetune.engine.export import run_export

    return run_export(run, ExportSpec(target, quant=quant, **kwargs))


def _failed(result) -> list[str]:
    return [f"{c.name}: {c.detail}" for c in result.checks if not (c.passed or c.skipped)]


def test_chat_once_answers_and_stops_at_the_end_of_turn(llama_run):
    from tui_finetune.engine.chat import chat_once

    tuned = chat_once(llama_run, "What is 3 + 2?", max_new_tokens=40)
    base = chat_once(llama_run, "What is 3 + 2?", base=True, max_new_tokens=40)
    assert tuned.stopped and 0 < tuned.tokens < 40 and tuned.text
    assert base.stopped
    assert (tuned.text, tuned.tokens) != (base.text, base.tokens)  # the adapter changes the answer


def test_chat_worker_streams_tokens_as_json_lines(llama_run):
    from tui_finetune.core.chat_client import ChatClient

    with ChatClient(llama_run) as client:
        assert client.ready()["type"] == "ready"
        events = list(client.ask([{"role": "user", "content": "What is 3 + 2?"}], max_new_tokens=40))
    tokens = [e["text"] for e in events if e["type"] == "token"]
    done = events[-1]
    assert done["type"] == "done" and done["stopped"]
    assert tokens and "".join(tokens).strip() == done["text"]


def test_adapter_export_loads_with_plain_peft_and_passes_its_checks(llama_run):
    result = _export(llama_run, "adapter")
    assert result.passed, _failed(result)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(result.files)
    config = json.loads((Path(result.path) / "tokenizer_config.json").read_text())
    assert "chat_template" in config or (Path(result.path) / "chat_template.jinja").is_file()
    assert [c.name for c in result.checks] == ["logits match the fine-tune", "greedy replies match",
                                               "chat template round-trip", "does it stop"]


def test_merged_export_matches_the_fine_tune_and_lists_every_end_token(llama_run):
    result = _export(llama_run, "merged")
    assert result.passed, _failed(result)
    generation = json.loads((Path(result.path) / "generation_config.json").read_text())
    vocab = json.loads((Path(result.path) / "tokenizer.json").read_text())["added_tokens"]
    eot = next(t["id"] for t in vocab if t["content"] == "<|eot_id|>")
    assert eot in generation["eos_token_id"]
    recorded = read_exports(llama_run)
    assert any(r.target == "merged" and r.passed for r in recorded)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
def test_gguf_f16_reloaded_by_transformers_matches_the_merged_model(arch, tmp_path, llama_run):
    run = llama_run if arch == "llama" else make_finished_run(tmp_path, arch)
    result = _export(run, "gguf", "f16")
    assert result.passed, _failed(result)
    names = {c.name: c for c in result.checks}
    assert names["transformers reload: greedy replies match"].passed
    assert not names["transformers reload: greedy replies match"].skipped
    assert names["does it stop"].passed and names["chat template round-trip"].passed
    assert Path(result.path).suffix == ".gguf" and Path(result.path).is_file()


def test_gguf_q8_0_is_smaller_and_within_its_looser_tolerance(llama_run):
    import gguf

    result = _export(llama_run, "gguf", "q8_0")
    assert result.passed, _failed(result)
    reader = gguf.GGUFReader(result.path)
    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    assert gguf.GGMLQuantizationType.Q8_0 in kinds
    meta = {k: reader.fields[k].contents() for k in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id")}
    assert "<|eot_id|>" in meta["tokenizer.chat_template"]


@pytest.mark.parametrize("arch", ["gemma", "phi"])
def test_gguf_for_architectures_transformers_cannot_read_is_checked_with_the_gguf_reader(arch, tmp_path):
    result = _export(make_finished_run(tmp_path, arch), "gguf", "f16")
    assert result.passed, _failed(result)
    names = {c.name: c for c in result.checks}
    assert names["transformers reload"].skipped
    assert names["gguf reader: greedy replies match"].passed


def test_ollama_modelfile_has_a_stop_for_every_end_token_and_passes_its_checks(tmp_path):
    run = make_finished_run(tmp_path, "qwen2")
    result = _export(run, "ollama", "q8_0")
    assert result.passed, _failed(result)
    modelfile = (Path(result.path) / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert modelfile.startswith("FROM ./") and "{{ .Prompt }}" in modelfile
    assert any(step.startswith("ollama create") for step in result.next_steps)


def test_modelfile_check_fails_when_a_stop_token_is_lost(tmp_path):
    from tui_finetune.engine.export.checks import check_prompts
    from tui_finetune.engine.export.ollama import check_modelfile
    from tui_finetune.engine.run_model import open_run

    run_dir = make_finished_run(tmp_path, "qwen2")
    result = _export(run_dir, "ollama", "f16", check=False)
    modelfile = Path(result.path) / "Modelfile"
    modelfile.write_text("\n".join(line for line in modelfile.read_text().splitlines() if "PARAMETER stop" not in line))
    run = open_run(run_dir)
    outcome = check_modelfile(run, modelfile, next(Path(result.path).glob("*.gguf")), check_prompts(run),
                              ExportSpec("ollama", max_new_tokens=16))
    assert not outcome[-1].passed and "0 of 3" in outcome[-1].detail


def test_unsupported_architecture_is_refused_with_a_message(tmp_path, llama_run):
    base = Path(read_run_recipe(llama_run).model)
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (other / "config.json").write_text(json.dumps(config))
    recipe = read_run_recipe(llama_run)
    recipe.model = str(other)
    run = create_run(recipe, tmp_path / "chat.jsonl", base=tmp_path / "runs")
    shutil.copytree(llama_run / ADAPTER_DIR, run / ADAPTER_DIR)
    with pytest.raises(ExportError, match="gpt_neox.*--to merged"):
        _export(run, "gguf")
    assert not (run / "exports").exists()


@pytest.mark.parametrize("reader", ["free_disk_bytes", "free_ram_bytes"])
def test_preflight_refuses_before_writing_and_says_what_is_needed(reader, llama_run, monkeypatch, tmp_path):
    from tui_finetune.engine.export import preflight

    monkeypatch.setattr(preflight, reader, lambda *args: 1024)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="GiB" ) as err:
        _export(llama_run, "merged", out_dir=str(out))
    assert ("disk" in str(err.value)) == (reader == "free_disk_bytes")
    assert not out.exists()


def test_interrupted_gguf_export_leaves_no_half_written_file(llama_run, monkeypatch, tmp_path):
    import gguf

    def crash(self, *args, **kwargs):
        self.fout[0].write(b"half a file")  # some bytes reach the disk, then the export dies
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _export(llama_run, "gguf", out_dir=str(out))
    assert list(out.iterdir()) == []  # neither the final .gguf nor its temporary name


def test_interrupted_merged_export_keeps_the_previous_complete_folder(llama_run, monkeypatch, tmp_path):
    from tui_finetune.engine.export import merged

    out = tmp_path / "merged"
    first = _export(llama_run, "merged", out_dir=str(out), check=False)
    before = sorted(p.name for p in out.iterdir())

    monkeypatch.setattr(merged, "load_merged", lambda run: _Crashing())
    with pytest.raises(KeyboardInterrupt):
        _export(llama_run, "merged", out_dir=str(out))
    assert sorted(p.name for p in out.iterdir()) == before == first.files
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


class _Crashing:
    class generation_config:
        eos_token_id = None

    def save_pretrained(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt


def test_q4_k_m_without_llama_quantize_is_refused(llama_run, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ExportError, match="llama-quantize"):
        _export(llama_run, "gguf", "q4_k_m")
