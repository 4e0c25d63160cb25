"""Unsloth's import, which must come first: it patches transformers and peft when it imports, so a worker
(or a benchmark child) that may train on it imports it before anything else loads them.

Why a module of its own: this runs at the very start of a process, before the backends are chosen, and sets
what Unsloth reads only at import (where it writes its compiled kernels, and whether its compiler is on).
A failed import is kept, not raised: the Unsloth backend then reports it as the reason it was skipped
(engine/backends.py).
"""

from __future__ import annotations

import os

from tui_finetune.core.events import first_line
from tui_finetune.engine import kernel_support

UNSLOTH_UNCOMPILED = frozenset({"gemma"})
"""``model_type`` values that Unsloth trains with its compiler off (``UNSLOTH_COMPILE_DISABLE=1``, set
before it imports unless the user set it): with it on, Gemma's compiled backward fails in Inductor
(``InductorError: AssertionError``, torch 2.11 with unsloth 2026.10.9: docs/verification/speed.md
section 7 and the card grid's 4 GB Gemma Unsloth cell), the worker drops Unsloth and restarts on the
slower universal path. Compiler off, Unsloth ran Gemma-2B QLoRA at 1.53x our universal path (5195 against
3390 tokens/s, H100: benchmarks/results/h100-gemma-backends.md)."""

_import_error: str | None = None


def prepare_process(setting: str, excluded: dict[str, str] | None = None, model_type: str = "") -> None:
    """Import Unsloth now if this run may use it: it patches transformers and peft, so it must be
    imported before them. Call first thing in the worker (or a benchmark child). ``model_type``
    (``model_folder.model_type_before_loading``) decides its compiler (UNSLOTH_UNCOMPILED)."""
    global _import_error
    if (setting not in ("auto", "unsloth") or not kernel_support.module_installed("unsloth")
            or kernel_support.cuda_capability() is None):
        return
    if "unsloth" in (excluded or {}):
        return
    # Unsloth writes its compiled kernels to ./unsloth_compiled_cache (the worker's working directory, a
    # run folder) unless told otherwise before it imports; they belong with our other rebuildable files.
    from tui_finetune.core.paths import unsloth_compile_dir

    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(unsloth_compile_dir()))
    set_unsloth_compiler(model_type)
    try:
        import unsloth  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means: not this backend
        _import_error = f"{type(err).__name__}: {first_line(err, 160)}"


def set_unsloth_compiler(model_type: str) -> None:
    """Turn Unsloth's compiler off for ``model_type`` when it is in UNSLOTH_UNCOMPILED, unless the user set
    ``UNSLOTH_COMPILE_DISABLE``; before Unsloth imports, which reads it then."""
    if model_type in UNSLOTH_UNCOMPILED:
        os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")


def import_error() -> str | None:
    """Why ``prepare_process``'s import of Unsloth failed in this process, or None."""
    return _import_error
