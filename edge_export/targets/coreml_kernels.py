"""What the ML Program interpreter (coreml_interp.py) evaluates: the saved package's constant
values (immediates in the proto, blobs in weight.bin, constexpr decompressions, read lazily) and
one numpy kernel per MIL op, each computing one sequence's op from its inputs by name.

Float16 tensors are evaluated in float32 (Core ML rounds each fp16 op's result; we do not): the
figures then measure the program's wiring and its stored weights, not fp16 arithmetic. States
stay float16, as Core ML holds them, so the KV cache rounds exactly where the device's does.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import ExportError

BLOB_SENTINEL = 0xDEADBEEF
# proto DataType name -> the numpy type we compute with (fp16 in float32; sub-byte codes widened)
COMPUTE_TYPES = {"FLOAT16": np.float32, "FLOAT32": np.float32, "FLOAT64": np.float64, "BFLOAT16": np.float32,
                 "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "INT4": np.int8,
                 "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
                 "UINT1": np.uint8, "UINT2": np.uint8, "UINT3": np.uint8, "UINT4": np.uint8, "UINT6": np.uint8,
                 "BOOL": np.bool_}
# proto DataType name -> (numpy type of the stored bytes, bits a value) as MILBlob stores it
STORED_TYPES = {"FLOAT16": (np.float16, 16), "FLOAT32": (np.float32, 32), "INT8": (np.int8, 8),
                "UINT8": (np.uint8, 8), "INT16": (np.int16, 16), "UINT16": (np.uint16, 16),
                "INT32": (np.int32, 32), "UINT32": (np.uint32, 32), "INT4": (np.int8, 4), "UINT4": (np.uint8, 4),
                "UINT1": (np.uint8, 1), "UINT2": (np.uint8, 2), "UINT3": (np.uint8, 3), "UINT6": (np.uint8, 6)}
# the cast op's dtype names
CAST_TYPES = {"fp16": np.float32, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "uint16": np.uint16,
              "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "int64": np.int64}


def unpack_bits(raw: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte values packed little-endian (first value in the lowest bits), ``count`` of them."""
    if bits == 4:
        out = np.empty(raw.size * 2, np.uint8)
        out[0::2], out[1::2] = raw & 0x0F, raw >> 4
        out = out[:count]
    else:
        flat = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
        out = (flat * (1 << np.arange(bits, dtype=np.uint8))).sum(1, dtype=np.uint8)
    return (out.view(np.int8) ^ np.int8(1 << (bits - 1))) - np.int8(1 << (bits - 1)) if signed else out


class Blob:
    """A blob of weight.bin (MILBlob storage v2: 64-byte metadata, then the data), read from the
    file when asked, whole or a range of rows along axis 0: never mapped, never held."""

    def __init__(self, path: Path, offset: int, type_name: str, shape: tuple, what: str):
        if type_name not in STORED_TYPES:
            raise ExportError(f"{what}: a blob of type {type_name}, which the interpreter does not read")
        self.path, self.shape, self.type_name, self.what = path, tuple(shape), type_name, what
        self.stored, self.bits = STORED_TYPES[type_name]
        with open(path, "rb") as f:
            f.seek(offset)
            sentinel, _, size, self.data_offset, _ = struct.unpack("<IIQQQ", f.read(32))
        count = int(np.prod(self.shape))
        if sentinel != BLOB_SENTINEL or size * 8 < count * self.bits:
            raise ExportError(f"{what}: no blob of {count} {type_name} values at offset {offset} of {path}")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 along axis 0, in the compute type."""
        row = int(np.prod(self.shape[1:]))
        first, count = start * row * self.bits, (stop - start) * row
        if first % 8:
            return self.value()[start:stop]
        nbytes = -(-count * self.bits // 8)
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + first // 8)
            raw = np.frombuffer(f.read(nbytes), np.uint8)
        if self.bits < 8:
            values = unpack_bits(raw, self.bits, count, self.type_name == "INT4")
        else:
            values = raw.view(self.stored)
        return values.astype(COMPUTE_TYPES[self.type_name], copy=False).reshape((stop - start,) + self.shape[1:])

    def float_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as float32; 4-bit codes split with shifts straight into the float32
        output (0.8 ns a value here, where a 256-entry table lookup took 8.6 and dominated a 7B pass)."""
        row = int(np.prod(self.shape[1:]))
        if self.bits != 4 or (start * row) % 2 or ((stop - start) * row) % 2:
            return self.rows(start, stop).astype(np.float32)
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + start * row // 2)
            raw = np.frombuffer(f.read((stop - start) * row // 2), np.uint8)
        out = np.empty((raw.size, 2), np.float32)
        if self.type_name == "INT4":  # two's complement nibbles: shift each to the top, then back with its sign
            out[:, 0] = (raw << 4).view(np.int8) >> 4
            out[:, 1] = raw.view(np.int8) >> 4
        else:
            out[:, 0] = raw & 0x0F
            out[:, 1] = raw >> 4
        return out.reshape((stop - start,) + self.shape[1:])

    def value(self) -> np.ndarray:
        return self.rows(0, self.shape[0]) if self.shape else self.rows_scalar()

    def rows_scalar(self) -> np.ndarray:
        return Blob.rows(self._as_row(), 0, 1).reshape(())

    def _as_row(self):
        other = object.__new__(Blob)
        other.__dict__.update(self.__dict__, shape=(1,))
        return other

    def take(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.rows(int(i), int(i) + 1)[0] for i in index]) if len(index) else \
            np.empty((0,) + self.shape[1:], COMPUTE_TYPES[self.type_name])


def _const_rows(value, start: int, stop: int, n: int) -> np.ndarray:
    """Rows of a constexpr's per-block input (scale, offset, lut) covering output rows start..stop-1
    of ``n``, repeated to one row per output row."""
    per = n // value.shape[0]
    first, last = start // per, (stop - 1) // per + 1
    part = value.rows(first, last) if isinstance(value, Blob) else np.asarray(value)[first:last]
    return np.repeat(part, per, axis=0)[start - first * per:stop - first * per]


class BlockwiseShiftScale:
    """iOS 18 constexpr_blockwise_shift_scale: ``scale * (data - offset)``, each scale (and offset)
    over a block of data; evaluated a range of rows at a time (float32)."""

    def __init__(self, data, scale, offset=None):
        self.data, self.scale, self.offset = data, scale, offset
        self.shape = tuple(data.shape)
        if len(self.shape) != len(scale.shape) or any(d % s for d, s in zip(self.shape, scale.shape)):
            raise ExportError(f"constexpr_blockwise_shift_scale: scale {list(scale.shape)} does not tile data "
                              f"{list(self.shape)}")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def rows(self, start: int, stop: int) -> np.ndarray:
        data = (self.data.float_rows(start, stop) if isinstance(self.data, Blob)
                else np.asarray(self.data)[start:stop].astype(np.float32))
        n = self.shape[0]
        scale = _const_rows(self.scale, start, stop, n)
        tail = self.shape[1:]
        blocks = [d // s for d, s in zip(tail, self.scale.shape[1:])]
        shape = (stop - start,) + tuple(x for s, b in zip(scale.shape[1:], blocks) for x in (s, b))
        expand = (slice(None),) + tuple(x for _ in blocks for x in (slice(None), None))
        data = data.reshape(shape)
        if self.offset is not None:
            data -= _const_rows(self.offset, start, stop, n).astype(np.float32)[expand]
        data *= scale.astype(np.float32)[expand]
        return data.reshape((stop - start,) + tail)

    def value(self) -> np.ndarray:
        return self.rows(0, self.shape[0])

    def take(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.rows(int(i), int(i) + 1)[0] for i in index]) if len(index) else \
            np.empty((0,) + self.shape[1:], np.float32)


class LutToDense:
    """iOS 18 constexpr_lut_to_dense, scalar palettization (VECTOR_SIZE 1): ``indices`` of the
    output's shape pick from ``lut`` [blocks of each axis..., palette, 1], each lookup table
    covering a block of the output."""

    def __init__(self, indices, lut):
        self.indices, self.lut = indices, lut
        self.shape = tuple(indices.shape)
        rank = len(self.shape)
        if len(lut.shape) != rank + 2 or lut.shape[-1] != 1 or any(d % b for d, b in zip(self.shape, lut.shape)):
            raise ExportError(f"constexpr_lut_to_dense: lut {list(lut.shape)} does not tile indices {list(self.shape)} "
                              "as scalar palettization (vector palettization is not interpreted)")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def rows(self, start: int, stop: int) -> np.ndarray:
        index = (self.indices.rows(start, stop) if isinstance(self.indices, Blob)
                 else np.asarray(self.indices)[start:stop]).astype(np.int64)
        lut = _const_rows(self.lut, start, stop, self.shape[0])[..., 0].astype(np.float32)  # [rows, blocks..., P]
        tail = self.shape[1:]
        # each output element's table along the other axes: its index // block size
        where = [np.arange(d) // (d // b) for d, b in zip(tail, self.lut.shape[1:len(self.shape)])]
        grids = np.ix_(np.arange(stop - start), *where) if tail else (np.arange(stop - start),)
        return lut[grids + (index,)]

    def value(self) -> np.ndarray:
        return self.rows(0, self.shape[0])

    def take(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.rows(int(i), int(i) + 1)[0] for i in index]) if len(index) else \
            np.empty((0,) + self.shape[1:], np.float32)


LAZY = (Blob, BlockwiseShiftScale, LutToDense)
CONSTEXPRS = {"constexpr_blockwise_shift_scale": lambda a: BlockwiseShiftScale(a["data"], a["scale"], a.get("offset")),
              "constexpr_lut_to_dense": lambda a: LutToDense(a["indices"], a["lut"])}


# ---- per-sequence kernels: inputs by name (numpy values) -> output(s) ---------------------------
def _f(x):
    """A float operand in float32 (states are float16)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axes(a, key="axes"):
    v = a.get(key)
    return None if v is None else tuple(int(i) for i in np.atleast_1d(v))


def _slices(a, shape):
    rank = len(shape)
    begin, end = np.atleast_1d(a["begin"]).astype(np.int64), np.atleast_1d(a["end"]).astype(np.int64)
    stride = np.atleast_1d(a.get("stride", np.ones(rank, np.int64))).astype(np.int64)
    bmask = np.atleast_1d(a.get("begin_mask", np.zeros(rank, bool)))
    emask = np.atleast_1d(a.get("end_mask", np.zeros(rank, bool)))
    squeeze = np.atleast_1d(a.get("squeeze_mask", np.zeros(rank, bool)))
    out = []
    for i in range(rank):
        if squeeze[i]:
            out.append(int(begin[i]))
            continue
        out.append(slice(None if bmask[i] else int(begin[i]), None if emask[i] else int(end[i]), int(stride[i])))
    return tuple(out)


def _slice_update(a):
    x = np.array(a["x"])
    x[_slices(a, x.shape)] = a["update"]
    return x


def _reshape(a):
    x, shape = a["x"], [int(s) for s in np.atleast_1d(a["shape"])]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)] if 0 in shape else shape
    return np.reshape(x, shape)


def _matmul(a):
    x, y = _f(a["x"]), _f(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(a):
    y = np.matmul(_f(a["x"]), _f(a["weight"]).T)
    return y + _f(a["bias"]) if a.get("bias") is not None else y


def _softmax(a):
    x = _f(a["x"])
    z = np.exp(x - x.max(axis=int(a["axis"]), keepdims=True))
    return z / z.sum(axis=int(a["axis"]), keepdims=True)


def _reduce(fn):
    return lambda a: fn(_f(a["x"]), axis=_axes(a), keepdims=bool(a.get("keep_dims", False)))


def _split(a):
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        return tuple(np.split(x, np.cumsum(np.atleast_1d(a["split_sizes"]))[:-1], axis=axis))
    return tuple(np.split(x, int(a["num_splits"]), axis=axis))


def _squeeze(a):
    axes = _axes(a)
    return np.squeeze(a["x"], axis=axes) if axes is not None else np.squeeze(a["x"])


def _binary(fn):
    return lambda a: fn(_f(a["x"]), _f(a["y"]))


KERNELS = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "floor_div": _binary(np.floor_divide), "pow": _binary(np.power),
    "maximum": _binary(np.maximum), "minimum": _binary(np.minimum), "mod": _binary(np.mod),
    "greater": _binary(np.greater), "greater_equal": _binary(np.greater_equal), "less": _binary(np.less),
    "less_equal": _binary(np.less_equal), "equal": _binary(np.equal), "not_equal": _binary(np.not_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or),
    "logical_not": lambda a: np.logical_not(a["x"]),
    "abs": lambda a: np.abs(_f(a["x"])), "exp": lambda a: np.exp(_f(a["x"])), "sqrt": lambda a: np.sqrt(_f(a["x"])),
    "square": lambda a: np.square(_f(a["x"])), "tanh": lambda a: np.tanh(_f(a["x"])),
    "sigmoid": lambda a: 1 / (1 + np.exp(-_f(a["x"]))), "silu": lambda a: _f(a["x"]) / (1 + np.exp(-_f(a["x"]))),
    "rsqrt": lambda a: 1 / np.sqrt(_f(a["x"]) + _f(a.get("epsilon", 1e-12))),
    "inverse": lambda a: 1 / (_f(a["x"]) + _f(a.get("epsilon", 1e-4))),
    "log": lambda a: np.log(_f(a["x"]) + _f(a.get("epsilon", 1e-45))),
    "clip": lambda a: np.minimum(np.maximum(_f(a["x"]), _f(a["alpha"])), _f(a["beta"])),
    "select": lambda a: np.where(a["cond"], _f(a["a"]), _f(a["b"])),
    "cast": lambda a: np.asarray(a["x"]).astype(CAST_TYPES[str(a["dtype"])]),
    "shape": lambda a: np.array(np.shape(a["x"]), np.int32),
    "fill_like": lambda a: np.full(np.shape(a["ref_tensor"]), _f(a.get("value", 0.0))),
    "fill": lambda a: np.full([int(s) for s in np.atleast_1d(a["shape"])], _f(a.get("value", 0.0))),
    "reshape": _reshape, "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda a: np.expand_dims(a["x"], _axes(a)), "squeeze": _squeeze,
    "concat": lambda a: np.concatenate([np.atleast_1d(v) for v in a["values"]], axis=int(a["axis"])),
    "tile": lambda a: np.tile(a["x"], [int(r) for r in a["reps"]]), "split": _split,
    "slice_by_index": lambda a: np.asarray(a["x"])[_slices(a, np.shape(a["x"]))],
    "slice_update": _slice_update,
    "gather": lambda a: np.take(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a.get("axis", 0))),
    "linear": _linear, "matmul": _matmul, "softmax": _softmax,
    "reduce_mean": _reduce(np.mean), "reduce_max": _reduce(np.max), "reduce_min": _reduce(np.min),
    "reduce_sum": _reduce(np.sum), "reduce_prod": _reduce(np.prod),
    "identity": lambda a: a["x"],
}
