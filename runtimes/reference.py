"""The float32 numpy decoder: the ground truth every export is verified against.

It runs any checkpoint's or artifact's weights anywhere, without torch. Weights come from a
``weights(name) -> np.ndarray`` callable, so the caller decides whether they are memory-mapped,
dequantized on the fly or held. ``layer_forward`` is public so calibration can run the model one
layer at a time over many prompts and observe each linear layer's input.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import rope
from .errors import ContextOverflowError
from .models import ModelSpec, describe, layer_keys

WeightsFn = Callable[[str], np.ndarray]
# observer(layer, point, x): point is where a linear layer's input is seen:
#   "qkv" (input of q/k/v), "o" (input of o_proj), "gate_up" (input of gate/up), "down" (input of down).
Observer = Callable[[int, str, np.ndarray], None]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(variance + eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class LayerWeights(dict):
    """One decoder layer's float32 tensors keyed by the short names of LAYER_TENSORS."""

    @classmethod
    def load(cls, spec: ModelSpec, layer: int, weights: WeightsFn) -> "LayerWeights":
        return cls({k: np.ascontiguousarray(weights(spec.tensor_name(k, layer)), dtype=np.float32)
                    for k in layer_keys(spec)})


class KVCache:
    """K and V for every layer, allocated once: [layers][kv_heads, max_context, head_dim]."""

    def __init__(self, spec: ModelSpec, max_context: int):
        shape = (spec.num_kv_heads, max_context, spec.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(spec.num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(spec.num_layers)]
        self.max_context = max_context
        self.length = 0


def project_qkv(spec: ModelSpec, lw: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [T, heads*hd], k and v [T, kv_heads*hd] for normalized input x [T, hidden]."""
    a = describe(spec).attention
    q, k, v = x @ lw[a.q].T, x @ lw[a.k].T, x @ lw[a.v].T
    if a.bias:
        q, k, v = q + lw[a.bias[0]], k + lw[a.bias[1]], v + lw[a.bias[2]]
    return q, k, v


def attend(spec: ModelSpec, lw: LayerWeights, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray,
           sin: np.ndarray, k_cache: np.ndarray | None, v_cache: np.ndarray | None, start: int,
           observer: Observer | None = None, layer: int = 0) -> np.ndarray:
    """Causal GQA of one sequence's projections at positions start.. ; fills the cache if given.
    Returns the attention output [T, heads*hd] (o_proj's input). The observer sees the keys
    before rotary ("k") and the values ("v"), [kv_heads, T, hd] each: what a KV cache holds."""
    a = describe(spec).attention
    t, hd = q.shape[0], a.head_dim
    q = q.reshape(t, a.heads, hd).transpose(1, 0, 2)
    k = k.reshape(t, a.kv_heads, hd).transpose(1, 0, 2)
    v = v.reshape(t, a.kv_heads, hd).transpose(1, 0, 2)
    if a.head_norm:
        q_norm, k_norm = a.head_norm
        q = rms_norm(q, lw[q_norm.weight], q_norm.eps)
        k = rms_norm(k, lw[k_norm.weight], k_norm.eps)
    if observer:
        observer(layer, "k", k)
        observer(layer, "v", v)
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    if k_cache is not None:
        k_cache[:, start:start + t] = k
        v_cache[:, start:start + t] = v
        k, v = k_cache[:, :start + t], v_cache[:, :start + t]
    s = k.shape[1]
    qg = q.reshape(a.kv_heads, a.group * t, hd)
    scores = (qg @ k.transpose(0, 2, 1)).reshape(a.kv_heads, a.group, t, s) / np.sqrt(hd)
    # causal: query i (absolute start+i) sees keys 0..start+i
    mask = np.arange(s)[None, :] > (start + np.arange(t))[:, None]
    scores = np.where(mask, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs.reshape(a.kv_heads, a.group * t, s) @ v).reshape(a.heads, t, hd)
    return out.transpose(1, 0, 2).reshape(t, a.heads * hd)


def attention(spec: ModelSpec, lw: LayerWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
              k_cache: np.ndarray | None, v_cache: np.ndarray | None, start: int,
              observer: Observer | None = None, layer: int = 0) -> np.ndarray:
    """Self-attention over x [T, hidden] at positions start..start+T-1; fills the cache if given."""
    out = attend(spec, lw, *project_qkv(spec, lw, x), cos, sin, k_cache, v_cache, start, observer, layer)
    if observer:
        observer(layer, "o", out)
    return out @ lw[describe(spec).attention.o].T


def mlp(spec: ModelSpec, lw: LayerWeights, x: np.ndarray, observer: Observer | None = None,
        layer: int = 0) -> np.ndarray:
    m = describe(spec).mlp
    hidden = silu(x @ lw[m.gate].T) * (x @ lw[m.up].T)
    if observer:
        observer(layer, "down", hidden)
    return hidden @ lw[m.down].T


def norm(lw: LayerWeights, step, x: np.ndarray) -> np.ndarray:
    """An RmsNorm step of the description on x."""
    return rms_norm(x, lw[step.weight], step.eps)


def layer_forward(spec: ModelSpec, lw: LayerWeights, h: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                  cache: KVCache | None = None, layer: int = 0, start: int = 0,
                  observer: Observer | None = None) -> np.ndarray:
    """One decoder layer on hidden states h [T, hidden]; returns the new hidden states."""
    steps = describe(spec)
    x = norm(lw, steps.attn_norm, h)
    if observer:
        observer(layer, "qkv", x)
    kc, vc = (cache.k[layer], cache.v[layer]) if cache is not None else (None, None)
    h = h + attention(spec, lw, x, cos, sin, kc, vc, start, observer, layer)
    x = norm(lw, steps.mlp_norm, h)
    if observer:
        observer(layer, "gate_up", x)
    return h + mlp(spec, lw, x, observer, layer)


def decode_step_batched(spec: ModelSpec, lw: LayerWeights, h: np.ndarray, tables: list, caches: list,
                        layer: int, starts: list[int]) -> np.ndarray:
    """One new token for each of B sequences through one layer: h [B, hidden]. The linear layers
    run once on all B rows (the weights are read once); attention runs per sequence."""
    steps = describe(spec)
    q, k, v = project_qkv(spec, lw, norm(lw, steps.attn_norm, h))
    out = np.concatenate([
        attend(spec, lw, q[j:j + 1], k[j:j + 1], v[j:j + 1], cos, sin, c.k[layer], c.v[layer], start)
        for j, ((cos, sin), c, start) in enumerate(zip(tables, caches, starts))])
    h = h + out @ lw[steps.attention.o].T
    return h + mlp(spec, lw, norm(lw, steps.mlp_norm, h))


class ReferenceDecoder:
    """Prefill and one-token decode over a KV cache, float32, numpy only.

    ``keep_weights`` holds every layer's float32 weights after first use (fast generation);
    without it each forward re-reads them through ``weights`` (bounded memory, slow).
    """

    def __init__(self, spec: ModelSpec, weights: WeightsFn, max_context: int | None = None,
                 keep_weights: bool = True):
        self.spec = spec
        self.weights = weights
        self.max_context = int(max_context or min(spec.max_position_embeddings, 4096))
        self.keep_weights = keep_weights
        self._layers: dict[int, LayerWeights] = {}
        self._globals: dict[str, np.ndarray] = {}
        self.cache = KVCache(spec, self.max_context)

    def reset(self) -> None:
        self.cache.length = 0

    def _global(self, key: str) -> np.ndarray:
        if key in self._globals:
            return self._globals[key]
        name = self.spec.tensor_name("embed" if key == "lm_head" and self.spec.tied_embeddings else key)
        value = np.asarray(self.weights(name), dtype=np.float32)
        if self.keep_weights:
            self._globals[key] = value
        return value

    def layer(self, i: int) -> LayerWeights:
        if i in self._layers:
            return self._layers[i]
        lw = LayerWeights.load(self.spec, i, self.weights)
        if self.keep_weights:
            self._layers[i] = lw
        return lw

    def embed(self, ids) -> np.ndarray:
        return self._global("embed")[np.asarray(ids, dtype=np.int64)]

    def head(self, h: np.ndarray) -> np.ndarray:
        x = rms_norm(h, self._global("final_norm"), self.spec.rms_norm_eps)
        return x @ self._global("lm_head").T

    def forward(self, ids, all_logits: bool = False, observer: Observer | None = None) -> np.ndarray:
        """Run ids after what the cache already holds; logits of the last position [vocab]
        (or of every position [T, vocab] with ``all_logits``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        start, t = self.cache.length, len(ids)
        if start + t > self.max_context:
            raise ContextOverflowError(
                f"{start + t} tokens do not fit the context of {self.max_context}; shorten the prompt "
                "or raise max_context")
        cos, sin = rope.Rope.for_spec(self.spec).tables(np.arange(start, start + t))
        h = self.embed(ids)
        for i in range(self.spec.num_layers):
            h = layer_forward(self.spec, self.layer(i), h, cos, sin, self.cache, i, start, observer)
        self.cache.length = start + t
        return self.head(h if all_logits else h[-1:])[slice(None) if all_logits else 0]

    def prefill(self, ids) -> np.ndarray:
        self.reset()
        return self.forward(ids)

    def decode(self, token: int) -> np.ndarray:
        return self.forward([token])
