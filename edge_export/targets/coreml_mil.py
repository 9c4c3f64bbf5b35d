"""The `coreml` target's default variant, `mlprogram`: the ML Program built op by op with
coremltools' MIL builder from the decoder description, no torch and no float copy of the model.

Every weight is quantized, packed into its Core ML stored form (coreml_weights.pack_weight) and
written aside to a spill file as the program is built, tensor by tensor, layer by layer; the
program's consts hold zero-byte placeholders of the right shape and type (broadcast views), so
building a 7B program takes a few MB. When coremltools serializes the program it asks, for each
const, for its bytes: :func:`_spilled_blobs` hands it that tensor's bytes from the spill file,
one tensor at a time. Peak memory is about one tensor in float32 plus its codes, not the model.

The program computes what ``coreml_torch.CoreMLDecoder`` (`--variant traced`) computes, in
float16: the same inputs (``input_ids`` int32 [1, seq], ``causal_mask`` float16 [1, 1, seq, end]),
output (``logits`` float16 [1, 1, vocab], the last position's) and states (``key_cache`` /
``value_cache`` float16 [layers, 1, kv_heads, max_context, head_dim], read with ``read_state`` and
written with ``coreml_update_state``), so runtimes' coreml and reference backends run either.
Since no module stands behind it, its export is verified by interpreting the saved package op by
op in numpy (coreml_interp.py).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from runtimes import rope
from runtimes.models import describe

from ..errors import ExportError
from .coreml_weights import CoreMLWeight, _op_name, pack_weight

log = logging.getLogger(__name__)
NORM_FLOOR = 1.0  # as coreml_torch: rms_norm's pre-scale is max|x| but at least this
FP16 = np.float16
KEY_CACHE, VALUE_CACHE = "key_cache", "value_cache"  # the Core ML state names


class SpilledConsts:
    """Arrays the program's consts stand for, written to ``path`` as they are made; each const in
    the program holds a broadcast placeholder (no memory) until serialization asks for its bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.entries: dict[str, tuple[int, np.dtype, tuple]] = {}

    def const(self, mb, value: np.ndarray, name: str):
        from coremltools.converters.mil.backend.mil.load import should_use_weight_file

        value = np.asarray(value)
        if not should_use_weight_file(value, IOS18_SPEC):  # small ones are inlined in the program
            return mb.const(val=value, name=name)
        self.entries[name] = (self.file.tell(), value.dtype, value.shape)
        np.ascontiguousarray(value).view(np.uint8).tofile(self.file)
        placeholder = np.broadcast_to(np.zeros((1,) * value.ndim, value.dtype), value.shape)
        return mb.const(val=placeholder, name=name)

    def read(self, name: str) -> np.ndarray:
        offset, dtype, shape = self.entries[name]
        count = int(np.prod(shape))
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = np.fromfile(f, dtype=np.uint8, count=count * dtype.itemsize)
        return raw.view(dtype).reshape(shape)

    def close(self) -> None:
        self.file.close()


IOS18_SPEC = 9  # Core ML specification version of iOS 18 / macOS 15


@contextmanager
def _spilled_blobs(spill: SpilledConsts):
    """While coremltools serializes: a placeholder const's blob is written from the spill file."""
    from coremltools.converters.mil.backend.mil import helper

    original = helper._get_offset_by_writing_data

    class Loaded:
        def __init__(self, var, val):
            self.dtype, self.val = var.dtype, val

    def write(var, blob_writer):
        if var.op is None or var.op.name not in spill.entries:
            return original(var, blob_writer)
        return original(Loaded(var, spill.read(var.op.name)), blob_writer)

    helper._get_offset_by_writing_data = write
    try:
        yield
    finally:
        helper._get_offset_by_writing_data = original


class ProgramBuilder:
    """Walks the decoder description and emits MIL ops (inside an ``mb.program`` function)."""

    def __init__(self, mb, types, spec, weights, spill: SpilledConsts, max_context: int):
        self.mb, self.types, self.spec, self.spill = mb, types, spec, spill
        self.weights, self.max_context = weights, max_context
        self.packed: dict[str, CoreMLWeight] = {}  # HF name -> its stored form, arrays as placeholders
        self.layer = describe(spec)

    # ---- weights -----------------------------------------------------------------------
    def weight(self, name: str):
        """The Var of HF tensor ``name``: float16 const, constexpr_blockwise_shift_scale, or
        constexpr_lut_to_dense (palettized)."""
        mb = self.mb
        stored = pack_weight(name, self.weights.get(name))
        tag = _op_name(name)
        if not stored.quantized:
            var = self.spill.const(mb, stored.value, tag)
            self.packed[name] = CoreMLWeight(name, value=_placeholder(stored.value))
            return var
        if stored.indices is not None:
            return self.lut_weight(name, stored, tag)
        sub_byte = {"int4": self.types.np_int4_dtype, "uint4": self.types.np_uint4_dtype}
        data = stored.data.astype(sub_byte.get(stored.data_type, stored.data.dtype))
        inputs = {"data": self.spill.const(mb, data, f"{tag}_data"),
                  "scale": self.spill.const(mb, stored.scale, f"{tag}_scale")}
        offset = None
        if stored.offset is not None:
            offset = stored.offset if stored.offset.dtype == np.float16 else stored.offset.astype(data.dtype)
            inputs["offset"] = self.spill.const(mb, offset, f"{tag}_offset")
        self.packed[name] = CoreMLWeight(
            name, data=_placeholder(stored.data), data_type=stored.data_type, scale=_placeholder(stored.scale),
            offset=None if offset is None else _placeholder(stored.offset))
        return mb.constexpr_blockwise_shift_scale(**inputs, name=tag)

    def lut_weight(self, name: str, stored: CoreMLWeight, tag: str):
        """iOS 18 constexpr_lut_to_dense(indices uint4 [N, K], lut fp16 [N/rows, 1, 16, 1]) -> fp16
        [N, K] with ``out[n, k] = lut[n // rows, 0, indices[n, k], 0]`` (runtimes' decode_lut)."""
        indices = stored.indices.astype(self.types.np_uint4_dtype)
        inputs = {"indices": self.spill.const(self.mb, indices, f"{tag}_indices"),
                  "lut": self.spill.const(self.mb, stored.lut, f"{tag}_lut")}
        self.packed[name] = CoreMLWeight(name, indices=_placeholder(stored.indices), lut=_placeholder(stored.lut))
        return self.mb.constexpr_lut_to_dense(**inputs, name=tag)

    def layer_weight(self, key: str, i: int):
        return self.weight(self.spec.tensor_name(key, i))

    # ---- small helpers -----------------------------------------------------------------
    def dim(self, x, axis: int):
        """The size of ``x`` along ``axis`` as an int32 scalar Var."""
        return self.mb.gather(x=self.mb.shape(x=x), indices=np.int32(axis), axis=0)

    def vector(self, *parts):
        """A 1-D int32 Var from python ints and int32 scalar Vars."""
        mb = self.mb
        pieces = [mb.expand_dims(x=p, axes=[0]) if not isinstance(p, (int, np.integer)) else
                  np.array([p], np.int32) for p in parts]
        return mb.concat(values=pieces, axis=0)

    def rms_norm(self, x, weight, eps: float):
        """As coreml_torch.rms_norm: computed on x / max|x| so float16 squares cannot overflow."""
        mb = self.mb
        scale = mb.clip(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True),
                        alpha=FP16(NORM_FLOOR), beta=FP16(np.finfo(np.float16).max))
        y = mb.real_div(x=x, y=scale)
        variance = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
        floor = mb.real_div(x=FP16(eps), y=mb.mul(x=scale, y=scale))
        return mb.mul(x=mb.mul(x=y, y=mb.rsqrt(x=mb.add(x=variance, y=floor))), y=weight)

    def rotate(self, x, cos, sin, half: int, head_dim: int):
        """rotate_half over the first 2*half channels of x [1, heads, seq, head_dim]."""
        mb = self.mb
        part = lambda a, b: mb.slice_by_index(x=x, begin=[0, 0, 0, a], end=[0, 0, 0, b],  # noqa: E731
                                              begin_mask=[True, True, True, False],
                                              end_mask=[True, True, True, False])
        x1, x2 = part(0, half), part(half, 2 * half)
        pieces = [mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin)),
                  mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))]
        if 2 * half < head_dim:
            pieces.append(part(2 * half, head_dim))
        return mb.concat(values=pieces, axis=-1)

    # ---- the program -------------------------------------------------------------------
    def build(self, input_ids, causal_mask, key_cache, value_cache):
        mb, spec = self.mb, self.spec
        seq, end = self.dim(input_ids, 1), self.dim(causal_mask, 3)
        past = mb.sub(x=end, y=seq, name="past")
        embed = self.weight(spec.tensor_name("embed"))
        h = mb.gather(x=embed, indices=input_ids, axis=0)  # [1, seq, hidden]
        cos, sin = self.rope_rows(past, end)
        mask = mb.expand_dims(x=causal_mask, axes=[1])  # [1, 1, 1, seq, end]
        for i in range(spec.num_layers):
            h = self.decoder_layer(h, i, cos, sin, mask, key_cache, value_cache, past, end)
        last = mb.slice_by_index(x=h, begin=[0, -1, 0], end=[0, 0, 0], end_mask=[True, True, True])
        x = self.rms_norm(last, self.weight(spec.tensor_name("final_norm")), spec.rms_norm_eps)
        head = embed if spec.tied_embeddings else self.weight(spec.tensor_name("lm_head"))
        return mb.linear(x=x, weight=head, name="logits")

    def rope_rows(self, past, end):
        """cos / sin rows past..end-1 [seq, rotary_dim/2] float16; with LongRoPE the long set when
        the sequence (``end``) is longer than the original context."""
        mb = self.mb
        r = rope.Rope.for_spec(self.spec)
        positions = np.arange(self.max_context)
        sets = [("", r.table(positions))] + ([("_long", r.table(positions, long=True))] if r.switch else [])
        rows = []
        for suffix, (cos, sin) in sets:
            begin, stop = self.vector(past, 0), self.vector(end, 0)
            pick = lambda table, name: mb.slice_by_index(  # noqa: E731
                x=self.spill.const(mb, table.astype(FP16), name), begin=begin, end=stop, end_mask=[False, True])
            rows.append((pick(cos, f"rope_cos{suffix}"), pick(sin, f"rope_sin{suffix}")))
        if r.switch is None:
            return rows[0]
        long = mb.greater(x=end, y=np.int32(r.switch))
        return tuple(mb.select(cond=long, a=lg, b=sh) for sh, lg in zip(rows[0], rows[1]))

    def decoder_layer(self, h, i, cos, sin, mask, key_cache, value_cache, past, end):
        mb, steps = self.mb, self.layer
        x = self.rms_norm(h, self.layer_weight(steps.attn_norm.weight, i), steps.attn_norm.eps)
        h = mb.add(x=h, y=self.attention(x, i, cos, sin, mask, key_cache, value_cache, past, end))
        x = self.rms_norm(h, self.layer_weight(steps.mlp_norm.weight, i), steps.mlp_norm.eps)
        m = steps.mlp
        gate = mb.silu(x=mb.linear(x=x, weight=self.layer_weight(m.gate, i)))
        up = mb.linear(x=x, weight=self.layer_weight(m.up, i))
        return mb.add(x=h, y=mb.linear(x=mb.mul(x=gate, y=up), weight=self.layer_weight(m.down, i)),
                      name=f"layer_{i}_out")

    def attention(self, x, i, cos, sin, mask, key_cache, value_cache, past, end):
        mb, a = self.mb, self.layer.attention
        heads, kv, hd = a.heads, a.kv_heads, a.head_dim
        biases = [self.layer_weight(key, i) for key in a.bias] if a.bias else [None] * 3

        def project(key, bias, n):
            y = mb.linear(x=x, weight=self.layer_weight(key, i), **({"bias": bias} if bias is not None else {}))
            return mb.transpose(x=mb.reshape(x=y, shape=[1, -1, n, hd]), perm=[0, 2, 1, 3])  # [1, n, seq, hd]

        q, k, v = project(a.q, biases[0], heads), project(a.k, biases[1], kv), project(a.v, biases[2], kv)
        if a.head_norm:
            q = self.rms_norm(q, self.layer_weight(a.head_norm[0].weight, i), a.head_norm[0].eps)
            k = self.rms_norm(k, self.layer_weight(a.head_norm[1].weight, i), a.head_norm[1].eps)
        half = a.rotary_dim // 2
        q, k = self.rotate(q, cos, sin, half, hd), self.rotate(k, cos, sin, half, hd)
        keys = self.cache_update(key_cache, k, i, past, end)
        values = self.cache_update(value_cache, v, i, past, end)
        qg = mb.mul(x=mb.reshape(x=q, shape=[1, kv, heads // kv, -1, hd]), y=FP16(1.0 / math.sqrt(hd)))
        scores = mb.add(x=mb.matmul(x=qg, y=keys, transpose_y=True), y=mask)  # [1, kv, group, seq, end]
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=values)  # [1, kv, group, seq, hd]
        out = mb.transpose(x=mb.reshape(x=out, shape=[1, heads, -1, hd]), perm=[0, 2, 1, 3])
        out = mb.reshape(x=out, shape=[1, -1, heads * hd])
        return mb.linear(x=out, weight=self.layer_weight(a.o, i))

    def cache_update(self, state, new, i: int, past, end):
        """Write ``new`` [1, kv, seq, hd] at positions past..end-1 of layer i's cache; return the
        layer's cache up to ``end`` as [1, kv, 1, end, hd]."""
        mb, a = self.mb, self.layer.attention
        cache = mb.read_state(input=state)
        update = mb.expand_dims(x=new, axes=[0])  # [1, 1, kv, seq, hd]
        written = mb.slice_update(x=cache, update=update, begin=self.vector(i, 0, 0, past, 0),
                                  end=self.vector(i + 1, 1, a.kv_heads, end, a.head_dim))
        written = mb.coreml_update_state(state=state, value=written)
        rows = mb.slice_by_index(x=written, begin=self.vector(i, 0, 0, 0, 0),
                                 end=self.vector(i + 1, 1, a.kv_heads, end, a.head_dim))
        return mb.reshape(x=rows, shape=[1, a.kv_heads, 1, -1, a.head_dim])


def _placeholder(value: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.zeros((1,) * value.ndim, value.dtype), value.shape)


def build_program(spec, weights, folder: Path, max_context: int):
    """The pymil Program and the HF name -> stored form map (placeholders), with every weight
    written to ``folder``'s spill file."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    seq, end = get_new_symbol(), get_new_symbol()
    cache = (spec.num_layers, 1, spec.num_kv_heads, max_context, spec.head_dim)
    spill = SpilledConsts(folder / "weights.spill")
    builder = ProgramBuilder(mb, types, spec, weights, spill, max_context)
    specs = [mb.TensorSpec(shape=(1, seq), dtype=types.int32), mb.TensorSpec(shape=(1, 1, seq, end), dtype=types.fp16),
             mb.StateTensorSpec(shape=cache, dtype=types.fp16), mb.StateTensorSpec(shape=cache, dtype=types.fp16)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def program(input_ids, causal_mask, key_cache, value_cache):
        return builder.build(input_ids, causal_mask, key_cache, value_cache)

    spill.close()
    function = program.functions["main"]
    expected = ["input_ids", "causal_mask", KEY_CACHE, VALUE_CACHE]
    if list(function.inputs) != expected:
        raise ExportError(f"the MIL builder named the inputs {list(function.inputs)}, expected {expected} "
                          "(tested: coremltools 9.0)")
    ranges = ct.RangeDim(1, max_context, default=1)
    function.input_types = [ct.TensorType("input_ids", shape=(1, ranges), dtype=np.int32),
                            ct.TensorType("causal_mask", shape=(1, 1, ranges, ct.RangeDim(1, max_context, default=1)),
                                          dtype=np.float16)]
    return program, builder.packed, spill


def save_program(program, spill: SpilledConsts, package: Path, description: str) -> None:
    """Serialize ``program`` to ``package``, each placeholder's bytes read from the spill file."""
    import coremltools as ct

    with _spilled_blobs(spill):
        model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.short_description = description
    model.save(str(package))
