"""The ort ONNX variant against the numpy reference decoder, per architecture.

fp32 graphs match the reference within 1e-4; quantized graphs (accuracy_level 0) match the
reference run on the *dequantized* weights within 1e-3, so the graph is shown exact apart from
quantization itself. Also: graph structure and names, the streamed external data, and
onnxruntime-genai generating the same greedy tokens as a plain onnxruntime loop.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from edge_export.errors import ExportError
from edge_export.presets import preset_spec
from edge_export.targets.onnx_ort import build_ort_decoder, genai_config
from quantizers import Fp8Config, Int4Config, Int8Config, from_gguf_blocks, quantize
from runtimes.reference import ReferenceDecoder

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ARCHS = {"llama": "r1-distill-llama-8b", "qwen2": "r1-distill-qwen-1.5b", "qwen3": "r1-0528-qwen3-8b"}
VOCAB, MAX_CONTEXT = 512, 48
SPECIAL_IDS = [VOCAB - 6 + i for i in range(6)]
LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight", "embed_tokens.weight")


def small_spec(arch: str, **changes):
    return dataclasses.replace(preset_spec(ARCHS[arch], "tiny"), vocab_size=VOCAB, bos_token_id=SPECIAL_IDS[0],
                               eos_token_ids=(SPECIAL_IDS[1],), **changes)


class Weights:
    """``get(name)`` as the builder wants it; ``dequantized(name)`` as the reference wants it."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get(self, name):
        return self.tensors[name]

    def dequantized(self, name):
        value = self.tensors[name]
        return value if isinstance(value, np.ndarray) else value.effective_weight()


def random_weights(spec, seed: int = 0, std: float = 0.08) -> dict:
    rng, out = np.random.default_rng(seed), {}
    for name, shape in spec.tensor_shapes().items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("bias"):
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def gguf_q4_1(w: np.ndarray):
    """w quantized as llama.cpp's Q4_1 (fp16 d and m per 32), carried as a residual tensor."""
    n, k = w.shape
    groups = w.reshape(n, k // 32, 32)
    lo, hi = groups.min(-1), groups.max(-1)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.round((groups - m[..., None]) / np.where(d > 0, d, 1)[..., None]), 0, 15)
    return from_gguf_blocks("Q4_1", d, q.astype(np.uint8).reshape(n, k), m)


def awq_like(weights: dict) -> dict:
    """int4 codes of W * s with AWQ's input_scale s: shared by q/k/v and by gate/up (folded into
    their RMSNorm), own for o/down/embedding/lm_head (an explicit Mul)."""
    rng, shared, out = np.random.default_rng(7), {}, {}
    for name, w in weights.items():
        if not name.endswith(LINEAR_SUFFIXES):
            out[name] = w
            continue
        kind = name.split(".")[-2]
        group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}.get(kind, name)
        key = (name.split(".layers.")[-1].split(".")[0], group)
        s = shared.setdefault(key, (0.5 + rng.random(w.shape[1])).astype(np.float32))
        out[name] = dataclasses.replace(quantize(w * s, Int4Config(32), name), input_scale=s)
    return out


QUANTIZERS = {
    "int4": lambda w, name: quantize(w, Int4Config(32), name),
    "int4_asymmetric": lambda w, name: quantize(w, Int4Config(32, symmetric=False), name),
    "int8_per_row": lambda w, name: quantize(w, Int8Config(None), name),
    "gguf_q4_1": lambda w, name: gguf_q4_1(w),
}


def quantized(weights: dict, kind: str) -> dict:
    if kind == "awq":
        return awq_like(weights)
    return {n: QUANTIZERS[kind](w, n) if n.endswith(LINEAR_SUFFIXES) else w for n, w in weights.items()}


class OrtDecoder:
    """onnxruntime over the exported graph the way onnxruntime-genai drives it: IOBinding, one
    preallocated [1, kv_heads, max_context, head_dim] buffer per layer bound as past and present."""

    def __init__(self, folder, spec, max_context: int = MAX_CONTEXT, kv_dtype=np.float32):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        shape = (1, spec.num_kv_heads, max_context, spec.head_dim)
        self.kv = {f"{i}.{kind}": ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, kv_dtype))
                   for i in range(spec.num_layers) for kind in ("key", "value")}
        self.length = 0

    def __call__(self, ids) -> np.ndarray:
        """Logits [positions returned, vocab] after feeding ``ids``."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        self.length += ids.shape[1]
        binding = self.session.io_binding()
        binding.bind_output("logits")
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, self.length), np.int64))
        for name, buffer in self.kv.items():
            binding.bind_ortvalue_input(f"past_key_values.{name}", buffer)
            binding.bind_ortvalue_output(f"present.{name}", buffer)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0]

    def greedy(self, prompt, new_tokens: int) -> list[int]:
        token, out = int(self(prompt)[-1].argmax()), []
        for _ in range(new_tokens):
            out.append(token)
            token = int(self([token])[-1].argmax())
        return out


def reference_steps(spec, weights_fn, ids, prefill: int, all_logits: bool) -> list[np.ndarray]:
    decoder = ReferenceDecoder(spec, weights_fn, max_context=MAX_CONTEXT)
    decoder.reset()
    first = decoder.forward(ids[:prefill], all_logits=all_logits)
    return [first if all_logits else first[None]] + [decoder.decode(int(t))[None] for t in ids[prefill:]]


def max_error(folder, spec, weights_fn, all_logits=False, kv_dtype=np.float32, prefill=13, decode=5) -> float:
    ids = np.random.default_rng(1).integers(0, VOCAB - 6, prefill + decode)
    model = OrtDecoder(folder, spec, kv_dtype=kv_dtype)
    ours = [model(ids[:prefill])] + [model([t]) for t in ids[prefill:]]
    ref = reference_steps(spec, weights_fn, ids, prefill, all_logits)
    assert [o.shape for o in ours] == [r.shape for r in ref]
    return max(float(np.abs(o - r).max()) for o, r in zip(ours, ref))


# ---- numerics ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_matches_reference(arch, tmp_path):
    spec = small_spec(arch)
    weights = random_weights(spec)
    build_ort_decoder(spec, Weights(weights), tmp_path, max_context=MAX_CONTEXT, all_logits=True)
    assert max_error(tmp_path, spec, weights.__getitem__, all_logits=True) < 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_int4_matches_reference_on_dequantized_weights(arch, tmp_path):
    spec = small_spec(arch)
    weights = Weights(quantized(random_weights(spec), "int4"))
    build_ort_decoder(spec, weights, tmp_path, max_context=MAX_CONTEXT, accuracy_level=0)
    assert max_error(tmp_path, spec, weights.dequantized) < 1e-3


@pytest.mark.parametrize("kind", ["int4_asymmetric", "int8_per_row", "gguf_q4_1", "awq"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_carried_weights_are_exact(kind, tied, tmp_path):
    """Asymmetric zero points, int8, GGUF Q4_1's residual and AWQ's input scale all reach the
    graph exactly, through MatMulNBits and (tied) the GatherBlockQuantized embedding."""
    spec = small_spec("qwen2", tied_embeddings=tied)
    weights = Weights(quantized(random_weights(spec), kind))
    build_ort_decoder(spec, weights, tmp_path, max_context=MAX_CONTEXT, accuracy_level=0)
    assert max_error(tmp_path, spec, weights.dequantized) < 1e-3


def test_float16_kv_cache(tmp_path):
    spec = small_spec("qwen3")
    weights = random_weights(spec)
    build_ort_decoder(spec, Weights(weights), tmp_path, max_context=MAX_CONTEXT, kv_dtype="float16")
    assert max_error(tmp_path, spec, weights.__getitem__, kv_dtype=np.float16) < 2e-2  # K/V rounded to fp16


# ---- structure -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_tied_graph(tmp_path_factory):
    spec = small_spec("qwen3", tied_embeddings=True)
    folder = tmp_path_factory.mktemp("int4_tied")
    files = build_ort_decoder(spec, Weights(quantized(random_weights(spec), "int4")), folder, max_context=MAX_CONTEXT)
    return spec, folder, files, onnx.load(str(folder / "model.onnx"), load_external_data=False)


def test_int4_graph_structure(int4_tied_graph):
    spec, _, _, model = int4_tied_graph
    ops = Counter(n.op_type for n in model.graph.node)
    linears_per_layer = 4  # q/k/v, o, gate/up, down
    assert ops["MatMulNBits"] == spec.num_layers * linears_per_layer + 1
    assert ops["GroupQueryAttention"] == spec.num_layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * spec.num_layers
    assert ops["GatherBlockQuantized"] == 1
    assert "MatMul" not in ops  # no float weight anywhere
    names = {n.name for n in model.graph.node}
    for i in range(spec.num_layers):
        assert {f"/model/layers.{i}/attn/qkv_proj/MatMulNBits", f"/model/layers.{i}/attn/GroupQueryAttention",
                f"/model/layers.{i}/attn/o_proj/MatMulNBits", f"/model/layers.{i}/mlp/gate_up_proj/MatMulNBits",
                f"/model/layers.{i}/mlp/down_proj/MatMulNBits", f"/model/layers.{i}/attn/q_norm/SimplifiedLayerNorm",
                f"/model/layers.{i}/post_attention_layernorm/SkipSimplifiedLayerNorm"} <= names
    assert {"/model/layers.0/input_layernorm/SimplifiedLayerNorm", "/model/norm/SkipSimplifiedLayerNorm",
            "/model/embed_tokens/GatherBlockQuantized", "/lm_head/MatMulNBits"} <= names
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["num_heads"] == spec.num_heads and attrs["kv_num_heads"] == spec.num_kv_heads
    assert abs(attrs["scale"] - spec.head_dim ** -0.5) < 1e-7


def test_tied_table_is_stored_once(int4_tied_graph):
    _, _, _, model = int4_tied_graph
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["/model/embed_tokens/GatherBlockQuantized"].input[0] == nodes["/lm_head/MatMulNBits"].input[1]


def test_io_names_and_shapes(int4_tied_graph):
    spec, _, _, model = int4_tied_graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    kv = ["batch_size", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    assert inputs == {"input_ids": ["batch_size", "sequence_length"],
                      "attention_mask": ["batch_size", "total_sequence_length"],
                      **{f"past_key_values.{i}.{k}": kv for i in range(spec.num_layers) for k in ("key", "value")}}
    assert outputs["logits"] == ["batch_size", 1, spec.vocab_size]
    assert outputs["present.1.value"] == ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim]


def test_weights_stream_to_one_external_file(int4_tied_graph):
    _, folder, files, model = int4_tied_graph
    assert files == ["model.onnx", "model.onnx.data", "genai_config.json"]
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(t.name.startswith("/model/constants/") for t in inline)
    ends = []
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx.data"
        ends.append((int(info["offset"]), int(info["offset"]) + int(info["length"])))
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # written in order, never overlapping
    assert ends[-1][1] == (folder / "model.onnx.data").stat().st_size
    assert (folder / "model.onnx").stat().st_size < 64 * 1024


# ---- onnxruntime-genai -----------------------------------------------------------------------

@pytest.mark.parametrize("arch,kv_dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "float32"),
                                           ("qwen3", "float16")])
def test_genai_generates_like_onnxruntime(arch, kv_dtype, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from edge_export.fixtures import R1_SPECIALS, byte_level_tokenizer

    spec = small_spec(arch)
    build_ort_decoder(spec, Weights(quantized(random_weights(spec), "int4")), tmp_path, max_context=MAX_CONTEXT,
                      kv_dtype=kv_dtype)
    byte_level_tokenizer(VOCAB, SPECIAL_IDS).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1], "tokenizer_class": "PreTrainedTokenizerFast"}))
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB - 6, 12)]
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=MAX_CONTEXT, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    assert len(theirs) >= 8
    assert theirs == OrtDecoder(tmp_path, spec, kv_dtype=np.dtype(kv_dtype)).greedy(prompt, len(theirs))


def test_genai_config_fields():
    spec = small_spec("qwen3")
    config = genai_config(spec, max_context=1024, search={"top_k": 20})
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "qwen3"
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (
        spec.head_dim, spec.num_kv_heads, spec.num_layers)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["search"]["past_present_share_buffer"] is True
    assert config["search"]["max_length"] == config["model"]["context_length"] == 1024
    assert (config["search"]["temperature"], config["search"]["top_p"], config["search"]["top_k"]) == (0.6, 0.95, 20)
    assert config["model"]["eos_token_id"] == SPECIAL_IDS[1]
    with pytest.raises(ExportError, match="context_length=2048 exceeds max_context=1024"):
        genai_config(spec, max_context=1024, context_length=2048)


# ---- errors --------------------------------------------------------------------------------

def test_bad_options_and_weights_are_named(tmp_path):
    spec = small_spec("llama")
    weights = random_weights(spec)
    with pytest.raises(ExportError, match="kv_dtype 'int4' is not supported"):
        build_ort_decoder(spec, Weights(weights), tmp_path / "a", max_context=MAX_CONTEXT, kv_dtype="int4")
    with pytest.raises(ExportError, match=r"an int8 KV cache needs calibrated scales: weights must offer kv_scales"):
        build_ort_decoder(spec, Weights(weights), tmp_path / "a", max_context=MAX_CONTEXT, kv_dtype="int8")
    with pytest.raises(ExportError, match="max_context=8192 must be in 1..4096"):
        build_ort_decoder(spec, Weights(weights), tmp_path / "a", max_context=8192)
    bad = dict(weights, **{"model.layers.1.mlp.up_proj.weight": weights["model.layers.1.mlp.up_proj.weight"][:, :64]})
    with pytest.raises(ExportError, match=r"model.layers.1.mlp.up_proj.weight: shape \(256, 64\) does not match"):
        build_ort_decoder(spec, Weights(bad), tmp_path / "b", max_context=MAX_CONTEXT)
    name = "model.layers.0.self_attn.o_proj.weight"
    fp8 = dict(weights, **{name: quantize(weights[name], Fp8Config(), name)})
    with pytest.raises(ExportError, match=f"{name}: fp8 weights have no MatMulNBits form"):
        build_ort_decoder(spec, Weights(fp8), tmp_path / "c", max_context=MAX_CONTEXT)
    assert not (tmp_path / "c" / "model.onnx.data").exists()  # a failed build leaves no partial data
