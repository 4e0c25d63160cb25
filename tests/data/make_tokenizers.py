"""Write two tiny local tokenizers under tests/data/tokenizers/, for offline tests and demos.

Run from the repository root after make_samples.py: ``python tests/data/make_tokenizers.py``.

Each is a byte-level BPE (vocabulary 1000) trained on the sample data with the ``tokenizers``
library, with the special tokens and the *real* chat template of a model family:
``qwen2.5-chatml`` carries Qwen2.5-Instruct's template (ChatML, eos ``<|im_end|>``) and
``llama-3`` carries Meta-Llama-3-Instruct's (eos ``<|eot_id|>``). The template texts are copied
verbatim into tests/data/templates/*.json, which say where they come from. ``transformers``
loads the folders with ``AutoTokenizer.from_pretrained(path)`` as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
FAMILIES = {"qwen2.5-chatml": "qwen2.5-instruct.json", "llama-3": "llama-3-instruct.json"}


def training_texts() -> list[str]:
    texts = []
    for line in (HERE / "samples" / "instructions.messages.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [turn["content"] for turn in json.loads(line)["messages"]]
    texts += ["system", "user", "assistant", "Question:", "Answer:", "### Instruction:", "### Response:",
              "Below is an instruction that describes a task."]
    return texts


def build(name: str, template_file: str) -> None:
    spec = json.loads((HERE / "templates" / template_file).read_text(encoding="utf-8"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=spec["special_tokens"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(), trainer)
    out = HERE / "tokenizers" / name
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
              "bos_token": spec["bos_token"], "eos_token": spec["eos_token"], "pad_token": spec["pad_token"],
              "chat_template": spec["chat_template"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    for family, template in FAMILIES.items():
        build(family, template)
    print(f"wrote {HERE / 'tokenizers'}")
