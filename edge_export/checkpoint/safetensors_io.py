"""A strict, memory-mapped safetensors reader and a streaming writer.

Reading never copies a tensor until asked for it, and every header field is checked against the
file before it is trusted: a hostile or truncated file raises :class:`CheckpointError` naming
the file and tensor, never an IndexError from deep inside numpy.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"),
}
NUMPY_TO_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64",
               np.dtype("<i4"): "I32", np.dtype("i1"): "I8", np.dtype("u1"): "U8"}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact), shifted in place: one float32-sized array,
    not two (a 7B's 152k-row embedding is 2 GiB in float32)."""
    bits = raw.astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class SafetensorsFile:
    """One .safetensors file, validated and memory-mapped. ``tensor(name)`` returns float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes); re-download or re-save it")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or n > size - 8:
                    raise CheckpointError(f"{self.path}: header length {n} exceeds the file ({size} bytes); "
                                          "the file is truncated or not safetensors")
                header_bytes = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from e
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e}); the file is corrupted") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object; the file is corrupted")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        self.entries = {name: self._check_entry(name, e) for name, e in header.items()}
        self._check_overlaps()
        self._mmap = None

    def _check_entry(self, name: str, e) -> tuple[str, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: entry is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] fall outside the file's "
                                  f"{self.data_size} data bytes; the file is truncated or corrupted")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPES[dtype].itemsize != end - begin:
            raise CheckpointError(f"{where}: {dtype}{shape} needs {count * DTYPES[dtype].itemsize} bytes "
                                  f"but data_offsets give {end - begin}")
        return dtype, tuple(shape), begin, end

    def _check_overlaps(self) -> None:
        spans = sorted((b, e, name) for name, (_, _, b, e) in self.entries.items() if e > b)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: tensors '{n0}' and '{n1}' overlap in the data section; "
                                      "the file is corrupted")

    def _buffer(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def raw(self, name: str) -> np.ndarray:
        """The stored array as a read-only view of the mapped file (bf16 as uint16)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, DTYPES[dtype])
        buf = np.frombuffer(self._buffer(), dtype=DTYPES[dtype], count=(end - begin) // DTYPES[dtype].itemsize,
                            offset=self.data_start + begin)
        return buf.reshape(shape)

    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or a slice of its first axis) as float32: a new array. The mapped pages it
        was read from are released afterwards, so walking a checkpoint does not accumulate them
        in this process's resident memory."""
        dtype = self.entries[name][0]
        raw = self.raw(name)
        if rows is not None:
            raw = raw[rows]
        out = bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)
        self._release(name)
        return out

    def _release(self, name: str) -> None:
        _, _, begin, end = self.entries[name]
        if self._mmap is None or end == begin or not hasattr(self._mmap, "madvise"):
            return
        page = mmap.PAGESIZE
        start = (self.data_start + begin) // page * page
        self._mmap.madvise(mmap.MADV_DONTNEED, start, self.data_start + end - start)

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], str, object]],
                      metadata: dict | None = None) -> None:
    """Stream tensors to a safetensors file without holding them all.

    ``tensors`` yields (name, shape, st_dtype, producer) where producer() returns the array's
    bytes-compatible numpy array; shapes and dtypes are declared up front so the header is
    written first.
    """
    entries = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        count = 1
        for d in shape:
            count *= d
        nbytes = count * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(produce() if callable(produce) else produce)
            if arr.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise CheckpointError(f"{path}: tensor '{name}' produced {arr.nbytes} bytes, declared "
                                      f"{header[name]['data_offsets'][1] - header[name]['data_offsets'][0]}")
            f.write(arr.data if arr.ndim else arr.tobytes())
