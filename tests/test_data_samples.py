"""The committed sample and broken data: reproducible from the script, and every answer correct."""

from __future__ import annotations

import importlib.util
import json
import re
from fractions import Fraction
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
RIME = {  # the last stressed vowel and what follows it (ARPAbet), written independently of the script
    "AE T": "cat hat bat mat", "AO G": "dog log fog frog", "AY T": "light night bright kite",
    "EY K": "cake lake bake snake", "UW N": "moon spoon tune soon", "AA R": "star car far jar",
    "IY": "tree bee sea free", "EY N": "rain train plain chain", "EH L": "bell shell well spell",
    "IH NG": "king ring sing wing", "OW T": "boat coat goat note", "AH N": "sun run fun bun",
    "UH K": "book look cook hook", "AE N D": "hand sand band land", "OW L D": "cold gold bold old",
    "EY": "day play say way", "AO L": "ball tall wall call", "EH N": "pen ten hen men",
}
SOUND = {word: rime for rime, words in RIME.items() for word in words.split()}


def load_script():
    spec = importlib.util.spec_from_file_location("make_samples", DATA / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_script_reproduces_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    script = load_script()
    script.write_samples(script.make_tasks(), tmp_path / "samples")
    script.write_broken(tmp_path / "broken")
    for folder in ("samples", "broken"):
        made = sorted(p.relative_to(tmp_path / folder) for p in (tmp_path / folder).rglob("*") if p.is_file())
        committed = sorted(p.relative_to(DATA / folder) for p in (DATA / folder).rglob("*") if p.is_file())
        assert made == committed
        for rel in made:
            assert (tmp_path / folder / rel).read_bytes() == (DATA / folder / rel).read_bytes(), rel


def _check(instruction: str, extra: str, output: str) -> str:
    """Recompute the answer independently; returns the task's category."""
    if m := re.fullmatch(r"What is (\d+) ([-+×÷]) (\d+)\?", instruction):
        a, op, b = int(m[1]), m[2], int(m[3])
        value = {"+": a + b, "-": a - b, "×": a * b, "÷": Fraction(a, b)}[op]
        assert output == f"{a} {op} {b} = {value}"
        return "arithmetic"
    if m := re.fullmatch(r"What is the capital of (.+)\?", instruction):
        assert output.startswith(f"The capital of {m[1]} is ") and output.endswith(".")
        return "capital"
    if m := re.fullmatch(r"Convert (-?\d+) °C to Fahrenheit\.", instruction):
        assert output == f"{m[1]} °C is {Fraction(int(m[1])) * 9 / 5 + 32} °F."
        return "temperature"
    if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", instruction):
        factors = {("kilometres", "metres"): 1000, ("kilograms", "grams"): 1000, ("hours", "minutes"): 60,
                   ("minutes", "seconds"): 60, ("metres", "centimetres"): 100, ("litres", "millilitres"): 1000,
                   ("feet", "inches"): 12, ("inches", "centimetres"): Fraction(254, 100)}
        value = int(m[1]) * factors[(m[2], m[3])]
        assert Fraction(output.split(" is ")[1].split(" ")[0]) == value
        return "unit"
    if instruction == "Reverse the letters of this word.":
        assert output == extra[::-1] and len(extra) > 2
        return "reverse"
    if m := re.fullmatch(r"Give three words that rhyme with '(\w+)'\.", instruction):
        words = output.split(", ")
        assert len(set(words)) == 3 and m[1] not in words
        assert all(SOUND[w] == SOUND[m[1]] for w in words), (m[1], words)
        return "rhyme"
    if instruction == "How many letters does this word have?":
        assert output == f"'{extra}' has {len(extra)} letters."
        return "count"
    if instruction == "Sort these numbers from smallest to largest.":
        assert output == ", ".join(map(str, sorted(int(x) for x in extra.split(", "))))
        return "sort"
    if m := re.fullmatch(r"Is (\d+) even or odd\?", instruction):
        assert output == f"{m[1]} is {'even' if int(m[1]) % 2 == 0 else 'odd'}."
        return "parity"
    raise AssertionError(f"unknown task: {instruction}")


def test_every_sample_answer_is_correct_and_the_tasks_are_varied() -> None:
    rows = [json.loads(line) for line in (DATA / "samples" / "instructions.alpaca.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) >= 200
    categories = [_check(r["instruction"], r["input"], r["output"]) for r in rows]
    assert len(set(categories)) == 9 and min(categories.count(c) for c in set(categories)) >= 10
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
