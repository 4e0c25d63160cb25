"""Property tests: whatever bytes or JSON a user brings, the data path answers with a clean message.

A clean answer is a ValidationReport (whose message names file:line problems) or a DataError; never
a traceback. Rendering the rows that pass must not crash either, and their labels must be -100
exactly where the prompt is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tui_finetune.core.recipe import DataSpec
from tui_finetune.data.check import check_dataset
from tui_finetune.data.errors import DataError
from tui_finetune.data.tokenizer import byte_level_tokenizer
from tui_finetune.data.validate import validate_dataset

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZER = byte_level_tokenizer()
EXTENSIONS = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
turn = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "gpt", "human", "narrator", ""]) | json_values,
    "content": st.text(max_size=20) | json_values, "from": st.sampled_from(["human", "gpt"]),
    "value": st.text(max_size=20)})
row = st.fixed_dictionaries({}, optional={
    "instruction": st.text(max_size=20) | json_values, "input": st.text(max_size=10) | json_values,
    "output": st.text(max_size=20) | json_values, "prompt": st.text(max_size=10), "completion": st.text(max_size=10),
    "text": st.text(max_size=20) | json_values, "messages": st.lists(turn, max_size=4) | json_values,
    "conversations": st.lists(turn, max_size=4)}) | json_values


def _answer_is_clean(path: Path, **kwargs: object) -> None:
    try:
        report = validate_dataset(path, **kwargs)
    except DataError as err:
        assert str(err).strip()
        return
    message = report.message()
    assert isinstance(message, str) and message.strip()
    message.encode("utf-8")  # printable: no lone surrogates leak into messages
    for problem in report.problems:
        assert str(problem).startswith(str(path)) and problem.fix
    assert report.kept + report.dropped == report.rows


@SETTINGS
@given(data=st.binary(max_size=400), ext=st.sampled_from(EXTENSIONS))
def test_arbitrary_bytes_in_any_supported_file_give_a_clean_message(data: bytes, ext: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{ext}"
        path.write_bytes(data)
        _answer_is_clean(path)
        _answer_is_clean(path, data_format="messages", max_line_bytes=64)


@SETTINGS
@given(rows=st.lists(row, max_size=6), as_array=st.booleans())
def test_arbitrary_json_rows_give_a_clean_message_and_render_without_crashing(rows: list, as_array: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if as_array:
            path = Path(tmp) / "data.json"
            path.write_text(json.dumps(rows), encoding="utf-8")
        else:
            path = Path(tmp) / "data.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        _answer_is_clean(path)
        try:
            result = check_dataset(path, TOKENIZER, "bytes", DataSpec(seq_len=64), allow_drop=True)
        except DataError as err:
            assert str(err).strip()
            return
        assert result.usable == (not result.refusal)
        if result.example is not None:
            assert any(trained for _, trained in result.example.segments)
