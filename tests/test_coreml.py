"""The coreml target on Linux: the package's interface, its ops, its compressed weights against our
quantizer's, the converted torch module against the reference decoder; the coreml backend's
refusal off macOS, and the same weights run by the reference backend; the coreml backend's
predict path generating through a STAND-IN MLModel (tests/standins.py) where Core ML cannot run."""
import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from edge_export.checkpoint import open_checkpoint
from edge_export.cli import main
from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export, quant_rules, resolve_method
from edge_export.quantize import QuantizedWeights
from runtimes.errors import BackendUnavailableError
from runtimes.models import layer_keys

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0): "
                                               "the coreml target cannot convert here")
torch = pytest.importorskip("torch", reason="torch is not installed: the coreml target traces a torch module")

from edge_export.targets.coreml_torch import CoreMLDecoder, TorchModuleBackend, verification_module  # noqa: E402
from runtimes.artifact import load_artifact  # noqa: E402
from runtimes.backends.coreml import MIN_MACOS, CoreMLBackend, macos_version  # noqa: E402
from runtimes.errors import ContextOverflowError  # noqa: E402
from runtimes.weights import ArtifactWeights  # noqa: E402

from .skip_policy import NO_COREML_PREDICTION  # noqa: E402
from .standins import StandinMLModel  # noqa: E402

PROMPTS = ["What is the boiling point of water at sea level in Celsius?", "How do I reverse a string in Python?",
           "Name three primary colors.", "What is 12 times 12?"]
CONSTEXPR = "constexpr_blockwise_shift_scale"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M exported to Core ML int4 (GGUF Q4_1 blocks carried), verified on four prompts."""
    folder = tmp_path_factory.mktemp("coreml")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    manifest = export("smollm2-135m", folder / "smollm2-int4",
                      ExportOptions(target="coreml", quant="int4", prompts=str(prompts), max_context=512, threads=1))
    return folder / "smollm2-int4", manifest


def package_spec(folder):
    return ct.utils.load_spec(str(folder / "model.mlpackage"))


def operations(spec):
    function = spec.mlProgram.functions["main"]
    return list(function.block_specializations[function.opset].operations)


def test_manifest_and_verification(smol):
    folder, manifest = smol
    assert (manifest["target"], manifest["variant"], manifest["backend"]) == ("coreml", "mlprogram", "coreml")
    figures = manifest["verification"]
    assert figures["verified_with"] == "ML Program interpreted in numpy"
    # the converted module against the float reference (the GGUF dequantized): fp16 scales and KV only
    assert figures["kl_mean"] < 0.01 and figures["top1_agreement"] >= 0.95, figures
    assert manifest["quantization"]["tensors"]["model.layers.0.self_attn.q_proj.weight"]["source"] == "decomposed"
    assert "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin" in manifest["files"]


def test_package_inputs_outputs_states(smol):
    folder, manifest = smol
    spec = package_spec(folder)
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15
    inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
    assert set(inputs) == {"input_ids", "causal_mask"}
    ids = inputs["input_ids"]
    assert ids.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    assert [(r.lowerBound, r.upperBound) for r in ids.shapeRange.sizeRanges] == [(1, 1), (1, 512)]
    mask = inputs["causal_mask"]
    assert mask.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert [(r.lowerBound, r.upperBound) for r in mask.shapeRange.sizeRanges] == [(1, 1), (1, 1), (1, 512), (1, 512)]
    (logits,) = spec.description.output
    assert logits.name == "logits" and list(logits.type.multiArrayType.shape) == [1, 1, 49152]
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    assert set(states) == {"key_cache", "value_cache"}
    for state in states.values():
        assert list(state.shape) == [30, 1, 3, 512, 64]  # layers, batch, kv heads, max context, head dim
        assert state.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert manifest["graph"]["states"]["key_cache"]["shape"] == [30, 1, 3, 512, 64]


def test_op_histogram_has_no_float_weight_in_the_linear_layers(smol):
    folder, manifest = smol
    ops = operations(package_spec(folder))
    histogram = manifest["graph"]["ops"]
    # 7 linears a layer, and the tied embedding (Q8_0 blocks) shared by the gather and lm_head
    assert histogram[CONSTEXPR] == 30 * 7 + 1 and histogram["linear"] == 30 * 7 + 1
    assert histogram["read_state"] >= 60 and histogram["write_state"] == 60 and histogram["slice_update"] == 60
    constexpr = {op.outputs[0].name for op in ops if op.type == CONSTEXPR}
    for op in ops:
        if op.type == "linear":
            assert op.inputs["weight"].arguments[0].name in constexpr, op.outputs[0].name
        if op.type == "gather" and op.outputs[0].type.tensorType.rank == 3:  # the embedding lookup
            assert op.inputs["x"].arguments[0].name in constexpr
    # no float matrix is left but the rope tables [max_context, head_dim / 2] (vectors: norms, zero biases)
    for op in (op for op in ops if op.type == "const"):
        tensor = op.outputs[0].type.tensorType
        if tensor.dataType in (ct.proto.MIL_pb2.FLOAT16, ct.proto.MIL_pb2.FLOAT32):
            dims = [d.constant.size for d in tensor.dimensions]
            assert len(dims) < 2 or dims == [512, 32], (op.outputs[0].name, dims)
    kinds = {op.inputs["data"].arguments[0].value.type.tensorType.dataType for op in ops if op.type == CONSTEXPR}
    assert kinds == {ct.proto.MIL_pb2.UINT4, ct.proto.MIL_pb2.INT8}  # Q4_1 codes, Q8_0 codes


def test_compressed_weights_are_our_quantizers(smol):
    """weight.bin, decoded with numpy, holds exactly our QuantizedTensor's codes and (float16) scales."""
    folder, manifest = smol
    ckpt = open_checkpoint("smollm2-135m")
    options = resolve_method(ExportOptions(target="coreml", quant="int4"), ckpt)
    ours = QuantizedWeights(ckpt, quant_rules(options))
    artifact = load_artifact(folder)
    stored = ArtifactWeights(artifact)
    table = manifest["weights"]
    for name in ["model.embed_tokens.weight"] + [ckpt.spec.tensor_name(k, 0) for k in layer_keys(ckpt.spec)]:
        qt, entry = ours.get(name), table[name]
        w = stored(name)
        if entry["format"] == "float":  # norms: float16 of the checkpoint's values
            np.testing.assert_array_equal(w, np.asarray(qt, np.float16).astype(np.float32))
            continue
        codes = stored.raw(dict(entry["data"], shape=[entry["data"]["length"]]))
        scale = stored.raw(entry["scale"])
        # GGUF's d is float16, so exact; a constant Q4_1 block (d = 0) is stored with scale 1
        np.testing.assert_array_equal(scale, np.where(qt.scales == 0, 1, qt.scales).astype(np.float16))
        if qt.bits == 4:  # uint4 codes, two a byte, low nibble first
            unpacked = np.stack([codes & 15, codes >> 4], -1).reshape(qt.shape)
            np.testing.assert_array_equal(unpacked, qt.q)
        else:
            np.testing.assert_array_equal(codes.view(np.int8).reshape(qt.shape), qt.q)
        # Q4_1's offset z - r/d is float16: the weights agree to 1/128 of a quantization step
        step = np.repeat(np.abs(qt.scales), qt.group_size, axis=1)
        assert (np.abs(w - qt.effective_weight()) <= step / 128 + 1e-7).all(), name


def test_weight_bin_reader_agrees_with_coremltools(smol):
    """Our numpy reading of weight.bin against coremltools' own MIL blob reader."""
    from coremltools.libmilstoragepython import _BlobStorageReader
    folder, manifest = smol
    entry = manifest["weights"]["model.layers.3.mlp.down_proj.weight"]
    path = folder / entry["data"]["file"]
    # the 64-byte blob metadata sits right before the data it describes (MILBlob storage v2)
    head = entry["data"]["offset"] - 64
    with open(path, "rb") as f:
        f.seek(head)
        assert struct.unpack("<I", f.read(4))[0] == 0xDEADBEEF
    reader = _BlobStorageReader(str(path))
    theirs = np.asarray(reader.read_uint4_data(head)).reshape(entry["shape"])
    stored = ArtifactWeights(load_artifact(folder))
    codes = stored.raw(dict(entry["data"], shape=[entry["data"]["length"]]))
    np.testing.assert_array_equal(np.stack([codes & 15, codes >> 4], -1).reshape(entry["shape"]), theirs)


def test_converted_module_agrees_with_the_reference_decoder(smol):
    """The module that was traced, rebuilt from weight.bin and run in torch, against the numpy
    reference decoder over the same weights: the only differences are its float16 KV cache and
    the order of float operations."""
    folder, _ = smol
    artifact = load_artifact(folder)
    module = TorchModuleBackend(CoreMLDecoder(artifact.spec, ArtifactWeights(artifact), 512), threads=1)
    reference = runtimes.load(folder, backend="reference")
    kls, agree = [], []
    for prompt in PROMPTS[:2]:
        ids = reference.prompt_ids(prompt)
        a, b = module.prefill(ids), reference.backend.prefill(ids)
        for step in range(5):
            pa, pb = _softmax(a), _softmax(b)
            kls.append(float((pb * (np.log(pb) - np.log(pa))).sum()))
            agree.append(a.argmax() == b.argmax())
            token = int(b.argmax())
            a, b = module.decode(token), reference.backend.decode(token)
    assert np.mean(kls) < 1e-3 and np.mean(agree) == 1.0, (np.mean(kls), np.mean(agree))


def test_coreml_backend_refuses_off_macos_and_reference_runs_the_same_weights(smol):
    folder, _ = smol
    with pytest.raises(BackendUnavailableError, match=r"macOS 15\+.*--backend reference"):
        runtimes.load(folder)
    with pytest.raises(BackendUnavailableError, match=r"macOS 15\+.*--backend reference"):
        runtimes.load(folder, backend="coreml")
    rt = runtimes.load(folder, backend="reference")
    result = rt.generate("What is 2+3?", temperature=0, max_new_tokens=6)
    assert result.new_tokens > 0 and (result.answer or result.thinking).strip()


@pytest.fixture
def standin_coreml(monkeypatch):
    """The coreml backend as on a Mac, with Core ML's MLModel replaced by StandinMLModel (STAND-IN)."""
    monkeypatch.setattr(CoreMLBackend, "available", classmethod(lambda cls: (True, "")))
    monkeypatch.setattr(ct.models, "MLModel", StandinMLModel)
    return StandinMLModel


def test_coreml_backend_generates_through_a_standin_mlmodel(smol, standin_coreml):
    """The backend's own bookkeeping (one state per generation, the causal mask over the cached
    positions, the position count) drives the stand-in; its greedy tokens must be those of the
    module driven by the verification path's own bookkeeping, bit for bit, generation after
    generation."""
    folder, _ = smol
    rt = runtimes.load(folder)  # the manifest's backend
    assert isinstance(rt.backend, CoreMLBackend) and isinstance(rt.backend.model, StandinMLModel)
    module = runtimes.Runtime(rt.artifact, TorchModuleBackend(verification_module(rt.artifact), threads=1))
    for prompt in PROMPTS[:3]:  # a second and third generation: each must start from a fresh state
        ours = rt.generate(prompt, temperature=0, max_new_tokens=12, ignore_eos=True)
        expected = module.generate(prompt, temperature=0, max_new_tokens=12, ignore_eos=True)
        assert ours.tokens == expected.tokens and len(ours.tokens) == 12, prompt
        assert (ours.thinking + ours.answer).strip()
    assert rt.backend.model.predictions == 3 * 12  # a prefill and 11 decodes each


def test_coreml_backend_sends_what_the_package_declares(smol, standin_coreml):
    """The stand-in checks inputs against the package's description, as Core ML does."""
    folder, _ = smol
    backend = runtimes.load(folder).backend
    logits = backend.prefill([1, 2, 3])
    assert logits.shape == (49152,) and logits.dtype == np.float32 and backend.position == 3
    backend.decode(5)
    assert backend.position == 4
    with pytest.raises(ValueError, match=r"input_ids: int64, the model takes int32"):
        backend.model.predict({"input_ids": np.zeros((1, 1), np.int64), "causal_mask": np.zeros((1, 1, 1, 1), np.float16)},
                              state=backend.model.make_state())
    with pytest.raises(ContextOverflowError, match="do not fit the Core ML model's context of 512"):
        backend.prefill(list(range(3, 600)))


def test_coreml_backend_compute_units(smol, standin_coreml):
    folder, _ = smol
    units = {None: ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY, "ane": ct.ComputeUnit.CPU_AND_NE}
    for provider, unit in units.items():
        assert runtimes.load(folder, provider=provider).backend.model.compute_units == unit
    with pytest.raises(BackendUnavailableError, match="--provider 'cuda' is not a Core ML compute unit"):
        runtimes.load(folder, provider="cuda")


@pytest.mark.skipif((macos_version() or (0,)) < MIN_MACOS, reason=f"{NO_COREML_PREDICTION}: runs Core ML itself")
def test_core_ml_itself_agrees_with_the_standin(smol):  # pragma: no cover - macOS 15+ only
    folder, _ = smol
    real = runtimes.load(folder)
    standin = runtimes.Runtime(real.artifact, TorchModuleBackend(verification_module(real.artifact)))
    ours = real.generate(PROMPTS[0], temperature=0, max_new_tokens=8, ignore_eos=True)
    theirs = standin.generate(PROMPTS[0], temperature=0, max_new_tokens=8, ignore_eos=True)
    assert ours.tokens[:4] == theirs.tokens[:4]  # float16 compute on Core ML vs torch's


def test_cli_export_and_run(tiny_llama, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cm"
    result = runner.invoke(main, ["export", str(tiny_llama), "-o", str(out), "--target", "coreml", "--quant", "int4",
                                  "--max-kl", "100", "--min-top1", "0", "--max-context", "256"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["run", str(out), "hello", "--backend", "reference", "--max-new-tokens", "5",
                                  "--temperature", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["run", str(out), "hello"])
    assert result.exit_code == 2 and "macOS 15+" in result.output and "--backend reference" in result.output


@pytest.mark.parametrize("quant,extra", [("int4", {}), ("int4", {"symmetric": False}), ("int8", {}), ("fp16", {})])
def test_schemes_round_trip(tiny_llama, tmp_path, quant, extra):
    """Each scheme's stored form decodes to the module's weights (checked at export), and the
    module and the reference backend compute the same thing from them."""
    folder = tmp_path / "a"
    manifest = export(tiny_llama, folder, ExportOptions(target="coreml", quant=quant, max_context=128, verify=False,
                                                        **extra))
    histogram = manifest["graph"]["ops"]
    assert histogram.get(CONSTEXPR, 0) == (0 if quant == "fp16" else 2 * 7 + 2)  # + embedding, lm_head
    entry = manifest["weights"]["model.layers.1.mlp.up_proj.weight"]
    kind = {"int4": "int4", "int8": None}.get(quant)
    if quant == "int4" and not extra.get("symmetric", True):
        kind = "uint4"
        assert entry["offset"]["packed"] == "uint4"  # zero points as uint4 offsets
    if kind:
        assert entry["data"]["packed"] == kind
    _module_matches_reference(folder, ids=list(range(3, 40)))


def test_every_architecture(tiny_checkpoint, tmp_path):
    """q/k/v biases (Qwen2) and q/k norms (Qwen3) convert and stay float; a tied head (Phi-3) reads
    the embedding's one quantized table."""
    folder = tmp_path / "a"
    manifest = export(tiny_checkpoint, folder, ExportOptions(target="coreml", quant="int4", max_context=128, verify=False))
    tables = 1 if manifest["model"]["tied_embeddings"] else 2
    assert manifest["graph"]["ops"][CONSTEXPR] == 2 * 7 + tables
    _module_matches_reference(folder, ids=list(range(3, 30)))


def test_what_coreml_cannot_carry(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="--quant fp8 cannot be carried by target coreml"):
        export(tiny_llama, tmp_path / "x", ExportOptions(target="coreml", quant="fp8"))
    with pytest.raises(ExportError, match="--quant fp32 cannot be carried by target coreml"):
        export(tiny_llama, tmp_path / "y", ExportOptions(target="coreml", quant="fp32"))
    assert list(tmp_path.iterdir()) == []


def _module_matches_reference(folder, ids):
    artifact = load_artifact(folder)
    module = TorchModuleBackend(CoreMLDecoder(artifact.spec, ArtifactWeights(artifact), artifact.manifest["max_context"]))
    reference = runtimes.load(folder, backend="reference").backend
    a, b = module.prefill(ids), reference.prefill(ids)
    np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max())
    for token in (5, 9):
        a, b = module.decode(token), reference.decode(token)
        np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max())


def _softmax(logits):
    z = np.exp(logits.astype(np.float64) - logits.max())
    return z / z.sum()
