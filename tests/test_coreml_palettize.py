"""`--quant int4 --method palettize` on Core ML: every linear weight a constexpr_lut_to_dense of our
own k-means tables (quantizers/palettize.py), written through the builder's spill, recorded in the
weights table as ``coreml_lut``, read back byte for byte, decoded by runtimes' reader; refused by
every target that cannot store it and with every block-wise int4 option."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from edge_export.checkpoint import open_checkpoint
from edge_export.cli import main
from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export
from quantizers.palettize import palettize
from runtimes.artifact import load_artifact
from runtimes.capabilities import TARGETS
from runtimes.weights import ArtifactWeights

from .conftest import small_vocab_checkpoint

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0): "
                                               "the coreml target cannot convert here")
LUT = "constexpr_lut_to_dense"
BLOCKWISE = "constexpr_blockwise_shift_scale"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 7 times 8?",
           "Name a prime number greater than 10."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (2 layers) exported palettized, verified (thresholds off: random weights)."""
    folder = tmp_path_factory.mktemp("pal")
    ckpt = small_vocab_checkpoint("r1-distill-llama-8b", folder / "ckpt")
    manifest = export(str(ckpt), folder / "mlprogram", ExportOptions(
        target="coreml", quant="int4", method="palettize", max_context=128, max_kl=100, min_top1=0, threads=1))
    return ckpt, folder / "mlprogram", manifest


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M palettized (re-quantizing its GGUF's dequantized weights), verified on two prompts
    x 8 tokens with the thresholds off: a table per 16 rows misses the default 0.5 KL on this small
    model (benchmarks/coreml_palettize.py measures it); this checks the figures are recorded."""
    folder = tmp_path_factory.mktemp("pal-smol")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    manifest = export("smollm2-135m", folder / "smollm2", ExportOptions(
        target="coreml", quant="int4", method="palettize", prompts=str(prompts), verify_tokens=8, max_context=512,
        max_kl=100, min_top1=0, threads=1))
    return folder / "smollm2", manifest


def layer_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.{key}.weight" for i in range(layers) for key in LINEARS]


def test_tiny_package_has_a_lut_per_linear(tiny):
    _, folder, manifest = tiny
    ops = manifest["graph"]["ops"]
    assert ops[LUT] == 2 * 7 and ops[BLOCKWISE] == 2  # the embedding and lm_head stay int8 per row
    assert manifest["graph"]["spec_version"] == 9 and manifest["graph"]["minimum_deployment_target"] == "iOS18"
    entry = manifest["weights"]["model.layers.1.mlp.up_proj.weight"]
    n, k = entry["shape"]
    assert entry["format"] == "coreml_lut"
    assert entry["indices"]["packed"] == "uint4" and entry["indices"]["length"] == n * k // 2
    assert entry["lut"]["dtype"] == "float16" and entry["lut"]["shape"] == [n // 16, 1, 16, 1]
    record = manifest["quantization"]["tensors"]["model.layers.1.mlp.up_proj.weight"]
    assert record["scheme"] == {"scheme": "int4_lut", "rows_per_lut": 16, "iterations": 100, "method": "palettize"}
    assert manifest["quantization"]["method"] == "palettize"


def test_tiny_package_ops_read_by_coremltools(tiny):
    """The saved program itself (not our manifest): each linear's weight comes from a
    constexpr_lut_to_dense whose indices are uint4 and whose lut is fp16 [N/16, 1, 16, 1]."""
    _, folder, manifest = tiny
    spec = ct.utils.load_spec(str(folder / "model.mlpackage"))
    function = spec.mlProgram.functions["main"]
    ops = [op for op in function.block_specializations[function.opset].operations if op.type == LUT]
    assert len(ops) == 14
    types = {op.outputs[0].name: op.outputs[0].type.tensorType for op in ops}
    up = types["model_layers_1_mlp_up_proj_weight"]
    assert [d.constant.size for d in up.dimensions] == manifest["weights"]["model.layers.1.mlp.up_proj.weight"]["shape"]
    # the op's inputs are serialized inline, each a value whose blob lies in weight.bin
    op = next(op for op in ops if op.outputs[0].name == "model_layers_1_mlp_up_proj_weight")
    indices, lut = (op.inputs[key].arguments[0].value for key in ("indices", "lut"))
    assert indices.HasField("blobFileValue") and lut.HasField("blobFileValue")
    indices, lut = indices.type.tensorType, lut.type.tensorType
    from coremltools.proto import MIL_pb2
    assert indices.dataType == MIL_pb2.DataType.Value("UINT4") and lut.dataType == MIL_pb2.DataType.Value("FLOAT16")
    assert [d.constant.size for d in lut.dimensions][1:] == [1, 16, 1]


def test_tiny_weights_read_back_equal_the_quantizer(tiny):
    """What runtimes reads from weight.bin is our k-means of the checkpoint's tensor, exactly."""
    ckpt, folder, _ = tiny
    stored = ArtifactWeights(load_artifact(folder))
    source = open_checkpoint(str(ckpt))
    for name in layer_names(2):
        np.testing.assert_array_equal(stored(name), palettize(source.tensor(name), 16, 100).dequantize(), err_msg=name)


def test_tiny_verification_recorded_and_reference_generates(tiny):
    _, folder, manifest = tiny
    figures = manifest["verification"]
    assert figures["verified_with"] == "ML Program interpreted in numpy"  # the saved program, LUT ops included
    assert figures["positions"] > 0 and 0 <= figures["kl_mean"] < 100 and 0 <= figures["top1_agreement"] <= 1
    result = runtimes.load(folder, backend="reference").generate("hello", temperature=0, max_new_tokens=5)
    assert result.new_tokens > 0


def test_traced_variant_stores_the_same_weights(tiny, tmp_path):
    """`--variant traced` swaps coremltools' converted consts for the same LUTs."""
    ckpt, folder, manifest = tiny
    traced = export(str(ckpt), tmp_path / "traced", ExportOptions(target="coreml", variant="traced", quant="int4",
                                                                  method="palettize", max_context=128, verify=False))
    assert traced["graph"]["ops"][LUT] == manifest["graph"]["ops"][LUT]
    ours, theirs = ArtifactWeights(load_artifact(folder)), ArtifactWeights(load_artifact(tmp_path / "traced"))
    for name in layer_names(2):
        np.testing.assert_array_equal(ours(name), theirs(name), err_msg=name)


@pytest.mark.parametrize("blob", ["lut", "indices"])
def test_read_back_check_covers_the_lut_blobs(tiny, tmp_path, monkeypatch, blob):
    """A package whose LUT or indices differ from what the builder wrote fails the export (the
    spill file is altered after weight.bin was written from it), and nothing is published."""
    from edge_export.targets import coreml
    ckpt = tiny[0]
    original = coreml._check_spilled

    def altered(folder, table, spill):
        offset, dtype, shape = spill.entries[f"model_layers_0_mlp_up_proj_weight_{blob}"]
        with open(spill.path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x11]))
        return original(folder, table, spill)

    monkeypatch.setattr(coreml, "_check_spilled", altered)
    with pytest.raises(ExportError, match=rf"tensor model.layers.0.mlp.up_proj.weight: the {blob} read back from "
                                          r"model.mlpackage differs from what the builder wrote"):
        export(str(ckpt), tmp_path / "x", ExportOptions(target="coreml", quant="int4", method="palettize",
                                                         max_context=128, verify=False))
    assert not (tmp_path / "x").exists()


def test_smollm2_palettized(smol):
    """SmolLM2-135M: a LUT for each of its 210 linears (the tied embedding int8), verified against
    the float GGUF, its weights our k-means of the GGUF's tensors, and the reference backend answers."""
    folder, manifest = smol
    ops = manifest["graph"]["ops"]
    assert ops[LUT] == 30 * 7 and ops[BLOCKWISE] == 1
    figures = manifest["verification"]
    # a wrong table or index order scores several nats and near-zero agreement; palettized SmolLM2 is near 1
    assert figures["prompts"] == 2 and figures["positions"] == 16, figures
    assert figures["kl_mean"] < 3.0 and figures["top1_agreement"] >= 0.3, figures
    stored = ArtifactWeights(load_artifact(folder))
    source = open_checkpoint("smollm2-135m")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        np.testing.assert_array_equal(stored(name), palettize(source.tensor(name), 16, 100).dequantize(), err_msg=name)
    result = runtimes.load(folder, backend="reference").generate("What is 2+3?", temperature=0, max_new_tokens=6)
    assert result.new_tokens > 0 and (result.answer or result.thinking).strip()


OTHERS = sorted(name for name, caps in TARGETS.items() if "palettize" not in caps.methods)


def test_only_coreml_declares_palettize():
    assert OTHERS == ["onnx/ort", "onnx/portable", "onnx/qnn", "tensorrt"]


@pytest.mark.parametrize("name", OTHERS)
def test_other_targets_refuse_palettize(name, tmp_path):
    caps = TARGETS[name]
    with pytest.raises(ExportError, match=rf"^--method palettize cannot be carried by target {name} \(its int4 "
                                          r"methods: rtn, awq, gptq, keep\); coreml, coreml/traced store\(s\) it$"):
        export("nowhere", tmp_path / "x", ExportOptions(target=caps.target, variant=caps.variant, quant="int4",
                                                         method="palettize", verify=False))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", OTHERS)
def test_other_targets_refuse_palettize_through_the_cli(name, tiny, tmp_path):
    caps = TARGETS[name]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(tiny[0]), "-o", str(out), "--target", caps.target,
                                       "--variant", caps.variant, "--quant", "int4", "--method", "palettize"],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: --method palettize cannot be carried by target {name} (its int4 methods: rtn, awq, "
                     "gptq, keep); coreml, coreml/traced store(s) it"]
    assert not out.exists()


@pytest.mark.parametrize("changes,message", [
    ({"group_size": 64}, r"--group-size \(64\) applies to block-wise int4, not --method palettize"),
    ({"symmetric": False}, r"--asymmetric \(False\) applies to block-wise int4, not --method palettize"),
    ({"clip_search": True}, r"--clip-search \(True\) applies to block-wise int4"),
    ({"act_order": True}, r"--act-order \(True\) applies to block-wise int4"),
    ({"quant": "int8"}, r"--method palettize applies to --quant int4, not --quant int8"),
    ({"method": "rtn", "lut_rows": 4}, r"--lut-rows 4 \(lut_rows\) applies to --method palettize only; drop it"),
    ({"lut_rows": 0}, r"--lut-rows 0 \(lut_rows\) must be a positive number of rows"),
])
def test_coreml_refuses_block_wise_options_with_palettize(changes, message, tmp_path):
    options = ExportOptions(target="coreml", quant="int4", method="palettize", verify=False)
    with pytest.raises(ExportError, match=message):
        export("nowhere", tmp_path / "x", options, **changes)
    assert not (tmp_path / "x").exists()


def test_cli_group_size_with_palettize_is_one_line(tiny, tmp_path):
    result = CliRunner().invoke(main, ["export", str(tiny[0]), "-o", str(tmp_path / "o"), "--target", "coreml",
                                       "--method", "palettize", "--group-size", "128"], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --group-size (128) applies to block-wise int4, not --method palettize, whose 16-entry tables are "
        "shared by output rows (--lut-rows); drop it"]
