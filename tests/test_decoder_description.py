"""The decoder is described once (runtimes/models/decoder.py) and every emitter walks the description.

- No emitter names an architecture: no registered name or model_type in its source, no comparison
  with ``.architecture`` / ``.model_type``, no reading of the spec's per-family flags
  (``attention_bias``, ``qk_norm``, ``partial_rotary_factor``) behind the description's back.
- An architecture composed of known steps needs no emitter change: one registered here, in the test
  alone (q/k/v biases + per-head q/k norms + a partial rotary, a mix no real family has), exports to
  the ONNX variants and the Core ML module and computes what the reference decoder computes.
- One tensor-presence function: every reader of "which tensors does a layer have" agrees with it.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import runtimes
from edge_export.export import ExportOptions, export
from edge_export.fixtures import _write_weights
from edge_export.presets import preset_spec
from runtimes.models import base as models_base
from runtimes.models import describe, layer_tensors, supported_architectures
from runtimes.models.base import Architecture, register
from runtimes.reference import ReferenceDecoder
from runtimes.weights import ArtifactWeights

from .conftest import SMALL_VOCAB, write_small_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EMITTERS = ["runtimes/reference.py", "edge_export/targets/onnx_ort.py", "edge_export/targets/onnx_portable.py",
            "edge_export/targets/onnx_qnn.py", "edge_export/targets/coreml_torch.py",
            "edge_export/targets/onnx_weights.py", "edge_export/targets/tensorrt.py", "edge_export/quantize.py",
            "edge_export/verify.py"]
FAMILY_FLAGS = {"attention_bias", "qk_norm", "partial_rotary_factor"}


def _names_of_architectures() -> set[str]:
    names = set()
    for name in supported_architectures():
        arch = models_base.get_architecture(name)
        names |= {arch.name, arch.model_type}
    return names


def _violations(source: str, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append(f"line {node.lineno}: names the architecture {node.value!r}")
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                if isinstance(part, ast.Attribute) and part.attr in ("architecture", "model_type"):
                    found.append(f"line {node.lineno}: compares .{part.attr}")
        if isinstance(node, ast.Attribute) and node.attr in FAMILY_FLAGS:
            found.append(f"line {node.lineno}: reads the spec's .{node.attr} instead of describe(spec)")
    return found


@pytest.mark.parametrize("path", EMITTERS)
def test_no_emitter_branches_on_an_architecture(path):
    assert _violations((ROOT / path).read_text(), _names_of_architectures()) == []


def test_the_check_catches_a_branch_on_a_name():
    names = _names_of_architectures()
    assert _violations("if spec.architecture == 'Qwen3ForCausalLM':\n    pass\n", names)
    assert _violations("x = 1 if spec.qk_norm else 0\n", names)
    assert _violations("kind = {'qwen2': 1}\n", names)
    assert not _violations("a = describe(spec).attention\nif a.head_norm:\n    pass\n", names)


def test_one_tensor_presence_function():
    """ModelSpec.tensor_shapes, the layer weights the reference loads and the description agree."""
    for preset in ("r1-distill-qwen-1.5b", "r1-distill-llama-8b", "r1-0528-qwen3-8b"):
        spec = preset_spec(preset, "tiny")
        layer = layer_tensors(spec)
        shapes = spec.tensor_shapes()
        assert {spec.tensor_name(k, 0): s for k, s in layer.items()} == \
            {n: s for n, s in shapes.items() if n.startswith("model.layers.0.")}
        steps = describe(spec)
        assert set(steps.linears()) <= set(layer)
        assert bool(steps.attention.bias) == ("q_bias" in layer)
        assert bool(steps.attention.head_norm) == ("q_norm" in layer)


# ---- an architecture made of known steps, registered by this test only ---------------------------
class _Composite(Architecture):
    name = "EdgeExportTestCompositeForCausalLM"
    model_type = "edge_export_test_composite"
    attention_bias = True
    qk_norm = True
    partial_rotary = True


@pytest.fixture(scope="module")
def composite(tmp_path_factory):
    register(_Composite)
    try:
        spec = dataclasses.replace(preset_spec("r1-0528-qwen3-8b", "tiny"), architecture=_Composite.name,
                                   attention_bias=True, qk_norm=True, partial_rotary_factor=0.5,
                                   rope_scaling=None, vocab_size=SMALL_VOCAB, bos_token_id=SMALL_VOCAB - 6,
                                   eos_token_ids=(SMALL_VOCAB - 5,))
        folder = tmp_path_factory.mktemp("composite")
        _write_weights(spec, folder, np.random.default_rng(3), 0.08)
        (folder / "config.json").write_text(json.dumps(_Composite().config_from_spec(spec)))
        write_small_tokenizer(folder)
        yield spec, folder
    finally:
        models_base._REGISTRY.pop(_Composite.name, None)
        models_base._ALIASES.pop(_Composite.model_type, None)


@pytest.mark.parametrize("target", [dict(target="onnx"), dict(target="onnx", variant="portable"),
                                    dict(target="coreml", quant="fp16")], ids=["ort", "portable", "coreml"])
def test_known_steps_compose_without_emitter_changes(composite, tmp_path, target):
    spec, folder = composite
    assert describe(spec).attention.partial and describe(spec).attention.bias and describe(spec).attention.head_norm
    out = tmp_path / "a"
    export(str(folder), out, ExportOptions(**{"quant": "fp32", **target}, max_context=64, verify=False))
    ids = list(range(3, 40))
    stored = runtimes.load(out, backend="reference")
    ref = ReferenceDecoder(stored.spec, ArtifactWeights(stored.artifact), max_context=64)
    expected = ref.forward(ids)
    if target["target"] == "coreml":
        from edge_export.targets.coreml_torch import TorchModuleBackend, verification_module
        got = TorchModuleBackend(verification_module(stored.artifact), threads=1).prefill(ids)
        tolerance = 5e-2  # float16 state and activations
    else:
        got = runtimes.load(out).backend.prefill(ids)
        tolerance = 1e-3
    assert np.abs(got - expected).max() < tolerance * max(1.0, np.abs(expected).max())
