"""The tensorrt target: the fp16 explicit-quantization ONNX graph, its engine build plan, and what
can be checked without TensorRT (it installs only from NVIDIA's index, with an NVIDIA GPU).

Verified here: the graph's types and Q/DQ structure follow TensorRT's rules (symmetric, INT4
weight-only, FP8 weights and activations, fp16 activations), onnxruntime runs the very graph
the engine would be built from and agrees with the artifact's weights run by the reference
backend, refusals (FP8 on an Ampere Jetson, zero points, no TensorRT here) are one clear line,
and an engine built for another GPU or TensorRT version is refused. Building and running an
engine needs TensorRT and a GPU: those tests skip with that reason.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

import runtimes
from edge_export.cli import main
from edge_export.engine import summarize_layers
from edge_export.export import ExportOptions, export
from runtimes.backends.tensorrt import TensorRTBackend, engine_mismatch
from runtimes.errors import ArtifactError, BackendUnavailableError

from .skip_policy import NO_TENSORRT
from .standins import StandinEngineBuilder

onnx = pytest.importorskip("onnx")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def int4_artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "int4"
    export(tiny_llama, out, ExportOptions(target="tensorrt", quant="int4", max_context=256, min_top1=0.0, max_kl=10))
    return out


@pytest.fixture(scope="module")
def fp8_artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "fp8"
    prompts = out.parent / "calibration.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in (
        "What is 17 * 23? Think step by step.", "Is 91 prime?", "Sort 5, 2, 9, 1.", "Explain why the sky is blue.")))
    export(tiny_llama, out, ExportOptions(target="tensorrt", quant="fp8", max_context=256, min_top1=0.0, max_kl=10,
                                          calibration=str(prompts)))
    return out


def graph(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def test_int4_graph_follows_tensorrt_rules(int4_artifact):
    model = graph(int4_artifact)
    inits = {t.name: t for t in model.graph.initializer}
    types = {i.name: i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)}
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == types["present.0.key"] == onnx.TensorProto.FLOAT16
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dq if inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    assert len(weights) == 7 * 2  # every projection of both layers: INT4 weight-only
    assert all(len(n.input) == 2 for n in dq)  # symmetric: no zero points anywhere
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dq)  # fp16 GEMMs
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == 32 for n in weights)
    assert {n.domain for n in model.graph.node} <= {""}


# polygraphy's console script (it has no __main__) run by this interpreter: found whether or not a venv's bin is on PATH
POLYGRAPHY = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]


def test_polygraphy_reads_and_sanitizes_the_graph(int4_artifact, tmp_path):
    """TensorRT's own ONNX tooling (polygraphy, in `.[all]`): `inspect model` reads the graph,
    `surgeon sanitize --fold-constants` folds what it can without touching a Q/DQ node, and the
    folded graph computes the same logits on onnxruntime."""
    import onnxruntime as ort
    model = int4_artifact / "model.onnx"
    shown = subprocess.run(POLYGRAPHY + ["inspect", "model", str(model)], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "ONNX Opset: 21" in shown.stdout and "past_key_values.1.value" in shown.stdout
    folded = tmp_path / "sanitized.onnx"
    done = subprocess.run(POLYGRAPHY + ["surgeon", "sanitize", str(model), "--fold-constants", "-o", str(folded)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    before, after = ops(graph(int4_artifact)), ops(onnx.load(str(folded)))
    assert after["DequantizeLinear"] == before["DequantizeLinear"] and after["MatMul"] == before["MatMul"]
    feeds = {"input_ids": np.arange(3, 20, dtype=np.int64)[None], "attention_mask": np.ones((1, 17), np.int64)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 32), np.float16)
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]  # noqa: E731
    assert np.abs(run(model) - run(folded)).max() < 1e-3


def test_manifest_records_the_engine_plan(int4_artifact):
    manifest = json.loads((int4_artifact / "edge_manifest.json").read_text())
    engine = manifest["engine"]
    assert manifest["target"] == "tensorrt" and manifest["backend"] == "onnxruntime" and engine["built"] is False
    assert engine["strongly_typed"] and "--stronglyTyped" in engine["trtexec"]
    profiles = engine["profiles"]
    assert profiles["input_ids"]["max"] == [1, 256] and profiles["past_key_values.1.value"]["max"][2] == 255
    assert all(f"{name}:" in engine["trtexec"] for name in profiles)
    assert manifest["quantization"]["method"] == "rtn"  # the default here: TensorRT takes no Q4_1 minimums
    # verified with the weights' DequantizeLinear folded once (same values); an fp8 graph is not folded
    assert "folded" in manifest["verification"]["verified_with"]


def test_graph_runs_here_and_matches_its_weights(int4_artifact):
    """onnxruntime runs the graph the engine is built from; the reference backend runs the weights
    table (read back from the same bytes): fp16 arithmetic is the only difference."""
    ids = list(range(3, 40))
    onnx_rt = runtimes.load(int4_artifact, threads=1)
    ref = runtimes.load(int4_artifact, backend="reference")
    a, b = onnx_rt.backend.prefill(ids), ref.backend.prefill(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    for token in (5, 9, 11):
        a, b = onnx_rt.backend.decode(token), ref.backend.decode(token)
        assert int(a.argmax()) == int(b.argmax())


def test_fp8_quantizes_weights_and_activations(fp8_artifact):
    model = graph(fp8_artifact)
    ops = Counter(n.op_type for n in model.graph.node)
    inits = {t.name: t for t in model.graph.initializer}
    assert ops["QuantizeLinear"] == 7 * 2  # each projection's input, per-tensor scale from calibration
    fp8 = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
           and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) == 7 * 2 + 1  # and lm_head, weight-only (no activation statistics outside the layers)
    manifest = json.loads((fp8_artifact / "edge_manifest.json").read_text())
    scales = [e["activation_scale"] for e in manifest["weights"].values() if "activation_scale" in e]
    assert len(scales) == 7 * 2 and all(s > 0 for s in scales)
    assert manifest["verification"]["kl_mean"] < 0.05 and "verified_with" not in manifest["verification"]


def test_fp8_refused_for_an_ampere_jetson(tiny_llama, tmp_path):
    out = cli("export", str(tiny_llama), "-o", str(tmp_path / "a"), "--target", "tensorrt", "--quant", "fp8",
              "--device", "jetson-orin-nano-8gb")
    assert out.exit_code == 2
    line = out.output.strip()
    assert "\n" not in line and "Ampere" in line and "--quant int4" in line
    assert not (tmp_path / "a").exists()


def test_asymmetric_int4_refused(tiny_llama, tmp_path):
    out = cli("export", str(tiny_llama), "-o", str(tmp_path / "a"), "--target", "tensorrt", "--asymmetric")
    assert out.exit_code == 2 and "symmetric" in out.output and not (tmp_path / "a").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message where TensorRT is missing")
def test_build_engine_without_tensorrt_is_one_line_and_changes_nothing(int4_artifact):
    before = hashlib.sha256((int4_artifact / "edge_manifest.json").read_bytes()).hexdigest()
    out = cli("build-engine", str(int4_artifact))
    assert out.exit_code == 2 and "trtexec" in out.output and "--stronglyTyped" in out.output
    assert hashlib.sha256((int4_artifact / "edge_manifest.json").read_bytes()).hexdigest() == before
    assert not (int4_artifact / "model.engine").exists()


def test_build_engine_refuses_other_targets(tmp_path, tiny_llama):
    out_dir = tmp_path / "ort"
    export(tiny_llama, out_dir, ExportOptions(quant="int4", max_context=32, verify=False))
    out = cli("build-engine", str(out_dir))
    assert out.exit_code == 2 and "--target tensorrt" in out.output


def test_engine_for_another_gpu_or_version_is_refused():
    built = {"built": True, "tensorrt": "10.13.0", "gpu": {"name": "Orin", "compute_capability": "87"}}
    here = {"name": "Orin", "compute_capability": "87"}
    assert engine_mismatch(built, here, "10.13.0") is None
    assert "build-engine" in engine_mismatch({"built": False}, here, "10.13.0")
    other_gpu = engine_mismatch(built, {"name": "NVIDIA H200", "compute_capability": "90"}, "10.13.0")
    assert "Orin (sm_87)" in other_gpu and "NVIDIA H200 (sm_90)" in other_gpu and "rebuild" in other_gpu
    other_trt = engine_mismatch(built, here, "10.14.1")
    assert "10.13.0" in other_trt and "10.14.1" in other_trt


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message where TensorRT is missing")
def test_tensorrt_backend_says_why_it_cannot_run_here(int4_artifact):
    ok, why = TensorRTBackend.available()
    assert not ok and "TensorRT" in why
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        runtimes.load(int4_artifact, backend="tensorrt")


def _inodes(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_ino for p in folder.rglob("*") if p.is_file()}


def test_build_engine_publishes_atomically_with_a_standin_builder(int4_artifact, tmp_path):
    """build-engine's own staging, hard links and publish, around a STAND-IN builder (TensorRT
    needs an NVIDIA GPU): the artifact gains the engine and a manifest that lists it, its other
    files are the very same inodes (linked, not copied), and a rebuild replaces the engine."""
    from edge_export.artifact import TMP_TAG
    from edge_export.engine import build_engine
    folder = tmp_path / "art"
    shutil.copytree(int4_artifact, folder)
    before, inodes = json.loads((folder / "edge_manifest.json").read_text()), _inodes(folder)
    builder = StandinEngineBuilder()
    engine = build_engine(folder, builder=builder)
    manifest = json.loads((folder / "edge_manifest.json").read_text())
    assert manifest["engine"] == engine and engine["built"] and engine["tensorrt"] == "stand-in"
    assert engine["gpu"]["name"] == "STAND-IN GPU" and engine["layers"]["by_precision"] == {"fp16": 1}
    assert manifest["backend"] == "tensorrt" and "model.engine" in manifest["files"]
    built = json.loads((folder / "model.engine").read_bytes())
    assert built["profiles"] == before["engine"]["profiles"]
    for name in before["files"]:  # linked into the staging folder and swapped in, never copied
        assert _inodes(folder)[name] == inodes[name] and manifest["files"][name] == before["files"][name], name
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging or set-aside folder left
    runtimes.load(folder, backend="reference")  # every listed file checks against its sha256
    engine_inode = (folder / "model.engine").stat().st_ino
    again = build_engine(folder, builder=builder)  # a rebuild replaces the engine
    assert again["built"] and json.loads((folder / "model.engine").read_bytes())["build"] == 2
    assert (folder / "model.engine").stat().st_ino != engine_inode
    assert not list(tmp_path.glob(f"*{TMP_TAG}*"))


def test_a_failed_engine_build_changes_nothing(int4_artifact, tmp_path):
    from edge_export.engine import EngineError, build_engine
    folder = tmp_path / "art"
    shutil.copytree(int4_artifact, folder)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    with pytest.raises(EngineError, match="parser refused"):
        build_engine(folder, builder=StandinEngineBuilder(fail=EngineError("model.onnx: parser refused the graph")))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == digest
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_an_engine_build_interrupted_while_publishing_leaves_the_artifact(int4_artifact, tmp_path, monkeypatch):
    """A failure after the links and the engine are in the staging folder (here: the manifest
    cannot be written) removes the staging folder and leaves the artifact as it was, loadable."""
    import edge_export.engine as engine_module
    folder = tmp_path / "art"
    shutil.copytree(int4_artifact, folder)
    manifest = (folder / "edge_manifest.json").read_bytes()

    def no_room(staging, new):
        assert (staging / "model.engine").is_file() and (staging / "model.onnx").stat().st_nlink == 2
        raise OSError(28, os.strerror(28))  # ENOSPC
    monkeypatch.setattr(engine_module, "write_manifest", no_room)
    with pytest.raises(Exception, match="No space left|disk"):
        engine_module.build_engine(folder, builder=StandinEngineBuilder())
    assert (folder / "edge_manifest.json").read_bytes() == manifest and not (folder / "model.engine").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"] and (folder / "model.onnx").stat().st_nlink == 1
    runtimes.load(folder, backend="reference")


def test_tensorrt_backend_refuses_a_standin_engine_on_this_machine(int4_artifact, tmp_path):
    """The engine the stand-in built records a GPU this machine is not; loading it says so."""
    from edge_export.engine import build_engine
    folder = tmp_path / "art"
    shutil.copytree(int4_artifact, folder)
    build_engine(folder, builder=StandinEngineBuilder())
    with pytest.raises((BackendUnavailableError, ArtifactError), match="tensorrt|TensorRT|STAND-IN GPU"):
        runtimes.load(folder)


def test_layer_precision_summary_flags_fp8_that_does_not_run_in_fp8():
    """The inspector's JSON (ProfilingVerbosity.DETAILED, TensorRT 10's field names): an FP8 artifact
    whose GEMMs take FP16 inputs gets a warning, as TensorRT issue 4590 reports happening."""
    def layer(name, kind, fmt):
        return {"Name": name, "LayerType": kind, "Inputs": [{"Name": "x", "Format/Datatype": fmt}]}
    fp16 = "Row major linear FP16 format"
    fp8 = "Row major linear FP8 format"
    silent = {"Layers": [layer("q_proj", "CaskGemmMatrixMultiply", fp16), layer("norm", "Reduce", "Row major linear FP32 format")]}
    summary = summarize_layers(silent, "fp8")
    assert summary["by_precision"] == {"fp16": 1, "fp32": 1} and summary["fp8_gemms"] == 0 and "warning" in summary
    real = {"Layers": [layer("q_proj", "CaskGemmMatrixMultiply", fp8), layer("o_proj", "gemm", fp8)]}
    summary = summarize_layers(real, "fp8")
    assert summary["fp8_gemms"] == 2 and "warning" not in summary


@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
def test_build_engine_and_generate(int4_artifact):  # pragma: no cover - needs TensorRT and a GPU
    out = cli("build-engine", str(int4_artifact), "--json")
    assert out.exit_code == 0
    engine = json.loads(out.output)
    assert engine["built"] and engine["layers"]["count"] > 0
    rt = runtimes.load(int4_artifact)
    ref = runtimes.load(int4_artifact, backend="reference")
    ids = list(range(3, 40))
    assert int(rt.backend.prefill(ids).argmax()) == int(ref.backend.prefill(ids).argmax())


def test_opt_tokens_set_the_optimization_profile(tiny_llama, tmp_path):
    """TensorrtOptions.opt_tokens is the profile's "opt" prompt, in the engine plan and its trtexec line."""
    manifest = export(tiny_llama, tmp_path / "a", ExportOptions(target="tensorrt", quant="int4", max_context=256,
                                                               verify=False, opt_tokens=64))
    engine = manifest["engine"]
    assert engine["profiles"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 256]}
    assert engine["profiles"]["attention_mask"]["opt"] == [1, 64] and "attention_mask:1x64" in engine["trtexec"]
    assert manifest["graph"]["kv_dtype"] == "float16"
