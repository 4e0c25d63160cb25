"""The demo tokenizer's conversion cleans up after a check that was killed half-way (data/demo_tokenizer.py)."""

from __future__ import annotations

import os
import time

from tui_finetune.data.demo_tokenizer import STALE_SCRATCH_SECONDS, remove_stale_scratch


def test_a_killed_conversions_scratch_is_removed_and_a_running_ones_is_left_alone(tmp_path):
    folder = tmp_path / "tokenizers" / "gemma-3-270m"
    folder.parent.mkdir()
    killed, running = folder.parent / "gemma-3-270m.tmpk1ll3d", folder.parent / "gemma-3-270m.tmpRunn1ng"
    other = folder.parent / "qwen.tmp0ther"
    for scratch in (killed, running, other):
        scratch.mkdir()
        (scratch / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    long_ago = time.time() - STALE_SCRATCH_SECONDS - 60
    for scratch in (killed, other):
        os.utime(scratch, (long_ago, long_ago))

    assert remove_stale_scratch(folder) == [killed]
    assert not killed.exists() and running.is_dir() and other.is_dir()  # another model's scratch is not ours
