"""GGUF tensor data -> HF layout: dequantization, raw blocks split into codes and scales, the llama Q/K permutation.

llama.cpp's converter reorders the rows of a Llama q/k projection so that each head's rotary
pairs are interleaved (GPT-J style); HF keeps the two halves apart (``rotate_half``). Reading a
llama GGUF undoes that reorder, on float values and on raw blocks alike (a block never spans
rows, so reordering rows moves whole blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

# Types read into float32 on demand (through gguf-py); any other raises a CheckpointError naming it.
DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                 "Q6_K", "IQ4_NL", "IQ4_XS")
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
    """A GGUF tensor's blocks split into per-group parts, rows in HF order.

    A group is a run of ``block_size`` inputs sharing one scale: the whole block of 32 for Q4_0 /
    Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL, a sub-block of 32 (Q4_K, Q5_K, IQ4_XS) or 16 (Q6_K, Q3_K,
    Q2_K) of a K-quant's super-block of 256. ``d`` [rows, groups] float32 is the group's effective
    scale (K-quants: the fp16 super-block scale times the sub-block's integer scale, exact in
    float32); ``m`` [rows, groups] float32 or None the group's additive minimum (Q4_1, Q5_1: the
    stored fp16 m; Q4_K, Q5_K, Q2_K: -dmin times the sub-block's integer minimum); ``q`` [rows,
    groups, block_size] the integers: uint8 0..15 for Q4_0 / Q4_1 / Q4_K, int8 otherwise (Q5_0
    q-16, Q6_K q-32, Q3_K -4..3, IQ4 the codebook's int8 value, Q5_1 / Q5_K / Q2_K / Q8_0 as stored).
    Element k of group b in row r is column ``block_size*b + k``, valued ``d*(q - 8)`` for Q4_0 and
    ``d*q (+ m)`` for every other type: the same float32 operations as gguf-py's dequantization.
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
        q = self.q.astype(np.float32)
        values = self.d[..., None] * (q - np.float32(8) if self.ggml_type == "Q4_0" else q)
        if self.m is not None:
            values = values + self.m[..., None]
        return values.reshape(self.shape)


def _half(raw: np.ndarray, start: int) -> np.ndarray:
    """fp16 at byte ``start`` of each block -> float32 [blocks]."""
    return np.ascontiguousarray(raw[..., start:start + 2]).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32] values: element j is the low nibble of byte j, 16+j its high one."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _bits(packed: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """[B, n, w] bytes -> [B, n * len(shifts), w]: chunk c of byte row j is (byte >> shifts[c]) & mask."""
    shifted = packed[:, :, None, :] >> np.array(shifts, np.uint8)[None, None, :, None]
    return (shifted & np.uint8(mask)).reshape(packed.shape[0], -1, packed.shape[-1])


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[B, 4] bytes (Q5_0 / Q5_1's qh, a little-endian uint32) -> [B, 32] bit j of element j."""
    bits = np.ascontiguousarray(qh).view("<u4")[:, 0:1] >> np.arange(count, dtype=np.uint32)[None, :]
    return (bits & np.uint32(1)).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and minimums -> (sc, m) uint8 [B, 8] each."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mins


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


# Each unpacker: blocks uint8 [B, block bytes] -> (d [B, G], q [B, G, g], m [B, G] or None),
# G groups of g inputs per GGUF block. Byte layouts as ggml-common.h defines them.
def _q4_0(b):
    return _half(b, 0)[:, None], _nibbles(b[:, 2:18])[:, None], None


def _q4_1(b):
    return _half(b, 0)[:, None], _nibbles(b[:, 4:20])[:, None], _half(b, 2)[:, None]


def _q8_0(b):
    return _half(b, 0)[:, None], np.ascontiguousarray(b[:, 2:34]).view(np.int8)[:, None], None


def _q5_0(b):
    q = (_nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return _half(b, 0)[:, None], q[:, None], None


def _q5_1(b):
    q = (_nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << np.uint8(4))).astype(np.int8)
    return _half(b, 0)[:, None], q[:, None], _half(b, 2)[:, None]


def _k_scales(b):
    sc, mins = _k_scale_min(b[:, 4:16])
    return _half(b, 0)[:, None] * sc.astype(np.float32), -(_half(b, 2)[:, None] * mins.astype(np.float32))


def _q4_k(b):
    d, m = _k_scales(b)
    return d, _bits(b[:, 16:144].reshape(-1, 4, 32), [0, 4], 0x0F), m


def _q5_k(b):
    d, m = _k_scales(b)
    low = _bits(b[:, 48:176].reshape(-1, 4, 32), [0, 4], 0x0F)
    high = _bits(b[:, 16:48].reshape(-1, 1, 32), list(range(8)), 0x01)
    return d, (low | (high << np.uint8(4))).astype(np.int8), m


def _q6_k(b):
    low = _bits(b[:, 0:128].reshape(-1, 2, 64), [0, 4], 0x0F).reshape(-1, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), [0, 2, 4, 6], 0x03)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return _half(b, 208)[:, None] * scales, q.reshape(-1, 16, 16), None


def _q2_k(b):
    scales = b[:, 0:16]
    q = _bits(b[:, 16:80].reshape(-1, 2, 32), [0, 2, 4, 6], 0x03).astype(np.int8).reshape(-1, 16, 16)
    d = _half(b, 80)[:, None] * (scales & 0x0F).astype(np.float32)
    return d, q, -(_half(b, 82)[:, None] * (scales >> 4).astype(np.float32))


def _q3_k(b):
    low, high = b[:, 96:104], b[:, 104:108]
    low = _bits(low.reshape(-1, 1, 8), [0, 4], 0x0F).reshape(-1, 16)
    high = _bits(high.reshape(-1, 1, 4), [0, 2, 4, 6], 0x03).reshape(-1, 16)
    scales = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = _bits(b[:, 32:96].reshape(-1, 2, 32), [0, 2, 4, 6], 0x03).reshape(-1, 16, 16)
    hm = _bits(b[:, 0:32].reshape(-1, 1, 32), list(range(8)), 0x01).reshape(-1, 16, 16)
    q = ql.astype(np.int8) - ((hm ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
    return _half(b, 108)[:, None] * scales, q, None


def _iq4_nl(b):
    return _half(b, 0)[:, None], IQ4_VALUES[_nibbles(b[:, 2:18])][:, None], None


def _iq4_xs(b):
    high = np.ascontiguousarray(b[:, 2:4]).view("<u2")[:, 0:1] >> (2 * np.arange(8, dtype=np.uint16))[None, :]
    low = _bits(b[:, 4:8].reshape(-1, 1, 4), [0, 4], 0x0F).swapaxes(1, 2).reshape(-1, 8)  # byte i: 2i low, 2i+1 high
    scales = ((low | ((high & 3).astype(np.uint8) << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    codes = _nibbles(b[:, 8:136].reshape(-1, 8, 16))
    return _half(b, 0)[:, None] * scales, IQ4_VALUES[codes], None


# GGML type -> (unpacker, group size): the types whose blocks `split_blocks` hands over as they are.
BLOCK_TYPES = {"Q4_0": (_q4_0, 32), "Q4_1": (_q4_1, 32), "Q8_0": (_q8_0, 32), "Q5_0": (_q5_0, 32),
               "Q5_1": (_q5_1, 32), "Q4_K": (_q4_k, 32), "Q5_K": (_q5_k, 32), "Q6_K": (_q6_k, 16),
               "Q2_K": (_q2_k, 16), "Q3_K": (_q3_k, 16), "IQ4_NL": (_iq4_nl, 32), "IQ4_XS": (_iq4_xs, 32)}


def split_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedBlocks | None:
    """Raw 2-D tensor data of a BLOCK_TYPES type -> its QuantizedBlocks (file order); None otherwise."""
    if type_name not in BLOCK_TYPES or len(shape) != 2:
        return None
    unpack, group = BLOCK_TYPES[type_name]
    elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rows, cols = shape
    d, q, m = unpack(np.asarray(raw).reshape(rows * cols // elements, block_bytes))
    groups = cols // group
    return QuantizedBlocks(type_name, d.reshape(rows, groups), q.reshape(rows, groups, group),
                           None if m is None else m.reshape(rows, groups), group)


def unpermute_blocks(blocks: QuantizedBlocks, n_head: int) -> QuantizedBlocks:
    """:func:`unpermute_qk` applied to every part of the blocks (rows are axis 0 of each)."""
    m = unpermute_qk(blocks.m, n_head) if blocks.m is not None else None
    return QuantizedBlocks(blocks.ggml_type, unpermute_qk(blocks.d, n_head), unpermute_qk(blocks.q, n_head), m,
                           blocks.block_size)
