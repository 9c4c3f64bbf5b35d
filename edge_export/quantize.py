"""Quantizing a checkpoint layer by layer: the weights a target asks for, produced as it asks.

``QuantizedWeights.get(name)`` returns a QuantizedTensor (or float32 for tensors the rules keep
wide). The first request for any tensor of layer i quantizes the whole layer; methods that need
calibration (AWQ, GPTQ) first run the reference decoder's layer i over the calibration prompts'
hidden states (never the whole model's activations at once), then push those states through the
quantized layer to feed layer i+1. Tensors are handed out once and forgotten, so memory stays at
about one layer.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import quantizers
from quantizers import PalettizedTensor, QuantizedTensor, Rules, Stats
from quantizers.awq import awq_quantize_shared, awq_search_shared

from runtimes import rope
from runtimes.models import LAYER_TENSORS, ModelSpec, describe, layer_keys
from runtimes.reference import LayerWeights, layer_forward, rms_norm

from .errors import ExportError

log = logging.getLogger(__name__)
# where each linear layer's input is observed (runtimes.reference's observer points)
POINTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
CALIBRATED = ("awq", "gptq")
CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 at a time for row-chunked quantization
STORED = (QuantizedTensor, PalettizedTensor)  # what a quantized tensor is handed out as


FLOAT_TYPES = ("F32", "F16", "BF16")  # GGML float types


@dataclass
class TensorRecord:
    """What happened to one tensor, for the manifest.

    ``source``: float (kept wide), quantized (from float weights), carried (a GGUF's codes and
    scales as they are), decomposed (carried, the GGUF minimum split into an integer zero point
    and a float residual, or kept as the residual), requantized (a GGUF tensor's dequantized
    values quantized again: not exact). ``source_type``: how the checkpoint stores it (GGML
    type such as Q4_K, or the safetensors dtype).
    """
    scheme: dict | None
    source: str  # float | quantized | carried | decomposed | requantized
    source_type: str | None = None

    def to_dict(self) -> dict:
        out = {"scheme": self.scheme, "source": self.source}
        if self.source_type is not None:
            out["source_type"] = self.source_type
        return out


class QuantizedWeights:
    """HF tensor name -> QuantizedTensor | PalettizedTensor | float32, layer by layer, as ``rules`` say.

    ``calibration``: prompt id lists, needed when any rule's method is awq or gptq, or with
    ``kv_ranges`` (static int8 KV-cache scales, read with :meth:`kv_scales`).
    With method ``keep``, a GGUF's quantized blocks (quantizers.gguf: Q4_0 ... Q8_0, K-quants,
    IQ4) are carried as they are instead of re-quantized, each checked against gguf-py's
    dequantization bit for bit.
    """

    def __init__(self, checkpoint, rules: Rules, calibration: list[list[int]] | None = None,
                 kv_ranges: bool = False):
        self.ckpt, self.spec, self.rules = checkpoint, checkpoint.spec, rules
        self.records: dict[str, TensorRecord] = {}
        self._ready: dict[str, object] = {}
        self._done_layers: set[int] = set()
        self.method = _main_method(rules, self.spec)
        self._linear_stats = needs_calibration(rules, self.spec)
        self._kv: dict[int, quantizers.KVRange] | None = {} if kv_ranges else None
        calibrated = self._linear_stats or kv_ranges
        if calibrated and not calibration:
            what = (f"method '{self.method}'" if self.method in CALIBRATED else
                    "fp8 activation scales" if self._linear_stats else "--kv-cache int8")
            raise ExportError(f"{what} needs calibration prompts (--calibration FILE or the built-in set)")
        if self.method == "keep" and checkpoint.format != "gguf":
            raise ExportError(f"--method keep carries a GGUF's quantized blocks; {checkpoint.path} is an "
                              f"{checkpoint.format} checkpoint with float weights: use rtn, awq or gptq")
        self._hidden = None
        self._head_stats: Stats | None = None
        if calibrated:
            # only the rows the prompts use are read: a 150k-row table is never whole in float32
            used = np.unique(np.concatenate([np.asarray(ids) for ids in calibration]))
            rows = checkpoint.tensor(self.spec.tensor_name("embed"), rows=used)
            self._hidden = [rows[np.searchsorted(used, ids)] for ids in calibration]
            self._tables = [rope.Rope.for_spec(self.spec).tables(np.arange(len(ids))) for ids in calibration]

    # ---- public ------------------------------------------------------------------------
    def get(self, name: str):
        """The stored form of one tensor; each name is produced once (call ``peek`` to keep it)."""
        layer = _layer_of(name)
        if layer is not None and layer not in self._done_layers:
            self._quantize_layer(layer)
        if name in self._ready:
            return self._ready.pop(name)
        return self._single(name)

    def kv_scales(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s static int8 KV-cache scales (k_scale, v_scale), [kv_heads, head_dim]
        float32 each, from the calibration prompts' keys and values (quantizers.kv)."""
        if self._kv is None:
            raise ExportError("KV-cache scales were not gathered: QuantizedWeights(..., kv_ranges=True)")
        if layer not in self._done_layers:
            self._quantize_layer(layer)
        return self._kv[layer].scales()

    @property
    def calibration_prompts(self) -> int:
        return len(self._hidden or [])

    def dequantized(self, name: str) -> np.ndarray:
        """What a target computes with for ``name``, as float32 (for evaluating the candidate)."""
        value = self.get(name)
        return value.effective_weight() if isinstance(value, STORED) else value

    # ---- one tensor at a time ----------------------------------------------------------
    def _single(self, name: str):
        source = self.spec.tensor_name("embed") if (
            name == self.spec.tensor_name("lm_head") and self.spec.tied_embeddings) else name
        config = self.config(name)
        stored = self.ckpt.stored_dtype(source)
        if config is None:
            self.records[name] = TensorRecord(None, "float", stored)
            return self.ckpt.tensor(source)
        carried = self._carry(source, config)
        if carried is not None:
            self.records[name] = TensorRecord(carried.scheme, _carry_kind(carried), stored)
            return carried
        stats = None
        if getattr(config, "method", None) == "gptq" and self._hidden is not None and self._serves_as_head(name):
            stats = self._head_input_stats()  # an int4 head by GPTQ: its input is the final norm's output
        else:
            config = _rtn_if_calibrated(config)
        if getattr(config, "activation_scales", False):  # outside the observed layers: weights only
            config = dataclasses.replace(config, activation_scales=False)
        qt = self._quantize_rows(source, name, config, stats)
        self.records[name] = TensorRecord(qt.scheme, self._fresh(stored), stored)
        return qt

    def _quantize_rows(self, source: str, name: str, config, stats: Stats | None = None) -> QuantizedTensor:
        """Quantize a tensor; one whose rows quantize independently (RTN int4/int8, per-channel
        fp8, GPTQ: every row sees the same Hessian; palettize: each block of rows_per_lut rows)
        and that is large (a 150k-row embedding) goes in row chunks, so its float32 copy is never
        whole in memory."""
        rows, cols = self.spec.tensor_shapes()[name if name in self.spec.tensor_shapes() else source]
        separable = not (getattr(config, "scheme", "") == "fp8" and not config.per_channel)
        if rows * cols <= CHUNK_ELEMENTS or not separable:
            return quantizers.quantize(self.ckpt.tensor(source), config, name, stats)
        unit = getattr(config, "rows_per_lut", 1)  # a table's rows stay in one chunk
        step = unit * max(1, CHUNK_ELEMENTS // (cols * unit))
        parts = [quantizers.quantize(self.ckpt.tensor(source, rows=slice(r, r + step)), config, name, stats)
                 for r in range(0, rows, step)]
        return _concat_rows(parts)

    def _fresh(self, stored: str) -> str:
        """How a tensor quantized here is recorded: ``requantized`` when a GGUF stored it quantized."""
        return "requantized" if self.ckpt.format == "gguf" and stored not in FLOAT_TYPES else "quantized"

    def _serves_as_head(self, name: str) -> bool:
        return name == self.spec.tensor_name("lm_head") or (
            self.spec.tied_embeddings and name == self.spec.tensor_name("embed"))

    def _head_input_stats(self) -> Stats:
        """Statistics of lm_head's input over the calibration prompts: the states reached so far
        (through the layers already quantized), carried through the remaining layers in float,
        then the final norm. Layer by layer; ``self._hidden`` is left as it was. Computed once (a
        tied embedding and lm_head may both ask)."""
        if self._head_stats is not None:
            return self._head_stats
        states = self._hidden
        for i in range(len(self._done_layers), self.spec.num_layers):
            lw = LayerWeights.load(self.spec, i, self.ckpt.tensor)
            states = [layer_forward(self.spec, lw, h, cos, sin) for h, (cos, sin) in zip(states, self._tables)]
        gamma = np.asarray(self.ckpt.tensor(self.spec.tensor_name("final_norm")), np.float32)
        stats = Stats(self.spec.hidden_size, keep_xtx=True)
        for h in states:
            stats.update(rms_norm(h, gamma, self.spec.rms_norm_eps))
        self._head_stats = stats
        return stats

    def _carry(self, name: str, config):
        """With --method keep, any tensor the rules quantize keeps its GGUF blocks if it has them,
        unless its rule names another method (``--head int4`` re-quantizes a Q8_0 head)."""
        if self.method != "keep" or getattr(config, "method", "keep") != "keep":
            return None
        blocks = self.ckpt.quantized_blocks(name)
        if blocks is None:
            return None
        qt = quantizers.from_gguf_blocks(blocks.ggml_type, blocks.d, blocks.codes, blocks.m)
        self._check_carried(name, qt)
        return qt

    def _check_carried(self, name: str, qt: QuantizedTensor) -> None:
        """The carried codes and scales, expanded, must equal gguf-py's dequantization of the
        tensor bit for bit (our block unpacking is not gguf-py's); row chunks bound the memory."""
        rows = qt.shape[0]
        step = max(1, CHUNK_ELEMENTS // qt.shape[1])
        for r in range(0, rows, step):
            part = _rows(qt, slice(r, min(r + step, rows)))
            if not np.array_equal(part.dequantize(), self.ckpt.tensor(name, rows=slice(r, r + step))):
                raise ExportError(f"tensor {name}: its {self.ckpt.stored_dtype(name)} blocks, carried as codes and "
                                  "scales, do not expand to gguf-py's dequantization; this is a bug in the block "
                                  "reader: export with --method rtn meanwhile")

    # ---- a whole layer -----------------------------------------------------------------
    def _quantize_layer(self, i: int) -> None:
        self._done_layers.add(i)
        names = {key: self.spec.tensor_name(key, i) for key in LAYER_TENSORS}
        lw = LayerWeights.load(self.spec, i, self.ckpt.tensor) if self._hidden is not None else None
        stats = self._observe(i, lw) if lw is not None else None
        out: dict[str, object] = {}
        if self.method == "awq":
            out = self._awq_layer(i, lw, stats, names)
        linears = describe(self.spec).linears()
        for key in linears:
            if names[key] not in out:
                out[names[key]] = self._linear(names[key], lw[key] if lw else None, stats, key)
        for key in layer_keys(self.spec):  # norms and biases: the layer's other tensors
            if key not in linears and names[key] not in out:
                out[names[key]] = self._single(names[key])
        self._ready.update(out)
        if self._hidden is not None:
            self._advance(i, out, names)

    def config(self, name: str):
        """The rule's config for ``name``, its group size lowered to the largest supported one that
        divides the tensor's input width when the asked one does not (SmolLM2's 576 under 128 -> 64);
        the group actually used is what the manifest records."""
        config = self.rules.resolve(name)
        group = getattr(config, "group_size", None)
        k = self.spec.tensor_shapes()[name][-1]
        if group and k % group:
            fitted = quantizers.fallback_group_size(k, group)
            if fitted is None:
                raise ExportError(f"tensor {name}: no supported group size divides its input width {k}; "
                                  "keep it wider with a rule, or use int8")
            log.info("%s: group size %d does not divide %d, using %d", name, group, k, fitted)
            config = dataclasses.replace(config, group_size=fitted)
        return config

    def _linear(self, name: str, weight, stats, key: str):
        config = self.config(name)
        if not _uses_stats(config) or stats is None:
            return self._single(name)
        point = next(p for p, keys in POINTS.items() if key in keys)
        qt = quantizers.quantize(weight, config, name, stats[point])
        stored = self.ckpt.stored_dtype(name)
        self.records[name] = TensorRecord(qt.scheme, self._fresh(stored), stored)
        return qt

    def _observe(self, i: int, lw: LayerWeights) -> dict[str, Stats] | None:
        """Run float layer i over every calibration prompt; statistics of each linear's input (when
        a method or fp8 activation scale needs them) and the ranges its KV cache must hold."""
        stats = None
        if self._linear_stats:
            keep_xtx = self.method == "gptq"
            widths = {"qkv": self.spec.hidden_size, "o": self.spec.num_heads * self.spec.head_dim,
                      "gate_up": self.spec.hidden_size, "down": self.spec.intermediate_size}
            stats = {p: Stats(k, keep_xtx=keep_xtx) for p, k in widths.items()}
        kv = _kv_range(self.spec) if self._kv is not None else None
        keys = []

        def observer(layer, point, x):
            if point == "k":
                keys.append(x)
            elif point == "v":
                if kv is not None:
                    kv.update(keys.pop(), x)
            elif stats is not None:
                stats[point].update(x)
        for h, (cos, sin) in zip(self._hidden, self._tables):
            layer_forward(self.spec, lw, h, cos, sin, observer=observer)
        if kv is not None:
            self._kv[i] = kv
        return stats

    def _awq_layer(self, i: int, lw: LayerWeights, stats: dict[str, Stats], names: dict) -> dict:
        """AWQ with every input scale folded exactly into the op that produces that input."""
        spec, out = self.spec, {}
        config = self.config(names["q_proj"])
        q, k, v = awq_quantize_shared([lw["q_proj"], lw["k_proj"], lw["v_proj"]], config, stats["qkv"],
                                      [names["q_proj"], names["k_proj"], names["v_proj"]])
        attn_norm = lw["attn_norm"] / q.input_scale
        # o_proj's input is the attention output, linear in v: one scale per (kv head, dim), shared by
        # the query heads of a group, folds into v's rows (and bias).
        group = spec.num_heads // spec.num_kv_heads
        mean_abs = stats["o"].mean_abs.reshape(spec.num_kv_heads, group, spec.head_dim).mean(1)
        mean_abs = np.repeat(mean_abs[:, None, :], group, axis=1).reshape(-1)
        s_o = awq_search_shared([lw["o_proj"]], stats["o"].sample, self.config(names["o_proj"]), mean_abs)
        o_config = self.config(names["o_proj"])
        o = quantizers.quantize(lw["o_proj"] * s_o, _plain(o_config), names["o_proj"])
        o = dataclasses.replace(o, scheme=o_config.to_dict())  # AWQ-scaled, then rounded
        s_v = s_o.reshape(spec.num_kv_heads, group, spec.head_dim)[:, 0].reshape(-1)
        v = v.scale_rows(1.0 / s_v)
        gate, up = awq_quantize_shared([lw["gate_proj"], lw["up_proj"]], config, stats["gate_up"],
                                       [names["gate_proj"], names["up_proj"]])
        mlp_norm = lw["mlp_norm"] / gate.input_scale
        down_config = self.config(names["down_proj"])
        s_down = awq_search_shared([lw["down_proj"]], stats["down"].sample, down_config, stats["down"].mean_abs)
        down = quantizers.quantize(lw["down_proj"] * s_down, _plain(down_config), names["down_proj"])
        down = dataclasses.replace(down, scheme=down_config.to_dict())
        up = up.scale_rows(1.0 / s_down)
        for key, qt in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o), ("gate_proj", gate),
                        ("up_proj", up), ("down_proj", down)):
            out[names[key]] = dataclasses.replace(qt, input_scale=None)  # 1/s is folded upstream
            self.records[names[key]] = TensorRecord(qt.scheme, "quantized")
        out[names["attn_norm"]], out[names["mlp_norm"]] = attn_norm, mlp_norm
        self.records[names["attn_norm"]] = self.records[names["mlp_norm"]] = TensorRecord(None, "float (AWQ-folded)")
        if describe(spec).attention.bias:
            out[names["v_bias"]] = lw["v_bias"] / s_v
            self.records[names["v_bias"]] = TensorRecord(None, "float (AWQ-folded)")
        return out

    def _advance(self, i: int, out: dict, names: dict) -> None:
        """Push the calibration states through the quantized layer i (what layer i+1 will see)."""
        def value(key):
            v = out[names[key]]
            return v.effective_weight() if isinstance(v, STORED) else v
        lw = LayerWeights({key: np.asarray(value(key), np.float32) for key in layer_keys(self.spec)})
        self._hidden = [layer_forward(self.spec, lw, h, cos, sin) for h, (cos, sin) in zip(self._hidden, self._tables)]


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def _main_method(rules: Rules, spec) -> str:
    config = rules.resolve(spec.tensor_name("q_proj", 0))
    return getattr(config, "method", "rtn") if config is not None else "float"


def needs_calibration(rules: Rules, spec) -> bool:
    """Do ``rules`` quantize the decoder layers with a method or scale that needs activations
    (AWQ, GPTQ, fp8 activation scales)?"""
    return _uses_stats(rules.resolve(spec.tensor_name("q_proj", 0)))


def _uses_stats(config) -> bool:
    """Does quantizing with ``config`` need the layer's input statistics?"""
    return config is not None and (getattr(config, "method", "rtn") in CALIBRATED
                                   or bool(getattr(config, "activation_scales", False)))


def _plain(config):
    return dataclasses.replace(config, method="rtn")


def _rtn_if_calibrated(config):
    """Tensors outside the calibrated layers (embeddings, lm_head) and GGUF tensors without
    carryable blocks are quantized by round-to-nearest."""
    return _plain(config) if getattr(config, "method", "rtn") in CALIBRATED + ("keep",) else config


def _concat_rows(parts: list):
    if isinstance(parts[0], PalettizedTensor):
        return PalettizedTensor.concat(parts)

    def cat(field):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)
    first = parts[0]
    return dataclasses.replace(first, q=cat("q"), scales=cat("scales"), zero_points=cat("zero_points"),
                               residual=cat("residual"), shape=(sum(p.shape[0] for p in parts), first.shape[1]))


def _rows(qt: QuantizedTensor, rows: slice) -> QuantizedTensor:
    """Rows ``rows`` of ``qt`` (per-row fields sliced alike)."""
    if isinstance(qt, PalettizedTensor):
        return qt.rows(rows)
    def part(value):
        return None if value is None else value[rows]
    q = qt.q[rows]
    return dataclasses.replace(qt, q=q, scales=qt.scales[rows], zero_points=part(qt.zero_points),
                               residual=part(qt.residual), shape=(q.shape[0], qt.shape[1]))


def _carry_kind(qt: QuantizedTensor) -> str:
    return "decomposed" if qt.residual is not None else "carried"


def _kv_range(spec: ModelSpec) -> quantizers.KVRange:
    """One layer's KV ranges: keys rotate over the spec's rotary width, their cos/sin scaled by the
    rope's attention factor (YaRN, LongRoPE; the same for LongRoPE's short and long factors)."""
    gain = rope.inv_freq(spec.rotary_dim, spec.rope_theta, spec.rope_scaling)[1]
    return quantizers.KVRange(spec.num_kv_heads, spec.head_dim, rotary_dim=spec.rotary_dim, rotary_gain=gain)
