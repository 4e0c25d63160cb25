"""Token-budget bins of the training rows: flat packing (``data.packing = true``), bins of at most
``data.seq_len`` tokens flattened into one row, and length grouping (``data.group_by_length``, the default),
groups of rows of similar length that padded hold at most a budget of tokens.

Why bins: on short rows a forward and backward pass costs nearly the same whatever its token count (each
pass dequantises every NF4 weight three times and launches the same kernels), so on real data, where most
rows are a few hundred tokens, the lever is fewer, fuller passes (issue #14). Flattening only the
``micro_batch`` rows the Trainer already grouped (data/collate.py) removes padding but no pass.

* ``pack_lengths``: best-fit decreasing over the rows' lengths. Each row lands in exactly one bin, whole
  (rows were already truncated to ``seq_len`` when rendered; one longer than the budget gets a bin of its
  own); no bin holds more than ``max_tokens``. A pure function of the lengths, the budget and ``seed``
  (which only orders rows of equal length), so a resumed run rebuilds the very same bins.
* ``pack_dataset``: each bin becomes ONE training example, what ``DataCollatorWithFlattening`` (the
  packing collator) makes of its rows: ``input_ids`` and ``labels`` concatenated, the first label of each
  row -100 (no row predicts across a boundary), ``position_ids`` restarting at 0 for each row (the
  attention mask transformers builds from them keeps the rows apart). ``length`` is the bin's tokens (the
  fit-check's longest batch is then the fullest bins) and ``sample_ids`` its rows' ids (the trace).
* ``bins_per_step``: the recipe's effective batch counts rows; with bins, ``train.micro_batch`` counts bins
  and the accumulation is lowered so an optimizer step still sees about as many rows on average. The
  number of bins a step takes on each device is fixed for the run (``PackedBins.bins_per_step``): an OOM
  that halves the micro-batch doubles the accumulation, as it does for rows, so a resume skips exactly
  the bins already trained.
* ``group_lengths`` / ``group_dataset``: a group is stored like a bin (rows concatenated, ``position_ids``
  restarting per row, so ``collate.split_bin`` cuts it back), but with the labels untouched, and trained as
  ordinary padded rows (``collate.GroupCollator``): attention as without grouping. Its budget is
  ``group_budget``: ``micro_batch x min(seq_len, the longest row)`` padded tokens, the worst case of a
  micro-batch of rows, so the planner and the fit-check size it unchanged. One group is one micro-batch
  (the Trainer's micro-batch is 1) and ``bins_per_step(effective, devices, 1, rows a group)`` groups make a
  step. An OOM halves the recipe's micro-batch, so the budget: the groups are rebuilt and the step size
  chosen again (engine/packed_training.py).

No torch import here: transformers' collator is called with numpy tensors (return_tensors="np").
"""

from __future__ import annotations

import random
import uuid
from bisect import bisect_left, insort
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tui_finetune.data.render import IGNORE_INDEX


@dataclass(frozen=True)
class PackedBins:
    """What packing or grouping made of a run's training rows, and how many bins a step takes (run.json
    ``packing``)."""

    rows: int
    bins: int
    tokens: int
    """The rows' tokens, all of them in some bin."""
    seq_len: int
    """The budget of one bin: ``data.seq_len`` tokens (flat), or padded tokens (grouped: ``group_budget``)."""
    effective_batch: int = 0
    """The recipe's effective batch in rows that ``bins_per_step`` was chosen for."""
    bins_per_step: int = 0
    """Bins one device trains per optimizer step (micro-batch x accumulation), fixed for the run."""
    kind: str = "flat"
    """``flat`` (``data.packing``: one row of rows, no padding) or ``grouped`` (``data.group_by_length``: padded
    rows of similar length, one group a micro-batch). A record from before grouping existed is flat."""
    padded: int = 0
    """Grouped: the groups' tokens padded (each group's rows x its longest); flat: 0 (nothing is padded)."""

    @property
    def rows_per_bin(self) -> float:
        return self.rows / max(self.bins, 1)

    @property
    def fill(self) -> float:
        """Flat: the bins' tokens over their capacity (bins x seq_len); grouped: the real share of the padded tokens."""
        if self.kind == "grouped":
            return self.tokens / max(self.padded, 1)
        return self.tokens / max(self.bins * self.seq_len, 1)

    def accumulation(self, micro_batch: int) -> int:
        """The accumulation that makes ``bins_per_step`` at this micro-batch (of bins)."""
        return max(1, self.bins_per_step // max(micro_batch, 1))

    def same_bins(self, other: PackedBins) -> bool:
        """Built from the same rows at the same budget, so ``other``'s step size still applies."""
        return ((self.kind, self.rows, self.bins, self.tokens, self.seq_len, self.padded)
                == (other.kind, other.rows, other.bins, other.tokens, other.seq_len, other.padded))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackedBins | None:
        try:
            counts = {k: int(data[k]) for k in ("rows", "bins", "tokens", "seq_len", "effective_batch",
                                                "bins_per_step")}
            return cls(**counts, kind=str(data.get("kind", "flat")), padded=int(data.get("padded", 0)))
        except (KeyError, TypeError, ValueError):
            return None


def longest_first(lengths: list[int], seed: int) -> list[int]:
    """Row indices, longest first; rows of equal length in an order shuffled by ``seed`` (deterministic)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    return order


def pack_lengths(lengths: list[int], max_tokens: int, seed: int = 0) -> list[list[int]]:
    """Best-fit decreasing: row indices grouped into bins of at most ``max_tokens`` tokens.

    Rows go longest first (ties in an order shuffled by ``seed``), each into the bin it fills the most,
    else a new bin. Each bin lists its rows in dataset order; bins come in the order they were opened."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    order = longest_first(lengths, seed)
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (tokens still free, bin), sorted: the best fit is the first that fits
    for i in order:
        need = int(lengths[i])
        at = bisect_left(rooms, (need, -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
        else:
            room, b = max_tokens, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            insort(rooms, (room - need, b))
    return [sorted(b) for b in bins]


def group_lengths(lengths: list[int], max_padded_tokens: int, seed: int = 0) -> list[list[int]]:
    """Rows of similar length grouped so that each group, padded to its longest row, holds at most
    ``max_padded_tokens`` tokens (rows x longest): ``data.group_by_length``'s bins, one padded pass each.

    Rows go longest first (ties in an order shuffled by ``seed``); a group takes the next rows while
    (rows + 1) x its first (longest) row still fits, so neighbours in length share a pass and padding
    stays small. A row longer than the budget gets a group of its own. Each group lists its rows in
    dataset order; groups come longest first. A pure function, so a resume rebuilds the same groups."""
    if max_padded_tokens < 1:
        raise ValueError("max_padded_tokens must be at least 1")
    order = longest_first(lengths, seed)
    groups: list[list[int]] = []
    widest = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * widest <= max_padded_tokens:
            groups[-1].append(i)
            continue
        groups.append([i])
        widest = max(int(lengths[i]), 1)
    return [sorted(g) for g in groups]


def bins_per_step(effective_rows: int, devices: int, micro_batch: int, rows_per_bin: float) -> int:
    """Bins per device per optimizer step: ``micro_batch`` x the accumulation that keeps about
    ``effective_rows`` rows a step, ``max(1, round(effective_rows / (micro_batch x devices x rows_per_bin)))``."""
    accumulation = max(1, round(effective_rows / (micro_batch * max(devices, 1) * max(rows_per_bin, 1e-9))))
    return micro_batch * accumulation


def flatten_rows(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """One bin as one example: ``DataCollatorWithFlattening`` on its rows, as plain lists."""
    from transformers import DataCollatorWithFlattening

    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                      return_tensors="np")(rows)
    return {k: [int(x) for x in flat[k][0].tolist()] for k in ("input_ids", "labels", "position_ids")}


def concatenate_rows(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """One group as one example: its rows' ``input_ids`` and ``labels`` concatenated as they are (no label
    changed: ``split_bin`` gives back the very rows) and ``position_ids`` restarting at 0 for each row."""
    out: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids = [int(x) for x in row["input_ids"]]
        out["input_ids"] += ids
        out["labels"] += [int(x) for x in row.get("labels", ids)]
        out["position_ids"] += list(range(len(ids)))
    return out


def group_budget(micro_batch: int, seq_len: int, longest_row: int) -> int:
    """A group's padded tokens: ``micro_batch x min(seq_len, longest_row)``, the padded worst case of a
    micro-batch of rows, which is what the planner, auto-fit and the fit-check size."""
    return max(1, micro_batch * min(seq_len, longest_row or seq_len))


def pack_dataset(dataset: Any, seq_len: int, seed: int, cache_dir: str | Path | None = None) -> tuple[Any, PackedBins]:
    """The bins of ``dataset``'s rows as a ``datasets.Dataset`` (one bin a row, see the module docstring),
    written to Arrow in ``cache_dir`` (default: a temporary folder removed at exit), and what packing made."""
    lengths = [int(n) for n in dataset["length"]]
    bins = pack_lengths(lengths, seq_len, seed)
    packed = _bins_dataset(dataset, bins, flatten_rows, lambda members: sum(lengths[i] for i in members), cache_dir)
    return packed, PackedBins(rows=len(lengths), bins=len(bins), tokens=sum(lengths), seq_len=seq_len)


def group_dataset(dataset: Any, budget: int, seed: int, cache_dir: str | Path | None = None) -> tuple[Any, PackedBins]:
    """``dataset``'s rows in groups of similar length (``group_lengths``) of at most ``budget`` padded tokens,
    one group a row of a ``datasets.Dataset`` (``concatenate_rows``); ``length`` is the group's padded tokens
    (rows x its longest), so the fit-check's longest batch is the group with the most of them."""
    lengths = [int(n) for n in dataset["length"]]
    groups = group_lengths(lengths, budget, seed)

    def padded(members: list[int]) -> int:
        return len(members) * max(lengths[i] for i in members)

    grouped = _bins_dataset(dataset, groups, concatenate_rows, padded, cache_dir)
    return grouped, PackedBins(rows=len(lengths), bins=len(groups), tokens=sum(lengths), seq_len=budget,
                               kind="grouped", padded=sum(padded(g) for g in groups))


def _bins_dataset(dataset: Any, bins: list[list[int]], join: Callable[[list[dict[str, Any]]], dict[str, list[int]]],
                  length_of: Callable[[list[int]], int], cache_dir: str | Path | None) -> Any:
    """Each bin of row indices as one example (``join`` of its rows, ``length_of`` its indices, its rows'
    ``sample_ids``), written to Arrow in ``cache_dir`` (default: a temporary folder removed at exit)."""
    import datasets

    from tui_finetune.data.prepare import temporary_cache_dir

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "position_ids": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32"),
                                  "sample_ids": datasets.Sequence(datasets.Value("int64"))})

    def examples() -> Iterator[dict[str, Any]]:
        for members in bins:
            rows = [dataset[i] for i in members]
            yield {**join(rows), "length": length_of(members),
                   "sample_ids": [int(r.get("sample_id", i)) for r, i in zip(rows, members)]}

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        packed = datasets.Dataset.from_generator(examples, features=features,
                                                 cache_dir=str(cache_dir or temporary_cache_dir()),
                                                 fingerprint=uuid.uuid4().hex)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return packed


def describe_packing(packed: PackedBins, micro_batch: int, row_accumulation: int, devices: int = 1) -> str:
    """The one line a run logs: ``packing: 480 rows -> 86 bins of <= 2048 tokens (5.6 rows a bin, 91% full);
    accumulation 16 -> 3, so a step still sees about 16 rows``."""
    accumulation = packed.accumulation(micro_batch)
    seen = packed.bins_per_step * max(devices, 1) * packed.rows_per_bin
    return (f"packing: {packed.rows} rows -> {packed.bins} bins of <= {packed.seq_len} tokens "
            f"({packed.rows_per_bin:.1f} rows a bin, {packed.fill:.0%} full); accumulation {row_accumulation} -> "
            f"{accumulation} at micro-batch {micro_batch} bin(s), so a step sees about {seen:.0f} rows "
            f"(the recipe's effective batch: {packed.effective_batch})")


def describe_grouping(grouped: PackedBins, row_accumulation: int, devices: int = 1) -> str:
    """The one line a grouped run logs: ``grouping: 480 rows -> 80 groups of <= 2048 padded tokens (6.0 rows
    a group, 93% real tokens); accumulation 16 -> 3, so a step sees about 18 rows``."""
    seen = grouped.bins_per_step * max(devices, 1) * grouped.rows_per_bin
    return (f"grouping: {grouped.rows} rows -> {grouped.bins} groups of <= {grouped.seq_len} padded tokens "
            f"({grouped.rows_per_bin:.1f} rows a group, {grouped.fill:.0%} real tokens); accumulation "
            f"{row_accumulation} -> {grouped.accumulation(1)} at one group a micro-batch, so a step sees about "
            f"{seen:.0f} rows (the recipe's effective batch: {grouped.effective_batch})")
