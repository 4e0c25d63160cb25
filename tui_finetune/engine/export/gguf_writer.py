"""Write a merged model as one GGUF file in plain Python (the ``gguf`` package, no llama.cpp build).

F16: every matrix in float16, vectors (norms, biases) in float32, as llama.cpp's converter does.
Q8_0: matrices whose rows split into 32-value blocks are quantized with gguf.quants (8-bit values, one
f16 scale a block), the rest stay f16. Tensors are converted one at a time into a temporary file
(``use_temp_file``), and the file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from tui_finetune.engine.export.gguf_arch import ArchSpec, tensor_names, to_gguf, write_hparams
from tui_finetune.engine.export.gguf_vocab import write_vocab
from tui_finetune.engine.export.staging import staged_file


def encode_tensor(data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(array, raw dtype or None) as the writer takes it."""
    import gguf

    if data.ndim < 2:
        return data.astype(np.float32), None
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model: Any, arch: ArchSpec, dest: Path, quant: str, *, name: str, tokenizer: Any,
               tokenizer_folder: Path, chat_template: str, stop_ids: list[int],
               progress: Callable[[str], None] | None = None) -> Path:
    """Write ``model`` (merged, any dtype) to ``dest`` as F16 or Q8_0."""
    import gguf

    config = model.config
    state = {k: v for k, v in model.state_dict().items()}
    names = tensor_names(arch, config, list(state))
    with staged_file(dest) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch, use_temp_file=True)
        extra = write_hparams(writer, arch, config, name)
        file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, arch, tokenizer_folder, tokenizer, chat_template, stop_ids, config.vocab_size)
        for gguf_name, data in extra.items():  # rope_freqs: F32 whatever the format, as llama.cpp's converter keeps it
            writer.add_tensor(gguf_name, data.astype(np.float32))
        for count, (hf_name, gguf_name) in enumerate(names.items(), 1):
            data = to_gguf(arch, config, hf_name, state[hf_name].float().cpu().numpy())
            array, raw = encode_tensor(data, quant)
            writer.add_tensor(gguf_name, array, raw_dtype=raw)
            if progress and count % 50 == 0:
                progress(f"converted {count} of {len(names)} tensors")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dest
