"""The `coreml` backend: a Core ML artifact's ML Program, run by Core ML (macOS 15+ only).

The model keeps its KV cache as Core ML state; one state (``make_state()``) lives per generation
and prefill and decode are the same ``predict`` with a different query length. Core ML cannot
predict on Linux: there ``available()`` says so, and the `reference` backend runs the artifact's
weights (read from the package's weight.bin by ``coreml_blockwise`` / ``coreml_lut`` below) with numpy.
coremltools is imported only when the backend is built.
"""
from __future__ import annotations

import platform

import numpy as np

from ..errors import BackendUnavailableError, ContextOverflowError
from ..weights import UNPACKERS
from .base import Backend, register_backend

MASK_VALUE = float(np.finfo(np.float16).min)  # additive mask where a query may not attend
MIN_MACOS = (15, 0)
REFERENCE_HINT = ("`--backend reference` (runtimes.load(..., backend=\"reference\")) runs the same weights "
                  "here with numpy")


def causal_mask(past: int, seq: int, max_context: int) -> np.ndarray:
    """The model's ``causal_mask`` input, float16 [1, 1, seq, past + seq]: query i (absolute
    position past + i) attends cache positions 0..past + i."""
    end = past + seq
    if end > max_context:
        raise ContextOverflowError(f"{end} tokens do not fit the Core ML model's context of {max_context}; "
                                   "shorten the prompt or re-export with a larger --max-context")
    blocked = np.arange(end)[None, :] > (past + np.arange(seq))[:, None]
    return np.where(blocked, MASK_VALUE, 0.0).astype(np.float16)[None, None]


def macos_version() -> tuple[int, ...] | None:
    """(major, minor) of this Mac's macOS, or None elsewhere."""
    if platform.system() != "Darwin":
        return None
    release = platform.mac_ver()[0]
    return tuple(int(p) for p in release.split(".")[:2]) if release else None


@register_backend
class CoreMLBackend(Backend):
    name = "coreml"
    targets = ("coreml",)
    needs = "macOS 15+ and pip install coremltools"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        version = macos_version()
        if version is None:
            return False, f"Core ML predicts only on macOS 15+ (this is {platform.system()}); {REFERENCE_HINT}"
        if version < MIN_MACOS:
            return False, (f"the model keeps its KV cache as Core ML state, which needs macOS 15+ (this is macOS "
                           f"{'.'.join(map(str, version))}); {REFERENCE_HINT}")
        try:
            import coremltools  # noqa: F401
        except ImportError:
            return False, "coremltools is not installed (pip install coremltools)"
        return True, ""

    def __init__(self, artifact, provider=None, threads=None):
        super().__init__(artifact, provider, threads)
        import coremltools as ct
        graph = artifact.manifest["graph"]
        units = {None: ct.ComputeUnit.ALL, "all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY,
                 "gpu": ct.ComputeUnit.CPU_AND_GPU, "ane": ct.ComputeUnit.CPU_AND_NE}
        if provider not in units:
            raise BackendUnavailableError(f"--provider '{provider}' is not a Core ML compute unit "
                                          "(all, cpu, gpu, ane)")
        package = artifact.path / graph["file"]
        self.model = ct.models.MLModel(str(package), compute_units=units[provider])
        self.state, self.position = None, 0

    def _run(self, ids: list[int]) -> np.ndarray:
        mask = causal_mask(self.position, len(ids), self.max_context)
        out = self.model.predict({"input_ids": np.asarray([ids], np.int32), "causal_mask": mask}, state=self.state)
        self.position += len(ids)
        return np.asarray(out["logits"], np.float32).reshape(-1)

    def prefill(self, ids) -> np.ndarray:
        self.state, self.position = self.model.make_state(), 0  # one state per generation
        return self._run(list(ids))

    def decode(self, token: int) -> np.ndarray:
        return self._run([int(token)])


# ---- the package's weights, read with numpy (what the `reference` backend runs) -------------

def decode_blockwise(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """Core ML's constexpr_blockwise_shift_scale, ``scale * (data - offset)`` with each scale
    (and offset) covering a block of data [N, K]: float32 [N, K]."""
    n, k = data.shape
    sn, sk = scale.shape
    blocks = data.reshape(sn, n // sn, sk, k // sk)
    if offset is not None:
        blocks = blocks - offset[:, None, :, None]
    return (blocks * scale[:, None, :, None]).reshape(n, k).astype(np.float32)


def decode_lut(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Core ML's iOS 18 constexpr_lut_to_dense for scalar palettes (VECTOR_SIZE 1) over a 2-D
    weight: ``indices`` [N, K] (0..2**bits-1), ``lut`` [N/bn, K/bk, 2**bits, 1] with one table
    per block of bn rows and bk columns; ``out[n, k] = lut[n // bn, k // bk, indices[n, k], 0]``
    as float32 [N, K]."""
    n, k = indices.shape
    tn, tk, palette, vector = lut.shape
    if vector != 1 or n % tn or k % tk:
        raise ValueError(f"lut {lut.shape} does not fit indices {indices.shape} (scalar palettes only)")
    blocks = indices.reshape(tn, n // tn, tk, k // tk).transpose(0, 2, 1, 3).reshape(tn, tk, -1).astype(np.intp)
    values = np.take_along_axis(lut[..., 0].astype(np.float32), blocks, axis=2)
    return values.reshape(tn, tk, n // tn, k // tk).transpose(0, 2, 1, 3).reshape(n, k)


def _values(weights, ref: dict) -> np.ndarray:
    """A blob as float32 in its logical shape; 4-bit blobs hold two values a byte, low nibble first."""
    packed = ref.get("packed")
    if packed is None:
        return weights.raw(ref).astype(np.float32)
    raw = weights.raw(dict(ref, shape=[ref["length"]]))
    count = int(np.prod(ref["shape"]))
    nibbles = np.empty(raw.size * 2, np.int8)
    nibbles[0::2], nibbles[1::2] = raw & 0x0F, raw >> 4
    nibbles = nibbles[:count]
    if packed == "int4":
        nibbles = np.where(nibbles >= 8, nibbles - 16, nibbles)
    return nibbles.astype(np.float32).reshape(ref["shape"])


def _coreml_blockwise(weights, entry: dict) -> np.ndarray:
    offset = _values(weights, entry["offset"]) if entry.get("offset") else None
    return decode_blockwise(_values(weights, entry["data"]), _values(weights, entry["scale"]), offset)


def _coreml_lut(weights, entry: dict) -> np.ndarray:
    return decode_lut(_values(weights, entry["indices"]), _values(weights, entry["lut"]))


UNPACKERS["coreml_blockwise"] = _coreml_blockwise
UNPACKERS["coreml_lut"] = _coreml_lut
