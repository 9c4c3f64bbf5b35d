"""GGUFs made as people download them: a float copy of a GGUF, quantized by llama.cpp's own quantizer.

A Q4_K_M is made by ``llama-quantize`` from a float GGUF; llama-cpp-python exposes the same C
function (``llama_model_quantize``). Tests and benchmarks use these two steps to get files whose
blocks nothing of ours wrote, from the real SmolLM2 (its Q4_1 weights written back as F32) or
from a tiny model written with gguf-py.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

log = logging.getLogger(__name__)
ALL_F32 = 0  # llama_ftype LLAMA_FTYPE_ALL_F32, for general.file_type


def write_float_copy(source: str | Path, out: str | Path) -> Path:
    """``source`` GGUF with every tensor dequantized (gguf-py) and written as F32, metadata as it
    is (``general.file_type`` set to F32); tensors keep their file order and row order."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source), "r")
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = ALL_F32 if field.name == "general.file_type" else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape(tuple(int(n) for n in reversed(tensor.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


def llama_cpp_quantize(source: str | Path, out: str | Path, preset: str = "Q4_K_M", threads: int = 2) -> Path:
    """llama.cpp's ``llama_model_quantize`` of float GGUF ``source`` to ``preset`` (a llama_ftype
    name after ``LLAMA_FTYPE_MOSTLY_``: Q4_K_M, Q5_K_S, Q6_K, Q8_0, IQ4_XS, ...) at ``out``."""
    try:
        import llama_cpp
    except ImportError as e:
        raise CheckpointError("llama.cpp's quantizer comes with llama-cpp-python; pip install llama-cpp-python") from e
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}", None)
    if ftype is None:
        raise CheckpointError(f"'{preset}' is not a llama.cpp quantization preset (e.g. Q4_K_M, Q5_K_M, Q8_0)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    log.info("llama.cpp: quantizing %s to %s", source, preset)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise CheckpointError(f"{source}: llama.cpp could not quantize it to {preset}")
    return Path(out)
