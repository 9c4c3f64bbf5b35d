"""What a GGUF tensor loses when a target cannot carry it exactly: measured per tensor, alone.

A tensor is carried exactly when its stored form, expanded to float32 as the artifact's weights
table describes it (runtimes.weights), equals the checkpoint's own dequantization bit for bit.
Every GGUF-quantized tensor that is not (Core ML's float16 K-quant group scales, a tensor that
tensorrt or qnn re-quantizes, one asked for with another method) gets its own loss, measured with
only that tensor replaced by its stored form and every other tensor as the checkpoint's
dequantized weights:

- ``kl`` (small models): KL(reference || replaced) of the next-token distributions, nats, mean
  over the first ``prompts`` built-in verification prompts x ``tokens`` positions of the
  reference's greedy continuation, teacher-forced (the same definition as verification's
  ``kl_mean``, at fewer positions). Layer-major: the reference runs once, layer by layer, and at
  layer i each of that layer's inexact tensors branches off and runs layers i.. to the logits.
- ``relative_output_error`` (when the KL would cost more than ``KL_BUDGET_FLOPS``):
  ``||X (W'-W)^T|| / ||X W^T||`` for the tensor's own inputs X on the same prompts (their own
  tokens, no continuation), from one reference pass; an embedding's looked-up rows compare
  directly. Cheap, but it does not say what reaches the logits.

Both add ``relative_weight_error`` ``||W'-W|| / ||W||``. Weights are re-read per layer for models
over verify.HOLD_BYTES, so memory stays at about one layer plus the prompts' hidden states (an
embedding or head that is inexact is read whole, once per form).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes import rope
from runtimes.reference import LayerWeights, layer_forward, rms_norm

from .errors import ExportError
from .verify import HOLD_BYTES, LayerMajorScorer, encode_prompts, load_prompts, memoize

log = logging.getLogger(__name__)
FLOAT_TYPES = ("F32", "F16", "BF16")
PROMPTS = 4  # of the built-in verification prompts
TOKENS = 16  # greedy reference tokens per prompt, the positions scored
# Above this many floating-point operations the KL gives way to the proxy. On SmolLM2's Q4_K_M the
# 30 K-quant tensors Core ML rounds fit (8.5e11); the 211 tensors tensorrt or qnn re-quantize (6e12),
# several CPU-minutes of the reference's per-sequence matmuls, do not.
KL_BUDGET_FLOPS = 1e12
MEASURES = ("auto", "kl", "relative_output_error")
# a linear's short name -> where runtimes.reference's observer sees its input
POINT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
         "up_proj": "gate_up", "down_proj": "down"}


@dataclass(frozen=True)
class Tensor:
    """An inexact tensor: its HF name, decoder layer (None: embedding, head, final norm) and short key."""
    name: str
    layer: int | None
    key: str


def record_tensor_losses(folder, manifest: dict, ckpt, measure: str = "auto") -> None:
    """For an export of a GGUF: mark each quantized tensor's record in ``manifest`` ``exact`` or
    not, by its stored form in ``folder`` (the manifest's weights table), and give every inexact
    one its ``loss``; ``quantization.tensor_loss`` says how the losses were measured."""
    from runtimes.artifact import Artifact
    from runtimes.weights import ArtifactWeights
    if ckpt.format != "gguf":
        return
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {} for p in folder.rglob("*") if p.is_file()}
    stored = ArtifactWeights(Artifact(folder, {**manifest, "files": files}))
    records = manifest["quantization"]["tensors"]
    names = inexact_tensors(records, ckpt.tensor, stored)
    if not names:
        return
    losses = measure_losses(ckpt, stored, names, measure)
    for name, loss in losses.pop("tensors").items():
        records[name]["loss"] = {k: float(f"{v:.4g}") for k, v in loss.items()}
    manifest["quantization"]["tensor_loss"] = {**losses, "tensors": len(names)}


def inexact_tensors(records: dict, source: Callable, stored: Callable) -> list[str]:
    """Names of the GGUF-quantized tensors (per-tensor ``records`` of the manifest: ``source_type``
    not a float type) whose ``stored(name)`` differs from ``source(name)``; each record gains
    ``exact``."""
    out = []
    for name, record in records.items():
        if record.get("source_type") in (None, *FLOAT_TYPES):
            continue
        record["exact"] = bool(np.array_equal(stored(name), source(name)))
        if not record["exact"]:
            out.append(name)
    return out


def measure_losses(ckpt, stored: Callable, names: list[str], measure: str = "auto",
                   prompts: int = PROMPTS, tokens: int = TOKENS) -> dict:
    """Each of ``names`` replaced alone by ``stored(name)`` in ``ckpt``'s float32 reference.

    Returns {"measure", "prompts", "positions", "why", "tensors": {name: {measure: value,
    "relative_weight_error": value}}}; ``measure`` "auto" picks kl unless it costs more than
    KL_BUDGET_FLOPS."""
    if measure not in MEASURES:
        raise ExportError(f"tensor loss measure '{measure}' is not one of {', '.join(MEASURES)}")
    spec = ckpt.spec
    weights = memoize(ckpt.tensor) if spec.parameter_count * 4 <= HOLD_BYTES else ckpt.tensor
    ids = encode_prompts(ckpt.tokenizer, load_prompts(None))[:prompts]
    tensors = [_locate(spec, name) for name in names]
    chosen, why = choose_measure(spec, tensors, ids, tokens) if measure == "auto" else (measure, "asked for")
    log.info("per-tensor loss of %d inexact tensors: %s (%s)", len(names), chosen, why)
    if chosen == "kl":
        per, positions = _kl(spec, weights, stored, tensors, ids, tokens)
    else:
        per, positions = _output_errors(spec, weights, stored, tensors, ids,
                                        lambda name, rows: ckpt.tensor(name, rows=rows))
    for t in tensors:
        per[t.name]["relative_weight_error"] = _relative(stored(t.name) - weights(t.name), weights(t.name))
    return {"measure": chosen, "prompts": len(ids), "positions": positions, "why": why, "tensors": per}


def choose_measure(spec, tensors: list[Tensor], ids: list, tokens: int) -> tuple[str, str]:
    """("kl" or "relative_output_error", why): the KL unless it would pass KL_BUDGET_FLOPS."""
    flops = kl_flops(spec, tensors, sum(len(p) + tokens for p in ids), len(ids) * tokens)
    chosen = "kl" if flops <= KL_BUDGET_FLOPS else "relative_output_error"
    return chosen, (f"the KL would take {flops:.2g} flops, {'within' if chosen == 'kl' else 'over'} the "
                    f"{KL_BUDGET_FLOPS:.0e} budget")


def kl_flops(spec, tensors: list[Tensor], positions: int, scored: int) -> float:
    """Multiply-adds x 2 of the layer-major KL: each tensor's branch through the rest of the model."""
    layer = (spec.parameter_count - _vocab_params(spec)) / spec.num_layers
    head = 2.0 * scored * spec.vocab_size * spec.hidden_size
    return sum(2.0 * positions * layer * (spec.num_layers - (t.layer or 0)) + head for t in tensors)


def _vocab_params(spec) -> int:
    return spec.vocab_size * spec.hidden_size * (1 if spec.tied_embeddings else 2)


def _locate(spec, name: str) -> Tensor:
    for i in range(spec.num_layers):
        for key in POINT.keys() | {"attn_norm", "mlp_norm", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm"}:
            if spec.tensor_name(key, i) == name:
                return Tensor(name, i, key)
    for key in ("embed", "lm_head", "final_norm"):
        if spec.tensor_name(key) == name:
            return Tensor(name, None, key)
    raise ExportError(f"tensor {name}: not a tensor of this {spec.architecture} model")


# ---- KL, layer-major ------------------------------------------------------------------------
class _Model:
    """The reference's pieces over ``weights(name)``, with one tensor replaced by ``overlay``."""

    def __init__(self, spec, weights, overlay: dict | None = None):
        self.spec, self.overlay = spec, overlay or {}
        self.weights = lambda name: self.overlay[name] if name in self.overlay else weights(name)

    def embed(self, seq: np.ndarray) -> np.ndarray:
        return np.asarray(self.weights(self.spec.tensor_name("embed")), np.float32)[seq]

    def layers(self, hs: list, tables: list, first: int) -> list:
        for i in range(first, self.spec.num_layers):
            lw = LayerWeights.load(self.spec, i, self.weights)
            hs = [layer_forward(self.spec, lw, h, cos, sin) for h, (cos, sin) in zip(hs, tables)]
        return hs

    def log_probs(self, hs: list, scored: list[slice]) -> np.ndarray:
        """Log-probs [positions, vocab] at the ``scored`` rows of each sequence."""
        spec = self.spec
        x = np.concatenate([h[rows] for h, rows in zip(hs, scored)])
        x = rms_norm(x, self.weights(spec.tensor_name("final_norm")), spec.rms_norm_eps)
        head = self.weights(spec.tensor_name("embed" if spec.tied_embeddings else "lm_head"))
        z = (x @ np.asarray(head, np.float32).T).astype(np.float64)  # float64 log-probs: a tiny KL is not
        z -= z.max(axis=-1, keepdims=True)  # lost in float32 rounding of the log-probs themselves
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(spec, weights, stored, tensors: list[Tensor], ids: list, tokens: int) -> tuple[dict, int]:
    greedy, _ = LayerMajorScorer(spec, weights, hold=False).greedy(ids, tokens)
    seqs = [np.asarray(p + g[:-1]) for p, g in zip(ids, greedy)]
    scored = [slice(len(p) - 1, len(s)) for p, s in zip(ids, seqs)]
    tables = [rope.Rope.for_spec(spec).tables(np.arange(len(s))) for s in seqs]
    reference = _Model(spec, weights)
    ref_lp = reference.log_probs(reference.layers([reference.embed(s) for s in seqs], tables, 0), scored)
    per = {}
    for t in (t for t in tensors if t.layer is None):  # embedding, head, final norm: the whole model
        model = _Model(spec, weights, {t.name: stored(t.name)})
        per[t.name] = {"kl": _mean_kl(ref_lp, model.log_probs(model.layers([model.embed(s) for s in seqs], tables, 0),
                                                                scored))}
    hs = [reference.embed(s) for s in seqs]
    for i in range(spec.num_layers):
        for t in (t for t in tensors if t.layer == i):
            model = _Model(spec, weights, {t.name: stored(t.name)})
            per[t.name] = {"kl": _mean_kl(ref_lp, model.log_probs(model.layers(hs, tables, i), scored))}
        if any(t.layer is not None and t.layer > i for t in tensors):
            hs = _one_layer(spec, weights, hs, tables, i)
    return per, ref_lp.shape[0]


def _one_layer(spec, weights, hs: list, tables: list, i: int) -> list:
    lw = LayerWeights.load(spec, i, weights)
    return [layer_forward(spec, lw, h, cos, sin) for h, (cos, sin) in zip(hs, tables)]


def _mean_kl(ref_lp: np.ndarray, lp: np.ndarray) -> float:
    return float(np.mean((np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1)))


# ---- the proxy: each tensor's own output error ----------------------------------------------
def _output_errors(spec, weights, stored, tensors: list[Tensor], ids: list, read_rows) -> tuple[dict, int]:
    """One reference pass over the prompts' own tokens; each tensor's output error where it is used.
    ``read_rows(name, rows)``: rows of a checkpoint tensor (the embedding is never read whole here)."""
    seqs = [np.asarray(p) for p in ids]
    tables = [rope.Rope.for_spec(spec).tables(np.arange(len(s))) for s in seqs]
    used = np.unique(np.concatenate(seqs))
    embed_name = spec.tensor_name("embed")
    rows = np.asarray(read_rows(embed_name, used), np.float32)
    hs = [rows[np.searchsorted(used, s)] for s in seqs]
    per = {}
    for i in range(spec.num_layers):
        here = [t for t in tensors if t.layer == i]
        lw = LayerWeights.load(spec, i, weights)
        inputs: dict[str, list] = {}
        observer = (lambda layer, point, x: inputs.setdefault(point, []).append(x.reshape(-1, x.shape[-1]))) \
            if here else None
        hs = [layer_forward(spec, lw, h, cos, sin, observer=observer) for h, (cos, sin) in zip(hs, tables)]
        for t in here:
            per[t.name] = {"relative_output_error": _tensor_output_error(t, lw, stored(t.name), inputs)}
    x = rms_norm(np.concatenate(hs), weights(spec.tensor_name("final_norm")), spec.rms_norm_eps)
    for t in (t for t in tensors if t.layer is None):
        per[t.name] = {"relative_output_error": _global_output_error(spec, t, weights, stored(t.name), x, used)}
    return per, sum(len(s) for s in seqs)


def _tensor_output_error(t: Tensor, lw: LayerWeights, new: np.ndarray, inputs: dict) -> float:
    if t.key not in POINT:  # a norm or bias: its own values are its output
        return _relative(new - lw[t.key], lw[t.key])
    x = np.concatenate(inputs[POINT[t.key]])
    return _relative(x @ (new - lw[t.key]).T, x @ lw[t.key].T)


def _global_output_error(spec, t: Tensor, weights, new: np.ndarray, x: np.ndarray, used: np.ndarray) -> float:
    """The head's logits on the final hidden states (a tied embedding is the head too), or the
    embedding's looked-up rows."""
    old = np.asarray(weights(t.name), np.float32)
    if t.key == "lm_head" or (t.key == "embed" and spec.tied_embeddings):
        step = max(1, (1 << 24) // max(1, x.shape[0]))
        diff = sum(float(np.square(x @ (new[r:r + step] - old[r:r + step]).T, dtype=np.float64).sum())
                   for r in range(0, old.shape[0], step))
        base = sum(float(np.square(x @ old[r:r + step].T, dtype=np.float64).sum()) for r in range(0, old.shape[0], step))
        return float(np.sqrt(diff / base)) if base else 0.0
    if t.key == "embed":
        return _relative(new[used] - old[used], old[used])
    return _relative(new - old, old)  # the final norm


def _relative(diff: np.ndarray, base: np.ndarray) -> float:
    norm = float(np.linalg.norm(np.asarray(base, np.float64)))
    return float(np.linalg.norm(np.asarray(diff, np.float64)) / norm) if norm else 0.0
