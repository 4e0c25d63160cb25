"""Where a profiled training step's time goes: a torch.profiler chrome trace cut into named buckets.

Plain Python (no torch): profile_step.py's child exports the trace of its recorded steps and this module
reads it, so the arithmetic is tested on hand-made traces (tests/test_benchmarks_profile.py).

A step is a ``profile::step`` range (profile_hooks.py opens one around each recorded step). On a GPU the
step's wall time is the GPU timeline inside that range: every kernel, copy and memset launched in it is
put in a bucket by its name and by the CPU ranges open on the launching thread when it was launched
(found through the launch's ``correlation``); where kernels on several streams overlap, the overlap is
shared equally, so the busy buckets add up to the time the GPU was busy. The idle rest of the range is
split into sync waits, launch / CPU gaps and the step's edges (``BUCKET_RULES`` says how). On the CPU
(no GPU events) each op's self time goes to its bucket, and the time in no op to "CPU outside ops".
So on both the buckets sum to the range. Each bucket is also split by phase: forward, recompute (inside
``profile::recompute``), backward (inside ``autograd::engine::evaluate_function``) and optimizer (inside
``Optimizer.step``).
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

STEP_RANGE = "profile::step"
LOSS_RANGE = "profile::loss"
RECOMPUTE_RANGE = "profile::recompute"
PHASES = ("forward", "recompute", "backward", "optimizer")
BUCKETS = ("dequant", "gemm_base", "gemm_lora", "attention", "loss", "optimizer", "other", "copies", "sync",
           "gaps", "edges")
BUCKET_LABELS = {
    "dequant": "NF4 dequantize", "gemm_base": "GEMM base", "gemm_lora": "GEMM LoRA", "attention": "attention",
    "loss": "loss (lm_head + cross-entropy)", "optimizer": "optimizer step", "other": "other kernels",
    "copies": "memory copies", "sync": "sync waits", "gaps": "launch / CPU gaps", "edges": "step edges"}
BUCKET_RULES = {
    "dequant": "kernel or enclosing op/range name contains `dequant` (bitsandbytes' `kDequantizeBlockwise`, "
               "`bitsandbytes::dequantize_4bit`)",
    "gemm_base": "the innermost enclosing op is a matmul (`aten::mm`, `addmm`, `bmm`, `matmul`, `linear`, ...) "
                 "or the kernel name is a GEMM's (`gemm`, `nvjet`, `xmma`, `cutlass`, `gemv`), none of whose "
                 "input dims is the LoRA rank",
    "gemm_lora": "the same, with an input dimension equal to the LoRA rank (r = 16 unless `--set lora.r`)",
    "attention": "kernel or enclosing op name contains `scaled_dot_product`, `flash`, `fmha`, `attention`, "
                 "`efficient_attention`, `sdpa` (cuDNN) or `cutlassF/B` (SDPA and flash-attn, forward and backward)",
    "loss": f"launched inside `{LOSS_RANGE}` (our chunked loss; transformers' `loss_function`), a name with "
            "`cross_entropy`, `nll_loss`, `log_softmax` or `logsumexp` (Unsloth's Triton loss, autograd's "
            "backward nodes), or a matmul with the vocabulary size among its dims (lm_head)",
    "optimizer": "launched inside `Optimizer.step` / `Optimizer.zero_grad` (whatever the kernel)",
    "other": "any other kernel (norms, activations, RoPE, casts, adds; in the CPU profile any other op)",
    "copies": "GPU memcpy / memset events (host-device, device-host, device-device) outside the optimizer",
    "sync": "GPU idle time after a host sync (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, "
            "`cudaEventSynchronize`, `cudaMemcpy`; `.item()`, `bool(tensor)`) that was waiting when the GPU "
            "ran dry and returned before the next kernel: the queue drained, so the gap is the sync's cost",
    "gaps": "other GPU idle time between the step's first and last kernel: the CPU launched too slowly "
            "(Python, framework overhead); in the CPU profile, time in no op",
    "edges": "GPU idle time from the step's start to its first kernel and from its last kernel to the end "
             "(the benchmark's closing `torch.cuda.synchronize`)",
}
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                      "aten::addmv", "aten::mv", "aten::_scaled_mm", "aten::addbmm"})
GEMM_KERNEL = re.compile(r"gemm|gemv|nvjet|xmma|cutlass(?![FB])|cublas", re.I)
DEQUANT = re.compile(r"dequant", re.I)
LOSS = re.compile(r"cross_?entropy|nll_?loss|log_?softmax|logsumexp", re.I)
ATTENTION = re.compile(r"scaled_?dot_?product|flash|fmha|attention|sdpa|cutlass[FB]", re.I)
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                        "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"})
GPU_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
RANGE_CATS = frozenset({"cpu_op", "user_annotation"})
LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver"})
SYNC_TOLERANCE_US = 5.0
"""Slack for the CPU and GPU clocks when a sync's return is matched to the start of a GPU gap."""
TOP_OPS = 25


@dataclass
class Span:
    name: str
    cat: str
    start: float  # microseconds, as the trace has them
    end: float
    tid: object = None
    correlation: object = None
    dims: list = field(default_factory=list)
    parent: Span | None = None


def spans_of(trace: dict) -> list[Span]:
    """The complete ("X") events of a chrome trace as spans."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or "dur" not in e:
            continue
        args = e.get("args") or {}
        start = float(e["ts"])
        out.append(Span(e.get("name", ""), e.get("cat", ""), start, start + float(e["dur"]),
                        (e.get("pid"), e.get("tid")), args.get("correlation"), args.get("Input Dims") or []))
    return out


class Ranges:
    """The CPU ranges (ops and record_function annotations) of each thread, nested, to ask which are open at a time."""

    def __init__(self, spans: list[Span]) -> None:
        by_thread: dict[object, list[Span]] = defaultdict(list)
        for s in spans:
            if s.cat in RANGE_CATS:
                by_thread[s.tid].append(s)
        self.threads: dict[object, tuple[list[float], list[Span]]] = {}
        for tid, items in by_thread.items():
            items.sort(key=lambda s: (s.start, -s.end))
            open_: list[Span] = []
            for s in items:
                while open_ and open_[-1].end <= s.start:
                    open_.pop()
                s.parent = open_[-1] if open_ else None
                open_.append(s)
            self.threads[tid] = ([s.start for s in items], items)

    def stack_at(self, tid: object, t: float) -> list[Span]:
        """The ranges of ``tid`` open at ``t``, outermost first."""
        starts, items = self.threads.get(tid, ([], []))
        i = bisect.bisect_right(starts, t) - 1
        node = items[i] if i >= 0 else None
        while node is not None and node.end < t:
            node = node.parent
        chain = []
        while node is not None:
            chain.append(node)
            node = node.parent
        return chain[::-1]


def phase_of(stack: list[Span]) -> str:
    names = [s.name for s in stack]
    if any(n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in names):
        return "optimizer"
    if RECOMPUTE_RANGE in names:
        return "recompute"
    if any(n.startswith("autograd::engine::evaluate_function") for n in names):
        return "backward"
    return "forward"


def classify(name: str, stack: list[Span], rank: int, vocab: int) -> str:
    """The bucket of a kernel (or, on the CPU, an op) called ``name`` launched with ``stack`` open."""
    names = [s.name for s in stack]
    if phase_of(stack) == "optimizer":
        return "optimizer"
    if DEQUANT.search(name) or any(DEQUANT.search(n) for n in names):
        return "dequant"
    ops = [s for s in stack if s.cat == "cpu_op"]
    innermost = ops[-1] if ops else None
    gemm = (innermost is not None and innermost.name in GEMM_OPS) or bool(GEMM_KERNEL.search(name))
    dims = matrix_dims(innermost.dims if innermost is not None else [])
    if LOSS_RANGE in names or LOSS.search(name) or any(LOSS.search(n) for n in names) or (gemm and vocab in dims):
        return "loss"
    if ATTENTION.search(name) or any(ATTENTION.search(n) for n in names):
        return "attention"
    if gemm:
        return "gemm_lora" if rank in dims else "gemm_base"
    return "other"


def matrix_dims(inputs: list) -> set[int]:
    """The sizes of an op's inputs of two or more dims (a list of tensors, a scalar or a vector tells nothing)."""
    return {d for shape in inputs if isinstance(shape, list) and len(shape) >= 2
            and all(isinstance(x, int) for x in shape) for d in shape}


def share_overlaps(intervals: list[tuple[float, float]]) -> list[float]:
    """Each interval's time, with time covered by several shared equally among them (sums to their union)."""
    points = sorted([(a, 1, i) for i, (a, b) in enumerate(intervals) if b > a] +
                    [(b, 0, i) for i, (a, b) in enumerate(intervals) if b > a])
    shares = [0.0] * len(intervals)
    active: set[int] = set()
    last = None
    for t, is_start, i in points:  # ends (0) sort before starts (1) at the same time
        if active and last is not None and t > last:
            for j in active:
                shares[j] += (t - last) / len(active)
        last = t
        (active.add if is_start else active.discard)(i)
    return shares


def step_windows(spans: list[Span]) -> list[tuple[float, float]]:
    return sorted((s.start, s.end) for s in spans if s.cat == "user_annotation" and s.name == STEP_RANGE)


def _window_of(windows: list[tuple[float, float]], t: float) -> int | None:
    i = bisect.bisect_right([w[0] for w in windows], t) - 1
    return i if i >= 0 and t <= windows[i][1] else None


def _empty() -> dict[str, dict[str, float]]:
    return {b: {p: 0.0 for p in (*PHASES, "none")} for b in BUCKETS}


def analyse(trace: dict, rank: int, vocab: int) -> dict:
    """Buckets (ms a step, by phase), phase totals, sync calls and the top ops of the trace's recorded steps."""
    spans = spans_of(trace)
    windows = step_windows(spans)
    if not windows:
        raise ValueError(f"no '{STEP_RANGE}' range in the trace: was a step recorded?")
    ranges = Ranges(spans)
    gpu = [s for s in spans if s.cat in GPU_CATS and _window_of(windows, s.start) is not None]
    matrix = _empty()
    top: dict[str, dict] = {}
    if gpu:
        syncs = _gpu_buckets(spans, windows, gpu, ranges, rank, vocab, matrix, top)
    else:
        syncs = _cpu_buckets(spans, windows, ranges, rank, vocab, matrix, top)
    n = len(windows)
    per_step = {b: {p: v / 1000 / n for p, v in phases.items()} for b, phases in matrix.items()}
    buckets = {b: sum(phases.values()) for b, phases in per_step.items()}
    ranked = sorted(top.values(), key=lambda r: -r["us"])[:TOP_OPS]
    return {
        "device": "cuda" if gpu else "cpu", "steps": n,
        "step_ms": [(b - a) / 1000 for a, b in windows],
        "buckets_ms": buckets, "buckets_by_phase_ms": per_step,
        "phases_ms": {p: sum(per_step[b][p] for b in BUCKETS) for p in (*PHASES, "none")},
        "sync_calls_per_step": sum(syncs.values()) / n,
        "sync_sources": [{"where": k, "calls_per_step": v / n} for k, v in syncs.most_common(10)],
        "top_ops": [{"name": r["name"], "calls_per_step": r["calls"] / n, "ms_per_step": r["us"] / 1000 / n,
                     "bucket": r["kinds"].most_common(1)[0][0], "launched_by": r["ops"].most_common(1)[0][0]}
                    for r in ranked],
    }


def _add_top(top: dict, name: str, us: float, kind: str, op: str) -> None:
    """Per (name, bucket): one kernel name can be a base GEMM in one place and a LoRA one in another."""
    row = top.setdefault((name, kind), {"name": name, "calls": 0, "us": 0.0, "kinds": Counter(), "ops": Counter()})
    row["calls"] += 1
    row["us"] += us
    row["kinds"][kind] += 1
    row["ops"][op] += 1


def _where(stack: list[Span]) -> str:
    """Where a call came from: the innermost annotation (profile::loss, Optimizer.step, ...) and op."""
    notes = [s.name for s in stack if s.cat == "user_annotation"]
    return f"{notes[-1] if notes else '-'} > {_innermost_op(stack)}"


def _innermost_op(stack: list[Span]) -> str:
    ops = [s.name for s in stack if s.cat == "cpu_op"]
    return ops[-1] if ops else "(outside ops)"


def _gpu_buckets(spans: list[Span], windows: list[tuple[float, float]], gpu: list[Span], ranges: Ranges,
                 rank: int, vocab: int, matrix: dict, top: dict) -> Counter:
    launches = {s.correlation: s for s in spans if s.cat in LAUNCH_CATS and s.correlation is not None}
    sync_spans = [s for s in spans if s.cat in LAUNCH_CATS and s.name in SYNC_CALLS
                  and _window_of(windows, s.start) is not None]
    syncs = Counter(_where(ranges.stack_at(s.tid, s.start)) for s in sync_spans)
    by_window: dict[int, list[Span]] = defaultdict(list)
    for s in gpu:
        by_window[_window_of(windows, s.start)].append(s)
    for w, (w0, w1) in enumerate(windows):
        events = sorted(by_window.get(w, []), key=lambda s: s.start)
        clipped = [(max(s.start, w0), min(s.end, w1)) for s in events]
        phases = []
        for s, share in zip(events, share_overlaps(clipped)):
            launch = launches.get(s.correlation)
            stack = ranges.stack_at(launch.tid, launch.start) if launch is not None else []
            phase = phase_of(stack)
            kind = classify(s.name, stack, rank, vocab) if s.cat == "kernel" or phase == "optimizer" else "copies"
            matrix[kind][phase] += share
            phases.append(phase)
            _add_top(top, s.name, s.end - s.start, kind, _innermost_op(stack))
        _idle_buckets(w0, w1, clipped, phases, sync_spans, matrix)
    return syncs


def _idle_buckets(w0: float, w1: float, busy: list[tuple[float, float]], phases: list[str],
                  sync_spans: list[Span], matrix: dict) -> None:
    """The window's time with no GPU event: edges before the first and after the last, else sync or gap."""
    if not busy:
        matrix["edges"]["none"] += w1 - w0
        return
    order = sorted(range(len(busy)), key=lambda i: busy[i][0])
    covered_to = w0
    for position, i in enumerate(order):
        a, b = busy[i]
        if a > covered_to:
            if position == 0:
                matrix["edges"]["none"] += a - w0
            else:
                after_sync = any(s.start <= covered_to + SYNC_TOLERANCE_US and
                                 covered_to - SYNC_TOLERANCE_US <= s.end <= a + SYNC_TOLERANCE_US
                                 for s in sync_spans)
                matrix["sync" if after_sync else "gaps"][phases[i]] += a - covered_to
        covered_to = max(covered_to, b)
    matrix["edges"]["none"] += max(0.0, w1 - covered_to)


def _cpu_buckets(spans: list[Span], windows: list[tuple[float, float]], ranges: Ranges, rank: int, vocab: int,
                 matrix: dict, top: dict) -> Counter:
    """Each op's self time (its time less its child ops') in its bucket; the rest of the window outside ops."""
    ops = [s for s in spans if s.cat == "cpu_op" and _window_of(windows, s.start) is not None]
    child_time: dict[int, float] = defaultdict(float)
    outer: list[Span] = []
    for s in ops:
        parent = s.parent
        while parent is not None and parent.cat != "cpu_op":
            parent = parent.parent
        if parent is None:
            outer.append(s)
        else:
            child_time[id(parent)] += s.end - s.start
    syncs: Counter = Counter()
    for s in ops:
        stack = ranges.stack_at(s.tid, s.start)
        if not stack or stack[-1] is not s:
            stack = stack + [s]
        kind = classify(s.name, stack, rank, vocab)
        own = (s.end - s.start) - child_time[id(s)]
        matrix[kind][phase_of(stack)] += own
        _add_top(top, s.name, own, kind, s.parent.name if s.parent is not None else "(step)")
        if s.name == "aten::_local_scalar_dense":  # .item() / bool(tensor): a sync on a GPU
            syncs[_where(stack[:-1])] += 1
    for w0, w1 in windows:
        inside = [(s.start, min(s.end, w1)) for s in outer if w0 <= s.start <= w1]
        matrix["gaps"]["none"] += (w1 - w0) - sum(share_overlaps(inside))
    return syncs
