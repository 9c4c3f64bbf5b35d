"""GGUF tensor data -> HF layout: dequantization, raw Q4_0/Q4_1/Q8_0 blocks, the llama Q/K permutation.

llama.cpp's converter reorders the rows of a Llama q/k projection so that each head's rotary
pairs are interleaved (GPT-J style); HF keeps the two halves apart (``rotate_half``). Reading a
llama GGUF undoes that reorder, on float values and on raw blocks alike (a block never spans
rows, so reordering rows moves whole blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

# Types read into float32 on demand; any other raises a CheckpointError naming it.
DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# Types whose blocks `split_blocks` hands over as they are: type -> (block bytes, has a minimum).
BLOCK_TYPES = {"Q4_0": (18, False), "Q4_1": (20, True), "Q8_0": (34, False)}
BLOCK_SIZE = 32


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time reorder of q/k rows (convert_hf_to_gguf.py ``LlamaModel.permute``),
    along axis 0: within each head, row i of the first half and row i of the second half become
    rows 2i and 2i+1."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: GGUF llama q/k rows (or per-row block parts) -> HF order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_rows(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor data (numpy view of the file) of a DEQUANTIZABLE type -> float32 of ``shape``,
    an array of its own (never a view of the file)."""
    qtype = GGMLQuantizationType[type_name]
    values = dequantize(np.asarray(raw), qtype)
    return np.array(values, dtype=np.float32).reshape(shape)


@dataclass(frozen=True, eq=False)
class QuantizedBlocks:
    """A GGUF tensor's blocks of 32 split into their parts, rows in HF order.

    ``d`` (and ``m``, Q4_1 only) [rows, blocks] float32 holding the stored float16 values exactly;
    ``q`` [rows, blocks, 32] the block's integers in element order: uint8 0..15 for Q4_0 / Q4_1,
    int8 for Q8_0. Element k of block b in row r is column 32*b + k, valued
    d*(q-8) (Q4_0), d*q + m (Q4_1) or d*q (Q8_0).
    """

    ggml_type: str
    d: np.ndarray
    q: np.ndarray
    m: np.ndarray | None = None
    block_size: int = BLOCK_SIZE

    @property
    def codes(self) -> np.ndarray:
        """``q`` as [rows, columns] (quantizers.from_gguf_blocks takes codes in this form)."""
        return self.q.reshape(self.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the tensor the blocks encode."""
        rows, blocks, size = self.q.shape
        return rows, blocks * size

    def dequantize(self) -> np.ndarray:
        """float32 [rows, columns], bit-identical to llama.cpp / gguf-py dequantization."""
        d = self.d[..., None]
        if self.ggml_type == "Q4_0":
            values = d * (self.q.astype(np.int8) - np.int8(8)).astype(np.float32)
        elif self.ggml_type == "Q4_1":
            values = d * self.q.astype(np.float32) + self.m[..., None]
        else:
            values = self.q.astype(np.float32) * d
        return values.reshape(self.shape)


def _half(raw: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(raw[..., start:start + 2]).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes -> 32 values: element j is the low nibble of byte j, element 16+j its high one."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def split_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedBlocks | None:
    """Raw 2-D tensor data of a BLOCK_TYPES type -> its QuantizedBlocks (file order); None otherwise."""
    if type_name not in BLOCK_TYPES or len(shape) != 2:
        return None
    block_bytes, has_min = BLOCK_TYPES[type_name]
    rows, cols = shape
    blocks = np.asarray(raw).reshape(rows, cols // BLOCK_SIZE, block_bytes)
    d = _half(blocks, 0)
    if type_name == "Q8_0":
        return QuantizedBlocks(type_name, d, np.ascontiguousarray(blocks[..., 2:]).view(np.int8))
    m = _half(blocks, 2) if has_min else None
    return QuantizedBlocks(type_name, d, _nibbles(blocks[..., 4 if has_min else 2:]), m)


def unpermute_blocks(blocks: QuantizedBlocks, n_head: int) -> QuantizedBlocks:
    """:func:`unpermute_qk` applied to every part of the blocks (rows are axis 0 of each)."""
    m = unpermute_qk(blocks.m, n_head) if blocks.m is not None else None
    return QuantizedBlocks(blocks.ggml_type, unpermute_qk(blocks.d, n_head), unpermute_qk(blocks.q, n_head), m)
