"""Regional compilation: each decoder layer through ``torch.compile`` (Inductor, so Triton on a GPU).

Why: on a tight card the universal path's step is launch-bound. A Gemma-2B layer at 1024 tokens launches
hundreds of small kernels (norms, RoPE, casts, the LoRA adds; benchmarks/results/step-ops-gemma-2b-qlora-1024.md),
and Inductor fuses them. Only the decoder layers are compiled, as transformers' own docs advise ("regional
compilation"): the layers are identical, so one graph serves all of them and the compile takes seconds per
shape, not minutes; the embedding, the head and our chunked loss stay eager.

What stays the same: the maths (the same ops, fused), the memory techniques around the layer (checkpointing
wraps the compiled layer, so its saved tensors are still dropped and recomputed; kept layers, offload and
MLP chunks as on the universal path) and the bitsandbytes 4-bit matmul, which dynamo traces without a graph
break (its ops are registered with torch.library).

Evaluation and sample generation run eager (``eager``): they are rare, generation's cache changes shape on
every token, and a compile there would cost more than it saves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from tui_finetune.engine.memory_techniques import decoder_layers


DYNAMIC_SHAPES: bool | None = None
"""torch.compile's ``dynamic`` for the layers. ``None``: the first shape compiles static (the probe's 16
tokens), the next one marks the sequence length dynamic and compiles again, and from then on rows of any
length reuse that graph; the first group of several rows compiles one more. ``True`` compiles the dynamic
graph at once: the probe then compiles the graph single rows train on, one compile fewer
(tests/test_engine_regional_compile.py counts them). It stays ``None``: on an H200 the benchmark's
``ours:compiled:dynamic`` stack (which sets ``True`` in its own process) never finished compiling Gemma-2B's
layers within 60 s, where ``None`` ran 20 whole steps in 29-35 s (docs/verification/speed.md section 16)."""


def compile_decoder_layers(model: Any, compiler: str = "inductor") -> int:
    """Compile every decoder layer in place (``nn.Module.compile``: the module stays itself, so peft, the
    checkpointing flags and the state dict are untouched); returns how many. ``compiler`` is torch.compile's
    ``backend``: tests on the CPU use ``aot_eager``, which traces the same graphs without a C++ compiler.

    Checkpointing runs inside the compiled layer (transformers checkpoints ``forward``), where dynamo traces
    it as a higher-order op that refuses Python side effects unless told it need not replay them in the
    backward's recompute. Since transformers 5.25 (which requires the ``kernels`` package) the attention's
    ``forward`` sets and resets a module-level variable (``kernels``' ``use_kernelized_func``); without
    ``skip_fwd_side_effects_in_bwd_under_checkpoint`` that breaks the graph and every checkpointed layer runs
    eager, silently as slow as the universal path. Not replaying a set-then-reset changes nothing; the flag is
    process-wide, and this worker compiles nothing else. Older torch releases lack the flag; where every layer
    is checkpointed their layers then compile nothing, and the probe drops the backend (``why_nothing_compiled``).

    Dynamo starts afresh here (``torch._dynamo.reset``, its in-memory caches only): its graphs guard on the code,
    not on the layer, so a second model loaded in the same process would reuse the first's and the probe could
    not tell whether this one compiled."""
    torch._dynamo.reset()
    allow_side_effects_under_checkpointing()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=compiler, dynamic=DYNAMIC_SHAPES)
    return len(layers)


def allow_side_effects_under_checkpointing() -> None:
    """The flag ``compile_decoder_layers`` explains; torch releases before it have no such setting."""
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


@dataclass(frozen=True)
class CompileCount:
    """Dynamo's own process-wide counters at one moment: the graphs it captured and its graph breaks by reason."""

    graphs: int
    breaks: Counter[str]


def compile_count() -> CompileCount:
    return CompileCount(counters["stats"]["unique_graphs"], Counter(counters["graph_break"]))


def why_nothing_compiled(before: CompileCount) -> str | None:
    """After the probe step: why no graph was captured since ``before``, or None when one was. A layer dynamo
    cannot capture (a graph break where the layer starts, as transformers 5.25's kernels wrapper made under
    checkpointing) runs eager: as slow as the universal path with a compile's start-up on top, and run.json
    would name a backend that isn't running. A break inside a layer that still compiles in part is not this."""
    now = compile_count()
    if now.graphs > before.graphs:
        return None
    new_breaks = now.breaks - before.breaks
    reason = new_breaks.most_common(1)[0][0].strip().splitlines()[0] if new_breaks else "dynamo captured no graph"
    return f"its decoder layers did not compile, so they would run eager: {reason}"


def is_compiled(model: Any) -> bool:
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model))


def fall_back_to_eager_on_late_failures() -> None:
    """After the probe step has compiled and run the layer once, a later failure to compile (a new shape
    that hits a compiler bug, hours into a run) runs that call eager instead of ending the run:
    dynamo's ``suppress_errors``, process-wide, which is this worker's alone. The probe itself runs without
    it, so a backend that can't compile on this card fails there and the worker falls back to universal."""
    torch._dynamo.config.suppress_errors = True


def compiler_error(err: Exception) -> Exception:
    """What went wrong under dynamo's wrapper (``BackendCompilerFailed`` says only "backend='inductor'
    raised:" on its first line, which is what run.json keeps), so the reason, or an out-of-memory that must
    stay one, is the compiler's own."""
    return getattr(err, "inner_exception", None) or err


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eager inside the block (``torch.compiler.set_stance``); a no-op for a model
    that isn't compiled."""
    with torch.compiler.set_stance("force_eager"):
        yield
