"""The ``ort`` variant of the ONNX target: a decoder of onnxruntime's fused contrib ops, built
from the weights directly (not traced), one layer at a time, weights streamed to external data.

Per layer: (Skip)SimplifiedLayerNormalization, one q/k/v MatMulNBits (MatMul for float
weights), GroupQueryAttention (rotary inside, past and present sharing one KV buffer),
o_proj, one gate/up MatMulNBits split into SiLU(gate) * up, down_proj. Inputs and outputs
are onnxruntime-genai's, so genai drives the model as it is (see :func:`genai_config`).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from onnx import TensorProto

from runtimes import rope
from runtimes.models import ModelSpec, describe, get_architecture, layer_keys

from ..errors import ExportError
from .onnx_graph import GraphWriter, decoder_io
from .onnx_linear import Linear, LinearEmitter, checked_tensor, concat_linears, is_quantized, to_linear

logger = logging.getLogger(__name__)

# int8: GroupQueryAttention quantizes the cache itself, with static per-channel k/v scales that
# ``weights.kv_scales(layer)`` supplies (quantizers.kv: keys by rotary-pair radius, values by max |v|).
KV_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
# One MatMulNBits for q/k/v and one for gate/up (then Split) decode faster than separate ones:
# SmolLM2 shapes, random int4, 2 threads, this 2-core EPYC: 3.04 ms/token fused, 3.40 with q/k/v
# apart, 3.18 with gate/up apart, 3.54 with neither (medians of 10 alternating runs; prefill equal).
FUSE_QKV = True
FUSE_GATE_UP = True
INT64_MAX = np.iinfo(np.int64).max


def build_ort_decoder(spec: ModelSpec, weights, out_dir: str | Path, *, max_context: int,
                      kv_dtype: str = "float32", model_name: str = "model.onnx", accuracy_level: int = 4,
                      all_logits: bool = False) -> list[str]:
    """Write ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` into ``out_dir``.

    ``weights.get(name)`` gives each tensor of ``spec.tensor_shapes()``: float32 arrays (a
    linear becomes MatMul) or QuantizedTensors (MatMulNBits, ``accuracy_level`` 0..4). The KV
    buffers hold ``max_context`` positions; logits are the last column's only ([batch, 1,
    vocab]: right for batch 1 or left-padded batches) unless ``all_logits``. Returns the files
    written, relative to ``out_dir``.
    """
    if spec.head_dim % 16:
        # onnxruntime's GroupQueryAttention kernels refuse it at run time ("head_size shall be a multiple of 16")
        raise ExportError(f"head_dim={spec.head_dim} is not a multiple of 16, which onnxruntime's GroupQueryAttention "
                          "needs; export with --variant portable instead")
    rotary = describe(spec).attention.rotary_dim
    if rotary % 16:
        # GroupQueryAttention: "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"
        raise ExportError(f"the rotary embedding spans {rotary} channels of each head, not a multiple of 16, which "
                          "onnxruntime's GroupQueryAttention needs; export with --variant portable instead")
    if kv_dtype not in KV_TYPES:
        raise ExportError(f"kv_dtype '{kv_dtype}' is not supported by the ort variant (use {', '.join(KV_TYPES)})")
    if kv_dtype == "int8" and not hasattr(weights, "kv_scales"):
        raise ExportError("an int8 KV cache needs calibrated scales: weights must offer kv_scales(layer)")
    if not 0 < max_context <= spec.max_position_embeddings:
        raise ExportError(f"max_context={max_context} must be in 1..{spec.max_position_embeddings} "
                          "(the model's max_position_embeddings)")
    graph = GraphWriter(out_dir, model_name)
    try:
        _DecoderGraph(spec, weights, graph, max_context, kv_dtype, accuracy_level, all_logits).build()
        files = graph.save()
    except BaseException:
        graph.abort()
        raise
    config = genai_config(spec, max_context=max_context, model_name=model_name)
    (Path(out_dir) / "genai_config.json").write_text(json.dumps(config, indent=2))
    return files + ["genai_config.json"]


class _DecoderGraph:
    """Emits the decoder into a GraphWriter; holds one layer's weights at a time."""

    def __init__(self, spec: ModelSpec, weights, graph: GraphWriter, max_context: int, kv_dtype: str,
                 accuracy_level: int, all_logits: bool):
        self.spec, self.weights, self.g = spec, weights, graph
        self.max_context, self.kv_type, self.all_logits = max_context, KV_TYPES[kv_dtype], all_logits
        self.kv_int8 = kv_dtype == "int8"
        self.emit = LinearEmitter(graph, accuracy_level)
        self.shapes = spec.tensor_shapes()
        self.steps = describe(spec)
        self.tied_head: Linear | None = None

    def build(self) -> None:
        self._io()
        self._mask_subgraph()
        self._rope_caches()
        hidden, pending = self._embedding(), None
        for i in range(self.spec.num_layers):
            hidden, pending = self._layer(i, hidden, pending)
            logger.debug("layer %d of %d written", i + 1, self.spec.num_layers)
        self._head(hidden, pending)

    # ---- inputs, masks, rope ---------------------------------------------------------
    def _io(self) -> None:
        decoder_io(self.g, self.spec, self.kv_type, "sequence_length" if self.all_logits else 1)

    def _mask_subgraph(self) -> None:
        """seqlens_k = sum(attention_mask, 1) - 1 and total_sequence_length = attention_mask.shape[1],
        both int32, as onnxruntime-genai's builder computes them for GroupQueryAttention."""
        g, base = self.g, "/model/attn_mask_reformat/attn_mask_subgraph"
        total = g.node("ReduceSum", ["attention_mask", g.const([1])], f"{base}/ReduceSum", keepdims=0)
        sub = g.node("Sub", [total, g.const(1)], f"{base}/Sub")
        self.seqlens_k = g.node("Cast", [sub], f"{base}/Sub/Cast", to=TensorProto.INT32)
        shape = g.node("Shape", ["attention_mask"], f"{base}/Shape")
        width = g.node("Gather", [shape, g.const(1)], f"{base}/Gather", axis=0)
        self.total_len = g.node("Cast", [width], f"{base}/Gather/Cast", to=TensorProto.INT32)

    def _rope_caches(self) -> None:
        """cos/sin [max_context, rotary_dim/2] from runtimes.rope (llama3, YaRN scaling and YaRN's
        attention factor, which multiplies both, included; GroupQueryAttention rotates the first
        rotary_dim channels of a head and passes the rest). LongRoPE: both factor sets, and the
        long one wherever the sequence (total_sequence_length) is past the original context."""
        g, r = self.g, rope.Rope.for_spec(self.spec)
        positions = np.arange(self.max_context)
        self.cos, self.sin = (g.weight(f"{name}_cache", t) for name, t in zip(("cos", "sin"), r.table(positions)))
        if r.switch is None:
            return
        base = "/model/rotary_emb/long"
        long = g.node("Greater", [self.total_len, g.const(r.switch, np.int32)], f"{base}/Greater")
        for name, table in zip(("cos", "sin"), r.table(positions, long=True)):
            short = getattr(self, name)
            setattr(self, name, g.node("Where", [long, g.weight(f"{name}_cache_long", table), short],
                                       f"{base}/{name}/Where"))

    # ---- weights ---------------------------------------------------------------------
    def _get(self, key: str, layer: int | None = None):
        name = self.spec.tensor_name(key, layer)
        return checked_tensor(self.weights, name, self.shapes[name])

    def _layer_weights(self, i: int) -> dict:
        lw = {k: self._get(k, i) for k in layer_keys(self.spec)}
        for k in self.steps.linears():
            lw[k] = to_linear(lw[k], self.spec.tensor_name(k, i))
        return lw

    # ---- embedding and head ----------------------------------------------------------
    def _embedding(self) -> str:
        g, base = self.g, "/model/embed_tokens"
        table = self._get("embed")
        tied = self.spec.tied_embeddings
        if not is_quantized(table):
            if not tied:
                return g.node("Gather", [g.weight("model.embed_tokens.weight", table), "input_ids"], f"{base}/Gather")
            # One [hidden, vocab] initializer serves lm_head's MatMul and, gathered on axis 1, the embedding.
            self.tied_head = Linear.float(table, name="lm_head.weight")
            columns = g.node("Gather", [self.emit.float_weight(self.tied_head), "input_ids"], f"{base}/Gather", axis=1)
            self.tied_head.weight = None
            return g.node("Transpose", [columns], f"{base}/Transpose", perm=[1, 2, 0])
        linear = to_linear(table, self.spec.tensor_name("embed"))
        if tied:
            self.tied_head = linear
        return self.emit.embedding(base, linear, "input_ids", share_with_head=tied)

    def _head(self, hidden: str, pending: str) -> None:
        x, _ = self._norm("/model/norm", self._get("final_norm"), hidden, pending)
        head = self.tied_head or to_linear(self._get("lm_head"), self.spec.tensor_name("lm_head"))
        self.emit.linear("/lm_head", x, head, out="logits")

    # ---- one decoder layer -----------------------------------------------------------
    def _layer(self, i: int, hidden: str, pending: str | None) -> tuple[str, str]:
        """hidden: the residual stream entering layer i; pending: the previous layer's MLP output,
        still to be added to it. Returns the same pair for the next layer."""
        lw, p, steps = self._layer_weights(i), f"/model/layers.{i}", self.steps
        a, m = steps.attention, steps.mlp
        attn_gamma = self.emit.fold_input_scale(lw[steps.attn_norm.weight], [lw[a.q], lw[a.k], lw[a.v]])
        mlp_gamma = self.emit.fold_input_scale(lw[steps.mlp_norm.weight], [lw[m.gate], lw[m.up]])
        x, hidden = self._norm(f"{p}/input_layernorm", attn_gamma, hidden, pending, steps.attn_norm.eps)
        attn = self._attention(i, p, lw, x)
        if i == self.spec.num_layers - 1 and not self.all_logits:
            # Only the last position reaches the logits: the last layer's o_proj and MLP run on it alone.
            attn = self._last_position(f"{p}/attn/last_position", attn)
            hidden = self._last_position(f"{p}/residual/last_position", hidden)
        attn = self.emit.linear(f"{p}/attn/o_proj", attn, lw[a.o])
        x, hidden = self._norm(f"{p}/post_attention_layernorm", mlp_gamma, hidden, attn, steps.mlp_norm.eps)
        return hidden, self._mlp(p, lw, x)

    def _norm(self, base: str, gamma: np.ndarray, hidden: str, pending: str | None,
              eps: float | None = None) -> tuple[str, str]:
        """RMSNorm of hidden (+ pending): returns (normalized, new residual stream)."""
        g, eps = self.g, self.spec.rms_norm_eps if eps is None else eps
        weight = g.weight(base[1:].replace("/", ".") + ".weight", gamma)
        if pending is None:
            return g.node("SimplifiedLayerNormalization", [hidden, weight], f"{base}/SimplifiedLayerNorm",
                          axis=-1, epsilon=eps, stash_type=1), hidden
        name = f"{base}/SkipSimplifiedLayerNorm"
        out, _, _, total = g.node("SkipSimplifiedLayerNormalization", [pending, hidden, weight], name,
                                  outputs=[f"{name}/output_0", "", "", f"{name}/output_3"],
                                  domain="com.microsoft", epsilon=eps)
        return out, total

    def _last_position(self, base: str, x: str) -> str:
        g = self.g
        return g.node("Slice", [x, g.const([-1]), g.const([INT64_MAX]), g.const([1])], f"{base}/Slice")

    def _attention(self, i: int, p: str, lw: dict, x: str) -> str:
        s, g, a = self.spec, self.g, self.steps.attention
        parts = [lw[a.q], lw[a.k], lw[a.v]]
        biases = [lw[key] for key in a.bias] if a.bias else [None] * 3
        qkv = concat_linears(parts) if FUSE_QKV else None
        if qkv is not None:
            bias = np.concatenate(biases) if a.bias else None
            packed = self.emit.linear(f"{p}/attn/qkv_proj", x, qkv, bias=bias)
            q, k, v = packed, "", ""
            if a.head_norm:
                q, k, v = g.node("Split", [packed, g.const([a.q_dim, a.kv_dim, a.kv_dim])],
                                 f"{p}/attn/qkv_proj/Split", outputs=3, axis=-1)
        else:
            q, k, v = (self.emit.linear(f"{p}/attn/{n}_proj", x, w, bias=b)
                       for n, w, b in zip("qkv", parts, biases))
        if a.head_norm:
            q_norm, k_norm = a.head_norm
            q = self._head_norm(f"{p}/attn/q_norm", q, lw[q_norm.weight], a.heads, q_norm.eps)
            k = self._head_norm(f"{p}/attn/k_norm", k, lw[k_norm.weight], a.kv_heads, k_norm.eps)
        name = f"{p}/attn/GroupQueryAttention"
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens_k, self.total_len,
                  self.cos, self.sin]
        quant = {}
        if self.kv_int8:  # position_ids, attention_bias and head_sink stay absent
            k_scale, v_scale = self.weights.kv_scales(i)
            shape = (1, s.num_kv_heads, 1, s.head_dim)
            inputs += ["", "", "", g.weight(f"model.layers.{i}.attn.k_scale", k_scale.reshape(shape)),
                       g.weight(f"model.layers.{i}.attn.v_scale", v_scale.reshape(shape))]
            quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        out, _, _ = g.node(
            "GroupQueryAttention", inputs,
            name, outputs=[f"{name}/output_0", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
            num_heads=a.heads, kv_num_heads=a.kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=1.0 / math.sqrt(a.head_dim), **quant)
        return out

    def _head_norm(self, base: str, x: str, gamma: np.ndarray, heads: int, eps: float) -> str:
        """A per-head RMSNorm over head_dim (the head_norm step), on x [batch, seq, heads * head_dim]."""
        g, hd = self.g, self.steps.attention.head_dim
        split = g.node("Reshape", [x, g.const([0, 0, heads, hd])], f"{base}/Reshape")
        normed = g.node("SimplifiedLayerNormalization", [split, g.weight(base[1:].replace("/", ".") + ".weight", gamma)],
                        f"{base}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
        return g.node("Reshape", [normed, g.const([0, 0, heads * hd])], f"{base}/Reshape_1")

    def _mlp(self, p: str, lw: dict, x: str) -> str:
        g, m = self.g, self.steps.mlp
        f = m.intermediate
        gate_up = concat_linears([lw[m.gate], lw[m.up]]) if FUSE_GATE_UP else None
        if gate_up is not None:
            both = self.emit.linear(f"{p}/mlp/gate_up_proj", x, gate_up)
            gate, up = g.node("Split", [both, g.const([f, f])], f"{p}/mlp/gate_up_proj/Split", outputs=2, axis=-1)
        else:
            gate = self.emit.linear(f"{p}/mlp/gate_proj", x, lw[m.gate])
            up = self.emit.linear(f"{p}/mlp/up_proj", x, lw[m.up])
        # SiLU(x) = x * sigmoid(x) is QuickGelu with alpha 1, one fused kernel.
        act = g.node("QuickGelu", [gate], f"{p}/mlp/act_fn/QuickGelu", domain="com.microsoft", alpha=1.0)
        hidden = g.node("Mul", [act, up], f"{p}/mlp/Mul")
        return self.emit.linear(f"{p}/mlp/down_proj", hidden, lw[m.down])


def genai_config(spec: ModelSpec, *, max_context: int, eos_ids=None, bos_id: int | None = None,
                 pad_id: int | None = None, context_length: int | None = None, search: dict | None = None,
                 model_name: str = "model.onnx") -> dict:
    """onnxruntime-genai's genai_config.json for the decoder :func:`build_ort_decoder` writes.

    ``eos_ids``/``bos_id`` default to the spec's, ``pad_id`` to the first eos; ``search``
    overrides the sampling defaults taken from ``spec.generation``. ``context_length`` (default
    ``max_context``) cannot exceed ``max_context``: the rotary caches end there.
    """
    context_length = context_length or max_context
    if context_length > max_context:
        raise ExportError(f"context_length={context_length} exceeds max_context={max_context}, "
                          "the length the KV buffers and rotary caches were built for")
    eos = list(spec.eos_token_ids if eos_ids is None else eos_ids)
    if not eos:
        raise ExportError("genai_config: no eos token id; give eos_ids or set the spec's eos_token_ids")
    gen = spec.generation
    defaults = {
        "diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", False)), "early_stopping": True,
        "length_penalty": 1.0, "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0,
        "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
        "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
        "top_p": float(gen.get("top_p", 1.0)),
    }
    layer_names = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if bos_id is None else bos_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_name,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", **layer_names},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0] if pad_id is None else pad_id,
            "type": get_architecture(spec.architecture).model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {**defaults, **(search or {})},
    }
