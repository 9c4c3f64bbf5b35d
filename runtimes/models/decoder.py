"""The decoder layer, described once: what every emitter walks.

Every supported model is a stack of pre-norm layers, ``h += attention(norm(h))`` then
``h += mlp(norm(h))``, between an embedding and a normed head. What differs between families is
inside the steps: a bias on the q/k/v projections, an RMSNorm on each head of q and k, how many
channels of a head rotate. :func:`describe` turns a ModelSpec into those steps, and the reference
decoder, the ONNX builders (ort, portable, qnn) and the torch module for Core ML each turn every
step into their own ops. They read the description, never the architecture's name, so an
architecture built from known steps needs no emitter change (a test checks that no emitter
names one). A new kind of step is added once per emitter.

:func:`layer_tensors` is the one answer to "which tensors does a layer have": readers, the
quantizer's rules, AWQ folding and the weights tables all ask it.
"""
from __future__ import annotations

from dataclasses import dataclass

# Every layer tensor a description can name, by key: its HF name and its GGUF name (gguf-py's
# TensorNameMap), `{bid}` for the layer. A family that stores some fused says so (Architecture.fused).
LAYER_TENSORS = {
    "attn_norm": "model.layers.{bid}.input_layernorm.weight",
    "q_proj": "model.layers.{bid}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{bid}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{bid}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{bid}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{bid}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{bid}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{bid}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{bid}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{bid}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{bid}.post_attention_layernorm.weight",
    "gate_proj": "model.layers.{bid}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{bid}.mlp.up_proj.weight",
    "down_proj": "model.layers.{bid}.mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
GGUF_LAYER_TENSORS = {
    "attn_norm": "blk.{bid}.attn_norm.weight", "q_proj": "blk.{bid}.attn_q.weight",
    "k_proj": "blk.{bid}.attn_k.weight", "v_proj": "blk.{bid}.attn_v.weight",
    "o_proj": "blk.{bid}.attn_output.weight", "q_bias": "blk.{bid}.attn_q.bias", "k_bias": "blk.{bid}.attn_k.bias",
    "v_bias": "blk.{bid}.attn_v.bias", "q_norm": "blk.{bid}.attn_q_norm.weight",
    "k_norm": "blk.{bid}.attn_k_norm.weight", "mlp_norm": "blk.{bid}.ffn_norm.weight",
    "gate_proj": "blk.{bid}.ffn_gate.weight", "up_proj": "blk.{bid}.ffn_up.weight",
    "down_proj": "blk.{bid}.ffn_down.weight",
}
GGUF_GLOBAL_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


@dataclass(frozen=True)
class RmsNorm:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""

    weight: str  # the tensor key
    eps: float


@dataclass(frozen=True)
class Attention:
    """Grouped-query causal self-attention, scaled by 1/sqrt(head_dim).

    ``bias``: keys of q, k and v's biases, or None. ``head_norm``: the RMSNorms (q's, k's) applied
    to each head of q and of k before rotary (Qwen3), or None. ``rotary_dim``: how many leading
    channels of each head rotate (rotate_half over them); the others pass through unrotated.
    """

    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    bias: tuple[str, str, str] | None = None
    head_norm: tuple[RmsNorm, RmsNorm] | None = None
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def partial(self) -> bool:
        return self.rotary_dim != self.head_dim


@dataclass(frozen=True)
class GatedMlp:
    """down(silu(gate(x)) * up(x))."""

    intermediate: int
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class DecoderLayer:
    """One pre-norm layer: ``h += attention(attn_norm(h))``, then ``h += mlp(mlp_norm(h))``."""

    attn_norm: RmsNorm
    attention: Attention
    mlp_norm: RmsNorm
    mlp: GatedMlp

    def linears(self) -> tuple[str, ...]:
        a, m = self.attention, self.mlp
        return (a.q, a.k, a.v, a.o, m.gate, m.up, m.down)


def describe(spec) -> DecoderLayer:
    """The steps of one decoder layer of ``spec`` (every layer of a model is alike)."""
    eps = spec.rms_norm_eps
    attention = Attention(
        heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, rotary_dim=spec.rotary_dim,
        bias=("q_bias", "k_bias", "v_bias") if spec.attention_bias else None,
        head_norm=(RmsNorm("q_norm", eps), RmsNorm("k_norm", eps)) if spec.qk_norm else None)
    return DecoderLayer(RmsNorm("attn_norm", eps), attention, RmsNorm("mlp_norm", eps),
                        GatedMlp(spec.intermediate_size))


def layer_tensors(spec) -> dict[str, tuple[int, ...]]:
    """key -> shape ((out, in) for linears) of every tensor one layer of ``spec`` has, in
    LAYER_TENSORS order: the one tensor-presence function."""
    layer = describe(spec)
    a, h = layer.attention, spec.hidden_size
    shapes = {layer.attn_norm.weight: (h,), a.q: (a.q_dim, h), a.k: (a.kv_dim, h), a.v: (a.kv_dim, h),
              a.o: (h, a.q_dim), layer.mlp_norm.weight: (h,), layer.mlp.gate: (layer.mlp.intermediate, h),
              layer.mlp.up: (layer.mlp.intermediate, h), layer.mlp.down: (h, layer.mlp.intermediate)}
    if a.bias:
        shapes.update(zip(a.bias, ((a.q_dim,), (a.kv_dim,), (a.kv_dim,))))
    if a.head_norm:
        shapes.update({norm.weight: (a.head_dim,) for norm in a.head_norm})
    return {key: shapes[key] for key in LAYER_TENSORS if key in shapes}


def layer_keys(spec) -> list[str]:
    """The keys of :func:`layer_tensors`."""
    return list(layer_tensors(spec))
