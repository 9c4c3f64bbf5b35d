"""A bounded GGUF header parser: metadata key/values and tensor infos, checked against the file.

gguf-py's GGUFReader trusts every count and length in the header, so a hostile or truncated file
makes it allocate absurdly or fail with a raw ValueError deep inside numpy. This parser reads the
same header with each count and length checked against the bytes that remain, and raises
:class:`CheckpointError` naming the file. It also reads headers whose tensor data is incomplete
(the R1-Distill-Qwen GGUF fixture ships only its first part), which GGUFReader cannot open.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2
DEFAULT_ALIGNMENT = 32
FLOAT32, STRING, ARRAY = 6, 8, 9
# GGUF value type -> (struct format, numpy dtype) of the fixed-size scalars.
SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
           5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
           12: ("<d", "<f8")}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. ``shape`` is numpy order (GGUF's dims reversed: [rows, cols]);
    ``offset`` is absolute in the file; ``n_bytes`` is what its data occupies."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A parsed header. ``metadata`` values are int, float, bool, str, list[str] or, for numeric
    arrays, a numpy array. Tensor data is not checked here; see :meth:`truncated`. Without
    tensor infos parsed (``read_gguf_metadata``), ``tensors`` is empty."""

    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    file_size: int
    metadata_end: int  # byte offset where the tensor infos begin

    def truncated(self) -> list[str]:
        """Names of tensors whose data runs past the end of the file."""
        return [t.name for t in self.tensors.values() if t.offset + t.n_bytes > self.file_size]


class _Cursor:
    """Reads little-endian GGUF fields from a buffer, refusing any that would leave it."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but only {self.end - self.pos} remain; "
                            "the file is truncated or corrupt (re-download it)")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items of at least ``min_item_bytes`` each, bounded by the bytes left."""
        n = self.scalar("<Q", what)
        if n * min_item_bytes > self.end - self.pos:
            raise self.fail(f"{what} is {n}, more than the {self.end - self.pos} remaining bytes can hold; "
                            "the header is corrupt or the file truncated")
        return n

    def string(self, what: str, strict: bool = False) -> str:
        n = self.scalar("<Q", f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason}); the header is corrupt") from e

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype == FLOAT32:  # the shortest decimal that is this float32: 1e-05, not 9.99999974e-06
            return float(str(np.float32(self.scalar("<f", what))))
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype][0], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}; the header is corrupt")
            return self.array(what, depth + 1)
        raise self.fail(f"{what} has unknown value type {vtype}; the header is corrupt or from a newer GGUF")

    def array(self, what: str, depth: int):
        etype = self.scalar("<I", f"element type of {what}")
        if etype in SCALARS:
            fmt, dtype = SCALARS[etype]
            n = self.count(f"element count of {what}", struct.calcsize(fmt))
            out = np.frombuffer(self.buf, dtype=np.dtype(dtype), count=n, offset=self.pos).copy()
            self.pos += out.nbytes
            return out
        n = self.count(f"element count of {what}", 8 if etype == STRING else 12)
        return [self.value(etype, f"{what}[{i}]", depth) for i in range(n)]


def _open(path: Path) -> tuple[mmap.mmap, int]:
    try:
        size = path.stat().st_size
        if size < 24:
            raise CheckpointError(f"{path}: {size} bytes is too small to be a GGUF file")
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e


def _preamble(cur: _Cursor) -> tuple[int, int, int]:
    """Magic and version -> (version, tensor count, metadata count), counts bounded by the file."""
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        raise cur.fail(f"not a GGUF file (starts with {magic!r}, expected b'GGUF'); give a .gguf model file")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            raise cur.fail("is a big-endian GGUF, which is not supported; convert it on a little-endian machine")
        raise cur.fail(f"GGUF version {version} is not supported (2 or 3); re-convert with a current llama.cpp")
    n_tensors = cur.count("tensor count", 8 + 4 + 8 + 4 + 8)  # name length, one dim, type, offset
    n_kv = cur.count("metadata count", 8 + 4 + 1)  # key length, type, smallest value
    return version, n_tensors, n_kv


def _metadata(cur: _Cursor, n_kv: int) -> dict:
    metadata: dict = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", strict=True)
        if key in metadata:
            raise cur.fail(f"metadata key '{key}' appears twice; the header is corrupt")
        vtype = cur.scalar("<I", f"type of metadata '{key}'")
        metadata[key] = cur.value(vtype, f"metadata '{key}'")
    return metadata


def _alignment(cur: _Cursor, metadata: dict) -> int:
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise cur.fail(f"general.alignment={align!r} is not a power of two up to 1 MiB; the header is corrupt")
    return align


def _tensor_info(cur: _Cursor, i: int, align: int) -> tuple[str, tuple[int, ...], str, int, int]:
    name = cur.string(f"name of tensor #{i}", strict=True)
    n_dims = cur.scalar("<I", f"dimension count of tensor '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1..{MAX_DIMS} allowed); the header is corrupt")
    dims = [cur.scalar("<Q", f"dimension {d} of tensor '{name}'") for d in range(n_dims)]
    type_id = cur.scalar("<I", f"type of tensor '{name}'")
    offset = cur.scalar("<Q", f"data offset of tensor '{name}'")
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor '{name}' has unknown GGML type id {type_id}; the file is corrupt or needs a "
                       "newer reader (upgrade the gguf package)") from None
    if any(d == 0 or d >= 1 << 40 for d in dims) or dims[0] % block:
        raise cur.fail(f"tensor '{name}' has impossible dimensions {dims} for type {qtype.name} "
                       f"(each 1..2^40, the first a multiple of {block})")
    if offset % align:
        raise cur.fail(f"tensor '{name}' data offset {offset} is not aligned to {align}; the header is corrupt")
    n_bytes = int(np.prod(dims, dtype=object)) // block * type_size
    return name, tuple(reversed(dims)), qtype.name, offset, n_bytes


def _parse(path: Path, with_tensors: bool) -> GGUFHeader:
    path = Path(path)
    buf, size = _open(path)
    try:
        cur = _Cursor(buf, path)
        version, n_tensors, n_kv = _preamble(cur)
        metadata = _metadata(cur, n_kv)
        metadata_end = cur.pos
        tensors: dict[str, TensorInfo] = {}
        if with_tensors:
            align = _alignment(cur, metadata)
            infos = [_tensor_info(cur, i, align) for i in range(n_tensors)]
            data_start = -(-cur.pos // align) * align
            for name, shape, type_name, offset, n_bytes in infos:
                if name in tensors:
                    raise cur.fail(f"tensor '{name}' appears twice in the header; the file is corrupt")
                tensors[name] = TensorInfo(name, shape, type_name, data_start + offset, n_bytes)
        return GGUFHeader(path, version, metadata, tensors, size, metadata_end)
    finally:
        buf.close()


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file (tensor data is neither read nor checked)."""
    return _parse(Path(path), with_tensors=True)


def read_gguf_metadata(path: str | Path) -> dict:
    """Only the metadata key/values of a GGUF file: works when the tensor data is incomplete."""
    return _parse(Path(path), with_tensors=False).metadata
