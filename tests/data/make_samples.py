"""Write the sample datasets under tests/data/samples/ and the broken files under tests/data/broken/.

Run from the repository root: ``python tests/data/make_samples.py``. The output is deterministic
(a fixed seed, no clock), so re-running it changes nothing unless this script changes.

The samples are one small instruction dataset (240 tasks) written in every supported format. Each
answer is computed, so every one is correct: arithmetic, capitals, unit conversions, word
reversal, rhymes, letter counts, sorting, even/odd. The answers have a fixed, short shape so a
tiny model on a CPU visibly learns the format.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = HERE / "samples"
BROKEN = HERE / "broken"
SYSTEM = "You are a concise assistant. Answer in one short sentence."

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Russia", "Moscow"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Colombia", "Bogotá"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Iran", "Tehran"), ("Saudi Arabia", "Riyadh"), ("New Zealand", "Wellington"), ("Cuba", "Havana"),
    ("Iceland", "Reykjavík"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"), ("Philippines", "Manila"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
]
RHYMES = {
    "cat": ("hat", "bat", "mat"), "dog": ("log", "fog", "frog"), "light": ("night", "bright", "kite"),
    "cake": ("lake", "bake", "snake"), "moon": ("spoon", "tune", "soon"), "star": ("car", "far", "jar"),
    "tree": ("bee", "sea", "free"), "rain": ("train", "plain", "chain"), "bell": ("shell", "well", "spell"),
    "king": ("ring", "sing", "wing"), "boat": ("coat", "goat", "note"), "sun": ("run", "fun", "bun"),
    "book": ("look", "cook", "hook"), "hand": ("sand", "band", "land"), "cold": ("gold", "bold", "old"),
    "day": ("play", "say", "way"), "ball": ("tall", "wall", "call"), "pen": ("ten", "hen", "men"),
}
WORDS = ["planet", "garden", "window", "rocket", "silver", "pencil", "castle", "dragon", "forest", "guitar",
         "island", "jacket", "kitten", "lemon", "market", "number", "orange", "pocket", "rabbit", "summer",
         "tunnel", "velvet", "winter", "yellow", "anchor", "bridge", "candle", "desert", "engine", "falcon"]
UNITS = [  # (from, to, factor as a fraction num/den)
    ("kilometres", "metres", 1000, 1), ("kilograms", "grams", 1000, 1), ("hours", "minutes", 60, 1),
    ("minutes", "seconds", 60, 1), ("metres", "centimetres", 100, 1), ("litres", "millilitres", 1000, 1),
    ("feet", "inches", 12, 1), ("inches", "centimetres", 254, 100),
]


def _number(num: int, den: int) -> str:
    """num/den written without trailing zeros (den is a power of ten)."""
    whole, rest = divmod(num, den)
    if rest == 0:
        return str(whole)
    digits = len(str(den)) - 1
    return f"{whole}.{rest:0{digits}d}".rstrip("0")


def make_tasks(n: int = 240, seed: int = 1234) -> list[tuple[str, str, str]]:
    """(instruction, input, output) triples, all different, answers computed."""
    rng = random.Random(seed)
    makers = [_arithmetic, _capital, _unit, _reverse, _rhyme, _count, _sort, _parity, _temperature]
    tasks: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    i = 0
    while len(tasks) < n:
        task = makers[i % len(makers)](rng)
        i += 1
        if (task[0], task[1]) not in seen:
            seen.add((task[0], task[1]))
            tasks.append(task)
    return tasks


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice("+-×÷")
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if op == "+":
        return f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}"
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", "", f"{a} - {b} = {a - b}"
    if op == "×":
        a, b = a % 13 + 2, b % 13 + 2
        return f"What is {a} × {b}?", "", f"{a} × {b} = {a * b}"
    b = b % 11 + 2
    return f"What is {a * b} ÷ {b}?", "", f"{a * b} ÷ {b} = {a}"


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", "", f"The capital of {country} is {city}."


def _unit(rng: random.Random) -> tuple[str, str, str]:
    src, dst, num, den = rng.choice(UNITS)
    value = rng.randint(2, 30)
    return f"Convert {value} {src} to {dst}.", "", f"{value} {src} is {_number(value * num, den)} {dst}."


def _temperature(rng: random.Random) -> tuple[str, str, str]:
    celsius = rng.randrange(-20, 45, 5)
    return f"Convert {celsius} °C to Fahrenheit.", "", f"{celsius} °C is {celsius * 9 // 5 + 32} °F."


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "Reverse the letters of this word.", word, word[::-1]


def _rhyme(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(RHYMES))
    a, b, c = RHYMES[word]
    return f"Give three words that rhyme with '{word}'.", "", f"{a}, {b}, {c}"


def _count(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "How many letters does this word have?", word, f"'{word}' has {len(word)} letters."


def _sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), 5)
    return ("Sort these numbers from smallest to largest.", ", ".join(map(str, numbers)),
            ", ".join(map(str, sorted(numbers))))


def _parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 999)
    return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def user_text(instruction: str, extra: str) -> str:
    """The user turn of an instruction, the way the loader joins instruction and input."""
    return f"{instruction}\n\n{extra}" if extra else instruction


# ---------------------------------------------------------------- the sample files

def write_samples(tasks: list[tuple[str, str, str]], out: Path = SAMPLES) -> None:
    SAMPLES = out  # noqa: N806 - the folder the files below are written to
    SAMPLES.mkdir(parents=True, exist_ok=True)
    alpaca = [{"instruction": i, "input": x, "output": o} for i, x, o in tasks]
    _write_jsonl(SAMPLES / "instructions.alpaca.jsonl", alpaca)
    (SAMPLES / "instructions.alpaca.json").write_text(json.dumps({"data": alpaca}, ensure_ascii=False, indent=1)
                                                      + "\n", encoding="utf-8")
    sharegpt = []
    for k, (i, x, o) in enumerate(tasks):
        turns = [{"from": "system", "value": SYSTEM}] if k % 3 == 0 else []
        turns += [{"from": "human", "value": user_text(i, x)}, {"from": "gpt", "value": o}]
        if k % 4 == 0:  # a two-exchange conversation
            i2, x2, o2 = tasks[(k + 1) % len(tasks)]
            turns += [{"from": "human", "value": user_text(i2, x2)}, {"from": "gpt", "value": o2}]
        sharegpt.append({"conversations": turns})
    (SAMPLES / "instructions.sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False, indent=1) + "\n",
                                                        encoding="utf-8")
    messages = []
    for k, (i, x, o) in enumerate(tasks):
        turns = [{"role": "system", "content": SYSTEM}] if k % 3 == 0 else []
        messages.append({"messages": turns + [{"role": "user", "content": user_text(i, x)},
                                              {"role": "assistant", "content": o}]})
    _write_jsonl(SAMPLES / "instructions.messages.jsonl", messages)
    with (SAMPLES / "instructions.prompt_completion.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        for i, x, o in tasks:
            writer.writerow([f"Question: {user_text(i, x)}\nAnswer:", f" {o}"])
    with (SAMPLES / "instructions.alpaca.tsv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, dialect="excel-tab")
        writer.writerow(["instruction", "input", "output"])
        writer.writerows(tasks)
    _write_parquet(SAMPLES / "instructions.messages.parquet", messages)
    (SAMPLES / "instructions.txt").write_text(
        "\n\n".join(f"Question: {user_text(i, x).replace(chr(10) * 2, ' ')}\nAnswer: {o}" for i, x, o in tasks) + "\n",
        encoding="utf-8")
    (SAMPLES / "instructions.md").write_text(
        "\n\n".join(f"**Q:** {user_text(i, x).replace(chr(10) * 2, ' ')}  \n**A:** {o}" for i, x, o in tasks) + "\n",
        encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


# ---------------------------------------------------------------- the broken files

def write_broken(out: Path = BROKEN) -> None:
    """One file per error case; tests/test_data_validate.py asserts each message exactly."""
    BROKEN = out  # noqa: N806
    BROKEN.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"instruction": f"What is {a} + {a}?", "input": "", "output": f"{a} + {a} = {2 * a}"})
            for a in range(2, 6)]
    files: dict[str, bytes] = {
        "malformed_json.jsonl": _lines(good[:2] + ['{"instruction": "What is 2 + 2?", "output": "4}'] + good[2:]),
        "empty.jsonl": b"",
        "no_usable_rows.jsonl": _lines([json.dumps({"instruction": "Say hi.", "input": "", "output": " "})] * 3),
        "wrong_columns.jsonl": _lines([json.dumps({"question": "What is 2 + 2?", "answer": "4"})] * 3),
        "missing_column.jsonl": _lines(good[:3] + [json.dumps({"instruction": "Name a colour.", "answer": "Red"})]),
        "type_change.jsonl": _lines(good[:2] + [json.dumps({"instruction": "What is 3 + 3?", "output": 6})]),
        "unknown_role.jsonl": _lines([json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello!"}]}),
                                      json.dumps({"messages": [{"role": "narrator", "content": "Once upon a time"},
                                                               {"role": "assistant", "content": "Go on."}]})]),
        "empty_assistant.jsonl": _lines([json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": ""}]})]),
        "line_too_long.jsonl": _lines(good[:1] + [json.dumps({"instruction": "Repeat.", "input": "",
                                                              "output": "la " * 700})]),
        "not_utf8.jsonl": _lines(good[:1]) + '{"instruction": "Name a drink.", "output": "café"}\n'.encode("cp1252"),
        "bom_crlf.jsonl": b"\xef\xbb\xbf" + "".join(g + "\r\n" for g in good).encode(),
        "utf16.jsonl": "".join(g + "\n" for g in good).encode("utf-16"),
        "not_an_object.jsonl": _lines(good[:1] + ['["What is 2 + 2?", "4"]']),
        "bad_row.csv": b"instruction,output\nWhat is 2 + 2?,4\nName two colours,red,blue\n",
        "malformed.json": b'[\n  {"instruction": "What is 2 + 2?", "output": "4"},\n  {"instruction": "Hi" "output": "Hello"}\n]\n',
        "not_rows.json": b'{"rows": [{"instruction": "What is 2 + 2?", "output": "4"}]}\n',
        "not_parquet.parquet": b"PAR1 this is not really a parquet file",
        "no_assistant.jsonl": _lines([json.dumps({"messages": [{"role": "user", "content": "Hi"}]})]),
        "ends_with_user.jsonl": _lines([json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello!"},
                                                                 {"role": "user", "content": "Bye"}]})]),
    }
    for name, data in files.items():
        (BROKEN / name).write_bytes(data)
    mixed = BROKEN / "mixed_folder"
    mixed.mkdir(exist_ok=True)
    (mixed / "a.jsonl").write_bytes(_lines(good))
    (mixed / "b.csv").write_bytes(b"instruction,output\nWhat is 2 + 2?,4\n")


def _lines(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


if __name__ == "__main__":
    write_samples(make_tasks())
    write_broken()
    print(f"wrote {SAMPLES} and {BROKEN}")
