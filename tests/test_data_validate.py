"""Validation: every error case in tests/data/broken/ gives its exact file:line message."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from tui_finetune.data.errors import DataError
from tui_finetune.data.formats import parse_columns
from tui_finetune.data.validate import raise_if_refused, validate_dataset

NO_ROWS = "no usable rows: fix the problems above"
TOO_MANY = ("of the rows would be dropped (the limit is 5%): fix the lines above, "
            "or pass --allow-drop to train on the rest")

BROKEN_CASES = {
    "malformed_json.jsonl": "{p}:3: invalid JSON (Unterminated string starting at) at column 45: fix the line or delete it",
    "empty.jsonl": "{p}: file is empty: add rows or remove the file",
    "no_usable_rows.jsonl": "{p}:1: field 'output' is empty: write it, or remove the row",
    "missing_column.jsonl": "{p}:4: field 'output' is missing (found 'instruction', 'answer'): add it, "
                            "or map another column with --columns reply=COLUMN",
    "type_change.jsonl": "{p}:3: field 'output' is a number here but text on line 1: "
                         "make 'output' a string in every row (put it in quotes)",
    "unknown_role.jsonl": "{p}:2: turn 1 has an unknown role 'narrator': "
                          "use system, user or assistant (ShareGPT: system, human, gpt)",
    "empty_assistant.jsonl": "{p}:1: turn 2 (assistant) is empty: write the reply, or remove the row",
    "not_utf8.jsonl": "{p}:2: not UTF-8: byte 0xE9 at column 48: the file looks like Windows-1252 (cp1252); "
                      "re-save it as UTF-8 (e.g. iconv -f CP1252 -t UTF-8 in.txt > out.txt)",
    "utf16.jsonl": "{p}:1: file is UTF-16 (it starts with the byte order mark 0xFF 0xFE): "
                   "re-save it as UTF-8 (in Notepad: Save as, Encoding: UTF-8)",
    "not_an_object.jsonl": "{p}:2: a JSON array where a row object was expected: "
                           "write one {{...}} object per line, or rename the file to .json",
    "bad_row.csv": "{p}:3: row has 3 fields but the header has 2: quote fields that contain commas (\"...\") "
                   "or fix the row",
    "malformed.json": "{p}:3: invalid JSON (Expecting ',' delimiter) at column 24: "
                      "fix the file (a JSON checker such as 'python -m json.tool FILE' shows the spot)",
    "not_rows.json": "{p}:1: expected a JSON array of rows or {{\"data\": [...]}}, found an object with keys 'rows': "
                     "put the rows in a top-level array, or under a \"data\" key",
    "no_assistant.jsonl": "{p}:1: no assistant turn: add the reply the model should learn, or remove the row",
    "ends_with_user.jsonl": "{p}:1: the conversation ends with a user turn: "
                            "add the assistant's reply, or remove the last turn",
}


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_each_broken_file_reports_its_exact_file_line_message_and_is_refused(data_dir: Path, name: str) -> None:
    path = data_dir / "broken" / name
    report = validate_dataset(path)
    assert str(report.problems[0]) == BROKEN_CASES[name].format(p=path)
    assert report.refused
    with pytest.raises(DataError) as err:
        raise_if_refused(report)
    assert str(err.value).splitlines()[0] == BROKEN_CASES[name].format(p=path)
    assert str(err.value).splitlines()[-1].startswith("refused: ")


def test_a_line_over_the_size_limit_is_reported_with_its_size_and_skipped(data_dir: Path) -> None:
    path = data_dir / "broken" / "line_too_long.jsonl"
    report = validate_dataset(path, max_line_bytes=1024)
    assert [str(p) for p in report.problems] == [f"{path}:2: line is 2.1 KiB, over the 1.0 KiB limit: "
                                                 "split the row or remove it"]
    assert (report.kept, report.dropped, report.drop_reasons) == (1, 1, {"line-too-long": 1})
    assert validate_dataset(path).kept == 2  # under the default 8 MiB limit the same line is fine


def test_a_parquet_file_that_is_not_parquet_is_refused_as_unreadable(data_dir: Path) -> None:
    path = data_dir / "broken" / "not_parquet.parquet"
    report = validate_dataset(path)
    message = str(report.problems[0])
    assert message.startswith(f"{path}: not a readable Parquet file (ArrowInvalid:")
    assert message.endswith(": re-export it, or convert it to .jsonl")
    assert report.refused and report.refusal == "a file could not be read: fix the problem above"


def test_wrong_columns_list_what_was_found_and_suggest_a_mapping(data_dir: Path) -> None:
    path = data_dir / "broken" / "wrong_columns.jsonl"
    with pytest.raises(DataError) as err:
        validate_dataset(path)
    assert str(err.value) == (f"{path}:1: no known format in these columns (found 'question', 'answer'): "
                              "map your columns with --columns prompt=question,reply=answer")
    report = validate_dataset(path, columns=parse_columns("prompt=question,reply=answer"))
    assert (report.format, report.kept, report.refused) == ("alpaca", 3, False)
    assert report.evidence == "mapped with --columns prompt=question,reply=answer (instruction/reply pairs)"


def test_a_folder_of_mixed_file_types_is_refused_naming_the_kinds(data_dir: Path) -> None:
    path = data_dir / "broken" / "mixed_folder"
    with pytest.raises(DataError) as err:
        validate_dataset(path)
    assert str(err.value) == (f"{path}: mixed file types in one folder (.csv: 1 file, .jsonl: 1 file): "
                              "keep one kind of file per folder, or point at a single file")


def test_bom_and_crlf_are_accepted_silently(data_dir: Path) -> None:
    report = validate_dataset(data_dir / "broken" / "bom_crlf.jsonl")
    assert (report.kept, report.dropped, report.problem_count, report.refused) == (4, 0, 0, False)
    assert report.format == "alpaca"
    assert report.columns_seen == ["instruction", "input", "output"]  # no BOM glued to the first key


def test_empty_file_refusal_names_the_file_and_no_usable_rows(data_dir: Path) -> None:
    report = validate_dataset(data_dir / "broken" / "empty.jsonl")
    assert report.refusal == NO_ROWS and report.rows == 0


@pytest.mark.parametrize("name,fmt,evidence", [
    ("instructions.alpaca.jsonl", "alpaca", "keys 'instruction', 'input', 'output' in 100 of the first 100 rows"),
    ("instructions.alpaca.json", "alpaca", "keys 'instruction', 'input', 'output' in 100 of the first 100 rows"),
    ("instructions.alpaca.tsv", "alpaca", "keys 'instruction', 'input', 'output' in 100 of the first 100 rows"),
    ("instructions.sharegpt.json", "sharegpt",
     'key "conversations" holds lists of {from, value} turns in 100 of the first 100 rows'),
    ("instructions.messages.jsonl", "messages",
     'key "messages" holds lists of {role, content} turns in 100 of the first 100 rows'),
    ("instructions.messages.parquet", "messages",
     'key "messages" holds lists of {role, content} turns in 100 of the first 100 rows'),
    ("instructions.prompt_completion.csv", "prompt_completion", "keys 'prompt', 'completion' in 100 of the first 100 rows"),
    ("instructions.txt", "text", "text files are plain text (one document per blank-line-separated block)"),
    ("instructions.md", "text", "text files are plain text (one document per blank-line-separated block)"),
])
def test_each_sample_file_is_detected_with_its_evidence_and_keeps_every_row(data_dir: Path, name: str, fmt: str,
                                                                           evidence: str) -> None:
    report = validate_dataset(data_dir / "samples" / name)
    assert (report.format, report.evidence) == (fmt, evidence)
    assert (report.rows, report.kept, report.problem_count, report.refused) == (240, 240, 0, False)


def test_dropping_over_five_percent_is_refused_unless_allowed(tmp_path: Path) -> None:
    good = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(94)]
    bad = ["{not json"] * 6
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(good + bad) + "\n", encoding="utf-8")
    report = validate_dataset(path)
    assert report.refused and report.refusal == f"6.0% {TOO_MANY}"
    allowed = validate_dataset(path, allow_drop=True)
    assert not allowed.refused and (allowed.kept, allowed.dropped) == (94, 6)
    path.write_text("\n".join(good + bad[:4]) + "\n", encoding="utf-8")  # 4 of 98 = 4.1%: accepted
    assert not validate_dataset(path).refused


def test_message_shows_the_first_20_problems_then_a_count(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(["{bad"] * 30 + [json.dumps({"text": "ok"})]) + "\n", encoding="utf-8")
    lines = validate_dataset(path, allow_drop=True).message().splitlines()
    assert lines[:20] == [f"{path}:{n}: invalid JSON (Expecting property name enclosed in double quotes) at column 2: "
                          "fix the line or delete it" for n in range(1, 21)]
    assert lines[20] == "... and 10 more problems"
    assert lines[21] == f"{path}: kept 1 of 31 rows; dropped 30 (invalid-json: 30)"


def test_format_override_and_unknown_format_name(data_dir: Path) -> None:
    path = data_dir / "samples" / "instructions.prompt_completion.csv"
    forced = validate_dataset(path, "alpaca", parse_columns("prompt=prompt,reply=completion"))
    assert forced.format == "alpaca" and forced.evidence.startswith("forced with --format alpaca")
    with pytest.raises(DataError, match=r"--format alpacca: unknown format: .* Did you mean 'alpaca'\?"):
        validate_dataset(path, "alpacca")


def test_bad_columns_argument_names_the_fix() -> None:
    with pytest.raises(DataError, match="'prompt' is not FIELD=COLUMN"):
        parse_columns("prompt")
    with pytest.raises(DataError, match="unknown field 'promt'.* Did you mean 'prompt'"):
        parse_columns("promt=q")
    assert parse_columns("instruction=q, output=a") == {"prompt": "q", "reply": "a"}


def test_a_folder_of_text_files_is_one_document_per_file(tmp_path: Path) -> None:
    for name, body in (("a.txt", "First story.\n\nIt has two paragraphs.\n"), ("b.md", "# Second\n")):
        (tmp_path / name).write_text(body, encoding="utf-8")
    report = validate_dataset(tmp_path)
    assert (report.format, report.kept, len(report.files)) == ("text", 2, 2)
    assert report.evidence == "text files are plain text (one document per file)"


def test_a_folder_of_jsonl_files_numbers_lines_per_file(tmp_path: Path) -> None:
    (tmp_path / "1.jsonl").write_text(json.dumps({"text": "a"}) + "\n", encoding="utf-8")
    (tmp_path / "2.jsonl").write_text(json.dumps({"text": "b"}) + "\n{oops\n", encoding="utf-8")
    report = validate_dataset(tmp_path, allow_drop=True)
    assert report.kept == 2
    assert str(report.problems[0]).startswith(f"{tmp_path / '2.jsonl'}:2: invalid JSON")


def test_validation_streams_a_large_file_without_reading_it_whole(tmp_path: Path) -> None:
    row = json.dumps({"instruction": "Count to three.", "input": "", "output": "one, two, three " * 8}) + "\n"
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(40_000):
            f.write(row)
    size = path.stat().st_size
    tracemalloc.start()
    report = validate_dataset(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.kept == 40_000
    assert size > 6_000_000 and peak < size / 10, (size, peak)


@pytest.mark.parametrize("name,data,expected", [
    ("big.jsonl", b'{"text": ' + b"1" * 5000 + b'}\n{"text": "ok"}\n',
     "{p}:1: invalid JSON (a number with too many digits): fix the line or delete it"),
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     "{p}:1: invalid JSON (nested too deeply): fix the line or delete it"),
    ("surrogate.jsonl", b'{"text": "\\ud800"}\n', "{p}:1: field 'text' has an unpaired surrogate escape (\\ud800): "
                                                 "fix the escape, or remove the row"),
    ("quote.csv", b'text\n"unterminated\nok\n',
     "{p}:2: unreadable CSV row (unexpected end of data): fix the quoting on this row"),
    ("blank.jsonl", b"\n\n  \n", "{p}: file has no rows: add rows or remove the file"),
    ("header_only.csv", b"a,b\n", "{p}: file has no rows: add rows or remove the file"),
])
def test_tricky_inputs_give_exact_messages(tmp_path: Path, name: str, data: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    report = validate_dataset(path)
    assert str(report.problems[0]) == expected.format(p=path)
    assert report.refused


def test_repeated_data_keys_in_a_json_file_use_the_last_like_json_loads(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"data": 1, "x": [1],\n "data": [\n  {"text": "hi"},\n  {"text": 5}\n]}', encoding="utf-8")
    report = validate_dataset(path, allow_drop=True)
    assert (report.kept, report.dropped) == (1, 1)
    assert str(report.problems[0]) == (f"{path}:4: field 'text' is a number here but text on line 3: "
                                       "make 'text' a string in every row (put it in quotes)")
