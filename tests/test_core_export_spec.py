"""export.json and ExportSpec, without torch: what the CLI and the TUI read."""

from __future__ import annotations

import pytest

from tui_finetune.core.export_spec import (CheckResult, ExportError, ExportResult, ExportSpec, read_exports,
                                           record_export)


def test_spec_refuses_unknown_targets_and_formats_with_the_choices():
    with pytest.raises(ExportError, match="adapter, merged, gguf, ollama"):
        ExportSpec("onnx")
    with pytest.raises(ExportError, match="f16, q8_0"):
        ExportSpec("gguf", quant="q2")


def test_default_folder_names_the_target_and_format(tmp_path):
    assert ExportSpec("gguf", quant="q8_0").folder(tmp_path) == tmp_path / "exports" / "gguf-q8_0"
    assert ExportSpec("merged").folder(tmp_path) == tmp_path / "exports" / "merged"
    assert ExportSpec("adapter", out_dir=str(tmp_path / "x")).folder(tmp_path) == tmp_path / "x"


def test_export_json_keeps_one_entry_per_export_and_a_skipped_check_does_not_fail(tmp_path):
    ok = ExportResult("gguf", "f16", "a.gguf", checks=[CheckResult("x", True, ""), CheckResult("y", False, "", True)])
    bad = ExportResult("merged", "", "m", checks=[CheckResult("x", False, "differs")])
    record_export(tmp_path, ok)
    record_export(tmp_path, bad)
    record_export(tmp_path, ok)
    results = read_exports(tmp_path)
    assert [(r.target, r.passed) for r in results] == [("merged", False), ("gguf", True)]
    assert "FAIL" in results[0].summary() and "skip" in results[1].summary()
