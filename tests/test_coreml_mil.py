"""The coreml target's default variant, built with coremltools' MIL builder (coreml_mil.py): built
without torch, its package keeps the interface (states, iOS 18, block-wise int4), its weights are
the traced variant's, and what it wrote is checked byte for byte against weight.bin."""
import json
import subprocess
import sys

import numpy as np
import pytest

from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export
from runtimes.artifact import load_artifact
from runtimes.weights import ArtifactWeights

from .conftest import small_vocab_checkpoint

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0): "
                                               "the coreml target cannot convert here")
CONSTEXPR = "constexpr_blockwise_shift_scale"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 (q/k head norms) with q/k/v biases absent, exported both ways, unverified."""
    folder = tmp_path_factory.mktemp("mil")
    ckpt = small_vocab_checkpoint("r1-0528-qwen3-8b", folder / "ckpt")
    out = {}
    for variant in ("mlprogram", "traced"):
        export(str(ckpt), folder / variant, ExportOptions(target="coreml", variant=variant, quant="int4",
                                                          max_context=64, verify=False))
        out[variant] = folder / variant
    return ckpt, out


def _operations(folder):
    spec = ct.utils.load_spec(str(folder / "model.mlpackage"))
    function = spec.mlProgram.functions["main"]
    return spec, list(function.block_specializations[function.opset].operations)


def test_builds_without_tracing(tmp_path):
    """The default variant traces nothing: torch.jit.trace is made to fail, and the torch module's
    file is never imported (coremltools itself imports torch where it is installed)."""
    ckpt = small_vocab_checkpoint("r1-distill-qwen-1.5b", tmp_path / "ckpt")
    code = ("import sys, torch; from edge_export.export import ExportOptions, export\n"
            "def refuse(*a, **k): raise AssertionError('traced')\n"
            "torch.jit.trace = refuse\n"
            f"export({str(ckpt)!r}, {str(tmp_path / 'art')!r}, ExportOptions(target='coreml', quant='int4', "
            "max_context=32, verify=False)); print('edge_export.targets.coreml_torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
    manifest = json.loads((tmp_path / "art" / "edge_manifest.json").read_text())
    assert manifest["variant"] == "mlprogram"


def test_package_interface(qwen3):
    """States, iOS 18, flexible query length, and every linear a constexpr over int4 codes."""
    ckpt, out = qwen3
    spec, ops = _operations(out["mlprogram"])
    assert spec.specificationVersion == 9  # iOS 18
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    manifest = json.loads((out["mlprogram"] / "edge_manifest.json").read_text())
    assert states == {name: s["shape"] for name, s in manifest["graph"]["states"].items()}
    assert set(states) == {"key_cache", "value_cache"}
    ranges = {i.name: [(r.lowerBound, r.upperBound) for r in i.type.multiArrayType.shapeRange.sizeRanges]
              for i in spec.description.input}
    assert ranges["input_ids"] == [(1, 1), (1, 64)]
    assert ranges["causal_mask"] == [(1, 1), (1, 1), (1, 64), (1, 64)]
    types = [op.type for op in ops]
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    assert types.count("write_state") == 2 * layers  # one key and one value update a layer
    constexprs = [op for op in ops if op.type == CONSTEXPR]
    linears = [name for name, e in manifest["weights"].items() if e["format"] == "coreml_blockwise"]
    assert len(constexprs) == len(linears) > 0
    assert all(e["data"]["packed"] == "int4" for name, e in manifest["weights"].items()
               if e["format"] == "coreml_blockwise" and "embed" not in name and "lm_head" not in name)
    assert "linear" in types and "read_state" in types


def test_weights_equal_the_traced_variant(qwen3):
    """Both variants store the same quantized weights: only how the program is made differs."""
    ckpt, out = qwen3
    built, traced = (ArtifactWeights(load_artifact(out[v])) for v in ("mlprogram", "traced"))
    names = list(built.table)
    assert names and sorted(names) == sorted(traced.table)
    for name in names:
        np.testing.assert_array_equal(built(name), traced(name), err_msg=name)


def test_read_back_check_catches_a_changed_blob(tmp_path, monkeypatch):
    """A blob whose bytes differ from what the builder wrote fails the export, naming the tensor."""
    from edge_export.targets import coreml_mil

    ckpt = small_vocab_checkpoint("r1-distill-qwen-1.5b", tmp_path / "ckpt")
    original = coreml_mil.SpilledConsts.read
    calls = {"n": 0}

    def read(self, name):
        value = original(self, name).copy()
        calls["n"] += 1
        # serialization reads each const once; the check reads them again: change one the second time
        if name.endswith("down_proj_weight_scale") and calls.setdefault(name, 0) == 1:
            value.reshape(-1)[0] = np.float16(float(value.reshape(-1)[0]) * 2 + 1)
        calls[name] = calls.get(name, 0) + 1
        return value

    monkeypatch.setattr(coreml_mil.SpilledConsts, "read", read)
    with pytest.raises(ExportError, match=r"down_proj\.weight: the scale read back"):
        export(str(ckpt), tmp_path / "art", ExportOptions(target="coreml", quant="int4", max_context=32, verify=False))
    assert not (tmp_path / "art").exists()


def test_traced_variant_is_not_a_deployment_option():
    """`traced` is a cross-check: it names no engine, so plan never offers it."""
    from runtimes.capabilities import capabilities_of
    assert capabilities_of("coreml").variant == "mlprogram"
    assert capabilities_of("coreml", "traced").engines == {}
