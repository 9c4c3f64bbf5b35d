"""The `coreml` target's weights: our quantizer's codes and scales as Core ML constexpr ops, and
the manifest's ``weights`` table read back from the saved package's weight.bin.

Every quantized weight becomes one iOS 18 ``constexpr_blockwise_shift_scale``
(``w = scale * (data - offset)``, blocks along the input dimension) carrying the QuantizedTensor's
own codes: symmetric int4 as int4 (code - 8) with no offset, asymmetric as uint4 with its uint4
zero points, int8 as int8 (GGUF Q5_0 / Q6_K / ... codes included); GGUF blocks with a minimum
(``d * (q - z) + r``: Q4_1 / Q4_K as uint4, Q5_1 / Q5_K / Q2_K as int8) with the float offset
``z - r/d``. Scales and float offsets are float16, as the fp16 program computes: a K-quant's
group scale (fp16 times a 6-bit integer) is rounded there, its codes are carried as they are.

iOS 18 also takes float32 scales (the op's output type is then float32), which would store a
K-quant's scale exactly; but the program computes in float16, so that float32 weight would be cast
to float16 before any matmul uses it: every weight Core ML computes with is rounded to float16
either way, for twice the scale bytes. So the scales stay float16, and the export records each such
tensor as inexact with its own loss (edge_export/tensor_loss.py): on llama.cpp's SmolLM2 Q4_K_M,
a KL of at most 1.9e-7 per tensor (benchmarks/results/tensor_loss_smollm2.json).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from quantizers import PalettizedTensor, QuantizedTensor
from quantizers.errors import QuantizationError
from quantizers.pack import pack_coreml_blockwise

from runtimes.backends.coreml import decode_blockwise, decode_lut

from ..errors import ExportError

CONSTEXPR = "constexpr_blockwise_shift_scale"
LUT_CONSTEXPR = "constexpr_lut_to_dense"
# a stored format's constexpr op, and its inputs as the weights table names them (each input's const
# in the program is named "{tensor}_{input}")
FORMATS = {"coreml_blockwise": (CONSTEXPR, ("data", "scale", "offset")),
           "coreml_lut": (LUT_CONSTEXPR, ("indices", "lut"))}
WEIGHTS_BIN = "Data/com.apple.CoreML/weights/weight.bin"
BLOB_SENTINEL = 0xDEADBEEF
# MILBlob's BlobDataType -> (our dtype name, numpy dtype of the stored bytes)
BLOB_TYPES = {1: ("float16", np.float16), 2: ("float32", np.float32), 3: ("uint8", np.uint8), 4: ("int8", np.int8),
              8: ("int4", np.uint8), 11: ("uint4", np.uint8)}


@dataclass
class CoreMLWeight:
    """One tensor as the package stores it: float16 ``value``; or blockwise ``data`` of
    ``data_type`` (int4 as int8 -8..7, uint4 as uint8 0..15, int8, uint8) with float16 ``scale``
    [N, K/g] and ``offset`` [N, K/g] (data's type, or float16) or None; or palettized ``indices``
    (uint4 as uint8 0..15 [N, K]) into ``lut`` (float16 [N / rows, 1, 16, 1], constexpr_lut_to_dense's)."""

    name: str
    value: Optional[np.ndarray] = None
    data: Optional[np.ndarray] = None
    data_type: str = ""
    scale: Optional[np.ndarray] = None
    offset: Optional[np.ndarray] = None
    indices: Optional[np.ndarray] = None
    lut: Optional[np.ndarray] = None

    @property
    def quantized(self) -> bool:
        return self.data is not None or self.indices is not None

    @property
    def format(self) -> str:
        """The weights table's format: float, coreml_blockwise or coreml_lut."""
        return "coreml_lut" if self.indices is not None else "coreml_blockwise" if self.data is not None else "float"

    def dequantized(self) -> np.ndarray:
        """float32: exactly what the stored form decodes to (runtimes' reader computes the same)."""
        if not self.quantized:
            return self.value.astype(np.float32)
        if self.indices is not None:
            return decode_lut(self.indices, self.lut)
        offset = None if self.offset is None else self.offset.astype(np.float32)
        return decode_blockwise(self.data.astype(np.float32), self.scale.astype(np.float32), offset)


def pack_weight(name: str, value) -> CoreMLWeight:
    """A QuantizedTensor or float array -> its Core ML stored form (ExportError if it has none)."""
    if isinstance(value, PalettizedTensor):
        indices, lut = value.coreml_lut()
        return CoreMLWeight(name, indices=indices.astype(np.uint8), lut=lut.astype(np.float16))
    if not isinstance(value, QuantizedTensor):
        return CoreMLWeight(name, value=_float16(name, np.asarray(value, np.float32)))
    if value.input_scale is not None:
        raise ExportError(f"tensor {name}: carries an AWQ input scale that was not folded; the coreml "
                          "target needs it folded (use the export pipeline's AWQ, which folds it)")
    if value.residual is not None:
        return _with_residual(name, value)
    try:
        packed = pack_coreml_blockwise(value, scale_dtype=np.float32)
    except QuantizationError as e:
        raise ExportError(f"tensor {name}: {e}") from e
    return CoreMLWeight(name, data=packed["data"], data_type=packed["dtype"],
                        scale=_float16(name, packed["scale"]), offset=packed["offset"])


def _with_residual(name: str, qt: QuantizedTensor) -> CoreMLWeight:
    """GGUF blocks with a minimum, ``d * (q - z) + r`` (Q4_1 / Q4_K: uint4 codes, integer z; Q5_1 /
    Q5_K / Q2_K: int8 codes, z = 0), as ``d * (q - (z - r/d))``; a constant group (d = 0, codes 0)
    as scale 1 and offset -r."""
    constant = qt.scales == 0
    d = np.where(constant, 1.0, qt.scales).astype(np.float32)
    zeros = 0.0 if qt.zero_points is None else qt.zero_points.astype(np.float32)
    offset = np.where(constant, -qt.residual, zeros - qt.residual / d)
    data, data_type = (qt.q.astype(np.uint8), "uint4") if qt.bits == 4 else (qt.q, "int8")
    return CoreMLWeight(name, data=data, data_type=data_type, scale=_float16(name, d),
                        offset=_float16(name, offset))


def _float16(name: str, values: np.ndarray) -> np.ndarray:
    out = values.astype(np.float16)
    if not np.isfinite(out).all():
        raise ExportError(f"tensor {name}: values beyond float16's range (max {np.abs(values).max():.4g}); "
                          "Core ML computes in float16, so this model cannot be exported to coreml")
    return out


# ---- the converted program: weight consts -> constexpr ops --------------------------------

def replace_weight_consts(program, const_names: dict[str, str], packed: dict[str, CoreMLWeight]) -> None:
    """In ``program`` (pymil, after conversion), swap each weight const for our stored form.

    ``const_names``: const op name -> HF tensor name. Every quantized tensor becomes a
    constexpr_blockwise_shift_scale named after the HF tensor; float ones keep their const, which
    must hold exactly our float16 values. Raises ExportError when the conversion lost a weight.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    block = program.functions["main"]
    found = set()
    with block:
        for op in list(block.operations):
            name = const_names.get(op.name) if op.op_type == "const" else None
            if name is None:
                continue
            found.add(name)
            weight = packed[name]
            if not weight.quantized:
                if not np.array_equal(np.asarray(op.outputs[0].val, np.float16), weight.value):
                    raise ExportError(f"tensor {name}: the converted constant differs from the exported value")
                op.name = _op_name(name)  # a name the weights table finds it by
                op.outputs[0].set_name(op.name)
                continue
            new = _constexpr(mb, types, op, weight)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
            block.remove_ops([op])
    missing = set(const_names.values()) - found
    if missing:
        raise ExportError(f"Core ML conversion did not keep the weights {sorted(missing)[:3]} as constants; "
                          "this coremltools version converts differently (tested: coremltools 9.0)")


def _constexpr(mb, types, op, weight: CoreMLWeight):
    from coremltools.converters.mil.mil.scope import ScopeInfo

    tag = _op_name(weight.name)
    # the torch frontend requires every op to say which module it came from: the tensor's own name
    scopes = [ScopeInfo(source=source, data=[weight.name]) for source in op.enclosing_block._essential_scope_sources]
    with mb.scope(*scopes):
        if weight.indices is not None:
            return mb.constexpr_lut_to_dense(
                indices=mb.const(val=weight.indices.astype(types.np_uint4_dtype), name=f"{tag}_indices", before_op=op),
                lut=mb.const(val=weight.lut, name=f"{tag}_lut", before_op=op), name=tag, before_op=op)
        sub_byte = {"int4": types.np_int4_dtype, "uint4": types.np_uint4_dtype}
        data = weight.data.astype(sub_byte.get(weight.data_type, weight.data.dtype))
        inputs = {"data": mb.const(val=data, name=f"{tag}_data", before_op=op),
                  "scale": mb.const(val=weight.scale, name=f"{tag}_scale", before_op=op)}
        if weight.offset is not None:
            offset = weight.offset if weight.offset.dtype == np.float16 else weight.offset.astype(data.dtype)
            inputs["offset"] = mb.const(val=offset, name=f"{tag}_offset", before_op=op)
        return mb.constexpr_blockwise_shift_scale(**inputs, name=tag, before_op=op)


def _op_name(tensor: str) -> str:
    return tensor.replace(".", "_")


def op_histogram(spec) -> dict[str, int]:
    """Op type -> count in the package's main function (Model proto ``spec``)."""
    counts: dict[str, int] = {}
    for op in _operations(spec):
        counts[op.type] = counts.get(op.type, 0) + 1
    return dict(sorted(counts.items()))


def _operations(spec):
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset].operations


# ---- the saved package -> the manifest's weights table -----------------------------------

def weights_table(package: Path, package_name: str, packed: dict[str, CoreMLWeight]) -> dict:
    """HF tensor name -> where the saved package holds it (runtimes' ``coreml_blockwise``,
    ``coreml_lut`` or ``float`` entries over ``{package_name}/Data/.../weight.bin``)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    blobs = _Blobs(package / WEIGHTS_BIN, f"{package_name}/{WEIGHTS_BIN}")
    consts = {op.outputs[0].name: op for op in _operations(spec) if op.type == "const"}
    ops = {op.outputs[0].name: op for op in _operations(spec) if op.type in (CONSTEXPR, LUT_CONSTEXPR)}
    table = {}
    for name, weight in packed.items():
        if not weight.quantized:
            const = consts.get(_op_name(name))
            value = const.attributes["val"] if const is not None else None
            table[name] = {"format": "float", "data": blobs.ref(_blob_offset(value, name), list(weight.value.shape))}
            continue
        op_type, _ = FORMATS[weight.format]
        op = ops.get(_op_name(name))
        if op is None or op.type != op_type:
            raise ExportError(f"the saved package has no {op_type} for tensor {name}")
        args = {key: _blob_offset(_argument_value(arg.arguments[0], consts), name) for key, arg in op.inputs.items()}
        if weight.format == "coreml_lut":
            table[name] = {"format": "coreml_lut", "shape": list(weight.indices.shape),
                           "indices": blobs.ref(args["indices"], list(weight.indices.shape)),
                           "lut": blobs.ref(args["lut"], list(weight.lut.shape))}
            continue
        entry = {"format": "coreml_blockwise", "shape": list(weight.data.shape),
                 "data": blobs.ref(args["data"], list(weight.data.shape)),
                 "scale": blobs.ref(args["scale"], list(weight.scale.shape)), "offset": None}
        if "offset" in args:
            entry["offset"] = blobs.ref(args["offset"], list(weight.offset.shape))
        table[name] = entry
    return table


def _argument_value(argument, consts: dict):
    """An op argument's value: inlined in the op, or the const op it names."""
    if argument.HasField("value"):
        return argument.value
    const = consts.get(argument.name)
    return const.attributes["val"] if const is not None else None


def _blob_offset(value, tensor: str) -> int:
    """weight.bin offset of a proto Value's blob."""
    if value is None or not value.HasField("blobFileValue"):
        raise ExportError(f"tensor {tensor}: its stored form is not a blob in weight.bin")
    return int(value.blobFileValue.offset)


class _Blobs:
    """weight.bin's blob headers (MILBlob storage v2: 64-byte metadata before each blob)."""

    def __init__(self, path: Path, relative: str):
        self.path, self.relative = path, relative
        self.bytes = np.memmap(path, dtype=np.uint8, mode="r")

    def ref(self, metadata_offset: int, shape: list[int]) -> dict:
        head = bytes(self.bytes[metadata_offset:metadata_offset + 32])
        sentinel, blob_type, size, offset, _padding_bits = struct.unpack("<IIQQQ", head)
        if sentinel != BLOB_SENTINEL or blob_type not in BLOB_TYPES:
            raise ExportError(f"{self.path}: no blob of a known type at offset {metadata_offset}")
        dtype, np_dtype = BLOB_TYPES[blob_type]
        ref = {"file": self.relative, "offset": offset, "length": size, "dtype": np.dtype(np_dtype).name,
               "shape": shape}
        if dtype in ("int4", "uint4"):
            ref["packed"] = dtype  # two 4-bit values a byte, first in the low nibble
        return ref
