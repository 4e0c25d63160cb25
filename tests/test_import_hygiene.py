"""Layering (docs/design.md): core and ui never pull in torch, and core never pulls in textual.

Each check imports the package's modules in a fresh interpreter, because an import anywhere else
in the test session would hide a leak.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tui_finetune

REPO = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    root = Path(tui_finetune.__file__).parent / package.split(".", 1)[1].replace(".", "/")
    names = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=package + "."):
        names.append(info.name)
    return names


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_every_core_module_imports_without_torch_or_textual():
    modules = _modules("tui_finetune.core")
    assert "tui_finetune.core.run_folder.checkpoints" in modules and "tui_finetune.core.events" in modules
    loaded = _loaded_after_import(modules)
    assert "torch" not in loaded
    assert "textual" not in loaded


def test_ui_imports_without_torch():
    modules = _modules("tui_finetune.ui")
    loaded = _loaded_after_import(modules)
    assert "torch" not in loaded


HEAVY = ("torch", "textual", "transformers", "datasets", "tokenizers", "peft")


def test_the_cli_parser_imports_nothing_heavy():
    """``tui-finetune --help`` builds the parser: no torch, textual, transformers or datasets for that."""
    code = ("import sys\nfrom tui_finetune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', ' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert out.returncode == 0 and "usage: tui-finetune" in out.stdout, out.stderr
    loaded = set(out.stdout.split("LOADED", 1)[1].split())
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


@pytest.mark.parametrize("module", ["tui_finetune.cli.runs", "tui_finetune.cli.plan", "tui_finetune.cli.data",
                                    "tui_finetune.cli.chat", "tui_finetune.cli.export"])
def test_cli_command_modules_start_without_torch(module):
    assert "torch" not in _loaded_after_import([module])


def test_the_check_sees_torch_when_it_is_imported():
    assert "torch" in _loaded_after_import(["tui_finetune.engine.loading"])
