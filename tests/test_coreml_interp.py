"""The coreml export verified off macOS by interpreting the saved ML Program in numpy
(edge_export/targets/coreml_interp.py): it computes what the torch module the traced variant
converts computes, on packages of both variants and every architecture, and on SmolLM2's real
weights; it sees a miswired program whose weights are intact (the torch module cannot); it
refuses an op it does not know; batched runs equal one-by-one runs; an export records it."""
import json
import shutil

import numpy as np
import pytest

from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export
from edge_export.verify import FixedReference, LayerMajorScorer, compare
from runtimes.artifact import read_manifest

from .conftest import ARCH_PRESETS, greedy_match_both_ways, small_vocab_checkpoint

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0): "
                                               "the coreml target cannot convert here")
torch = pytest.importorskip("torch", reason="torch is not installed: the traced variant cannot convert here")

from edge_export.checkpoint import open_checkpoint  # noqa: E402
from edge_export.targets.coreml_interp import Program, ProgramScorer, program_scorer  # noqa: E402
from edge_export.targets.coreml_kernels import BlockwiseShiftScale, LutToDense  # noqa: E402
from edge_export.targets.coreml_torch import TorchModuleScorer, verification_module  # noqa: E402

MODEL = "Data/com.apple.CoreML/model.mlmodel"
WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"
MAX_CONTEXT = 96  # past the tiny Phi-3's LongRoPE switch (64)
PROMPTS = [[5, 9, 30, 2, 77], list(range(40, 52)), [300, 7]]
CONTINUATIONS = [[3, 4, 5, 6, 7, 8, 9, 10], [100, 200, 300], [11, 12, 13, 14, 15]]


@pytest.fixture(scope="module", params=sorted(ARCH_PRESETS))
def packages(request, tmp_path_factory):
    """One architecture's tiny checkpoint exported both ways (unverified)."""
    folder = tmp_path_factory.mktemp("interp")
    ckpt = small_vocab_checkpoint(ARCH_PRESETS[request.param], folder / "ckpt")
    out = {}
    for variant in ("mlprogram", "traced"):
        export(str(ckpt), folder / variant, ExportOptions(target="coreml", variant=variant, quant="int4",
                                                          max_context=MAX_CONTEXT, verify=False))
        out[variant] = read_manifest(folder / variant)
    return request.param, ckpt, out


def _agree(artifact, prompts, continuations, n_new=10, atol=0.02):
    """The interpreter and the torch module: close log-probs, the same argmaxes and greedy tokens."""
    interp = program_scorer(artifact, None)
    module = TorchModuleScorer(verification_module(artifact))
    ours, theirs = interp.teacher_forced(prompts, continuations), module.teacher_forced(prompts, continuations)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=atol)
        assert (a.argmax(-1) == b.argmax(-1)).all()
    assert interp.greedy(prompts, n_new)[0] == module.greedy(prompts, n_new)[0]


@pytest.mark.parametrize("variant", ["mlprogram", "traced"])
def test_interpreter_agrees_with_the_torch_module(packages, variant):
    arch, _, out = packages
    prompts, continuations = PROMPTS, CONTINUATIONS
    if arch == "Phi3ForCausalLM":  # one sequence crosses LongRoPE's switch from short to long factors
        prompts = PROMPTS + [list(range(100, 158))]
        continuations = CONTINUATIONS + [list(range(200, 214))]
    _agree(out[variant], prompts, continuations)


def test_interpreter_agrees_on_smollm2(tmp_path):
    """SmolLM2-135M's real weights (its GGUF's Q4_1 blocks carried), the built program."""
    export("smollm2-135m", tmp_path / "smol", ExportOptions(target="coreml", quant="int4", max_context=128,
                                                            verify=False))
    tok = open_checkpoint("smollm2-135m").tokenizer
    prompts = [tok.encode_chat("What is 12 times 12?"), tok.encode_chat("Name three primary colors.")]
    continuations = [tok.encode("12 times 12 is 144.", add_bos=False), tok.encode("Red, blue, yellow.", add_bos=False)]
    _agree(read_manifest(tmp_path / "smol"), prompts, continuations, n_new=8, atol=0.05)


def _rewired(artifact, tmp_path, change) -> tuple:
    """A copy of the artifact whose program proto was changed by ``change(ops)``; weight.bin untouched."""
    folder = tmp_path / "rewired"
    shutil.copytree(artifact.path, folder)
    package = folder / artifact.manifest["graph"]["file"]
    spec = ct.utils.load_spec(str(package))
    function = spec.mlProgram.functions["main"]
    change(function.block_specializations[function.opset].operations)
    (package / MODEL).write_bytes(spec.SerializeToString())
    assert (package / WEIGHTS).read_bytes() == (artifact.path / artifact.manifest["graph"]["file"] / WEIGHTS).read_bytes()
    return read_manifest(folder)


def _swap_gate_and_up(ops):
    """Layer 0's gate and up projections read each other's weight."""
    linears = {op.inputs["weight"].arguments[0].name: op for op in ops if op.type == "linear"}
    gate, up = linears["model_layers_0_mlp_gate_proj_weight"], linears["model_layers_0_mlp_up_proj_weight"]
    gate.inputs["weight"].arguments[0].name = "model_layers_0_mlp_up_proj_weight"
    up.inputs["weight"].arguments[0].name = "model_layers_0_mlp_gate_proj_weight"


def _flip_rotation(ops):
    """The first rotary ``x1 cos - x2 sin`` (a sub of two muls) computed as ``x2 sin - x1 cos``."""
    made_by = {out.name: op.type for op in ops for out in op.outputs}
    sub = next(op for op in ops if op.type == "sub"
               and all(made_by.get(op.inputs[k].arguments[0].name) == "mul" for k in ("x", "y")))
    x, y = sub.inputs["x"].arguments[0].name, sub.inputs["y"].arguments[0].name
    sub.inputs["x"].arguments[0].name, sub.inputs["y"].arguments[0].name = y, x


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    ckpt = small_vocab_checkpoint(ARCH_PRESETS["LlamaForCausalLM"], folder / "ckpt")
    export(str(ckpt), folder / "art", ExportOptions(target="coreml", quant="int4", max_context=64, verify=False))
    return ckpt, read_manifest(folder / "art")


@pytest.mark.parametrize("change", [_swap_gate_and_up, _flip_rotation])
def test_a_miswired_program_fails_verification(llama, tmp_path, change):
    """The weights are the package's own, byte for byte; only one op's inputs changed. The
    interpreter's figures fall; the torch module (built from the weights alone) cannot tell."""
    ckpt, good = llama
    bad = _rewired(good, tmp_path, change)
    reference = LayerMajorScorer(good.spec, open_checkpoint(str(ckpt)).tensor)
    tokens, logprobs = reference.greedy(PROMPTS, 12)
    figures = {name: compare(FixedReference(tokens, logprobs), scorer, PROMPTS, 12)
               for name, scorer in [("good", program_scorer(good, None)), ("bad", program_scorer(bad, None)),
                                    ("module", TorchModuleScorer(verification_module(bad)))]}
    assert figures["bad"].kl_mean > 3 * figures["good"].kl_mean, figures
    assert figures["bad"].top1_agreement < figures["good"].top1_agreement - 0.2, figures
    assert figures["module"].kl_mean == pytest.approx(figures["good"].kl_mean, abs=1e-3), figures


def test_greedy_match_is_read_off_teacher_forcing(llama):
    """compare() does not make the interpreter generate: the greedy match it reads off the teacher-
    forced argmaxes is the one a greedy run gives (prompts whose runs leave the reference mid-way)."""
    ckpt, good = llama
    reference = LayerMajorScorer(good.spec, open_checkpoint(str(ckpt)).tensor)
    read, made, matches = greedy_match_both_ways(reference, lambda: program_scorer(good, None), PROMPTS, 12)
    assert read == made and read.greedy_match_tokens == pytest.approx(np.mean(matches))
    assert any(0 < m < 12 for m in matches), matches


def test_an_unknown_op_is_refused_by_name(llama, tmp_path):
    def rename(ops):
        next(op for op in ops if op.type == "softmax").type = "frobnicate"
    bad = _rewired(llama[1], tmp_path, rename)
    with pytest.raises(ExportError, match=r"op 'frobnicate' \(.*\) is not one the ML Program interpreter evaluates") as e:
        Program(bad.path / "model.mlpackage")
    assert "\n" not in str(e.value)


def test_batched_equals_one_by_one(llama):
    """Sequences run together through each pass (weights streamed in small row blocks, nothing held)
    compute what each computes alone, and what the held-weights run computes."""
    package = llama[1].path / "model.mlpackage"
    together = ProgramScorer(package, 64, hold=False, batch=3)
    together.interpreter.block_elements = 1000  # many row blocks a weight
    alone = ProgramScorer(package, 64, hold=False, batch=1)
    held = ProgramScorer(package, 64, hold=True, batch=3)
    a, b = together.teacher_forced(PROMPTS, CONTINUATIONS), alone.teacher_forced(PROMPTS, CONTINUATIONS)
    c = held.teacher_forced(PROMPTS, CONTINUATIONS)
    for x, y, z in zip(a, b, c):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)  # float32 rounding: rows stacked or not
        np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-4)
    assert together.greedy(PROMPTS, 12)[0] == alone.greedy(PROMPTS, 12)[0]
    # greedy without teacher forcing first decodes everything itself, and agrees
    assert ProgramScorer(package, 64, batch=2).greedy(PROMPTS, 12)[0] == alone.greedy(PROMPTS, 12)[0]
    assert not together.interpreter.held  # nothing decompressed outlives its pass


def test_constexprs_decompress_as_coremltools_defines_them():
    """constexpr_blockwise_shift_scale and constexpr_lut_to_dense (block-wise uint4 palettes) against
    coremltools' own decompress, whole and by row ranges."""
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression
    rng = np.random.default_rng(0)
    data = rng.integers(-8, 8, (12, 32)).astype(np.int8)
    scale, offset = rng.random((6, 4)).astype(np.float16), rng.integers(-8, 8, (6, 4)).astype(np.int8)
    expected = compression.constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    op = BlockwiseShiftScale(data, scale, offset)
    np.testing.assert_allclose(op.value(), expected, rtol=1e-3)
    np.testing.assert_allclose(op.rows(3, 7), expected[3:7], rtol=1e-3)
    indices = rng.integers(0, 16, (12, 32)).astype(np.uint8)
    lut = rng.standard_normal((3, 1, 16, 1)).astype(np.float16)  # a palette for every 4 rows
    expected = compression.constexpr_lut_to_dense.decompress(indices, lut, None)
    op = LutToDense(indices, lut)
    np.testing.assert_array_equal(op.value(), expected.astype(np.float32))
    np.testing.assert_array_equal(op.rows(5, 11), expected[5:11].astype(np.float32))
    np.testing.assert_array_equal(op.take(np.array([11, 0, 4])), expected[[11, 0, 4]].astype(np.float32))


def test_export_records_the_interpreter(tmp_path):
    """An export verifies the built program with the interpreter off macOS; the traced variant's
    torch-module verification of the same checkpoint gives the same figures."""
    ckpt = small_vocab_checkpoint(ARCH_PRESETS["Qwen2ForCausalLM"], tmp_path / "ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hello there.", "Count to five.", "Why?"]))
    figures = {}
    for variant in ("mlprogram", "traced"):
        manifest = export(str(ckpt), tmp_path / variant, ExportOptions(
            target="coreml", variant=variant, quant="int4", max_context=MAX_CONTEXT, prompts=str(prompts),
            verify_tokens=12, min_top1=0.0, max_kl=10.0))
        figures[variant] = manifest["verification"]
    assert figures["mlprogram"]["verified_with"] == "ML Program interpreted in numpy"
    assert figures["traced"]["verified_with"] == "torch module converted to Core ML"
    for key in ("kl_mean", "top1_agreement", "greedy_match_tokens"):
        assert figures["mlprogram"][key] == pytest.approx(figures["traced"][key], abs=2e-3), figures
