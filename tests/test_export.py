"""export -> artifact -> runtime, on tiny checkpoints of every architecture."""
import json

import numpy as np
import pytest

import runtimes
from edge_export.export import ExportOptions, export
from edge_export.errors import ExportError, VerificationError
from runtimes.errors import ArtifactError

LOOSE = dict(max_kl=100.0, min_top1=0.0)  # random tiny weights: verification runs, its figures are not judged


def exported(checkpoint, folder, **options):
    manifest = export(checkpoint, folder, ExportOptions(**{**LOOSE, **options}))
    return folder, manifest


def test_fp32_artifact_matches_reference_backend(tiny_checkpoint, tmp_path):
    folder, manifest = exported(tiny_checkpoint, tmp_path / "fp32", quant="fp32")
    assert manifest["target"] == "onnx" and manifest["variant"] == "ort"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} \
        <= set(manifest["files"])
    assert manifest["verification"]["top1_agreement"] == 1.0 and manifest["verification"]["kl_mean"] < 1e-6
    ort_rt, ref_rt = runtimes.load(folder), runtimes.load(folder, backend="reference")
    ids = list(range(5, 25))
    a, b = ort_rt.backend.prefill(ids), ref_rt.backend.prefill(ids)
    assert np.abs(a - b).max() < 1e-4
    for t in (3, 9, 11):
        assert np.abs(ort_rt.backend.decode(t) - ref_rt.backend.decode(t)).max() < 1e-4


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_int4_artifact_computes_its_own_weights(tiny_llama, tmp_path, method):
    """With exact float activations the graph equals the reference run on the stored int4 weights."""
    folder, manifest = exported(tiny_llama, tmp_path / method, quant="int4", method=method, accuracy_level=0)
    records = manifest["quantization"]["tensors"]
    assert records["model.layers.0.mlp.down_proj.weight"]["scheme"]["method"] == method
    assert records["model.layers.0.input_layernorm.weight"]["scheme"] is None
    ort_rt, ref_rt = runtimes.load(folder), runtimes.load(folder, backend="reference")
    ids = list(range(5, 30))
    assert np.abs(ort_rt.backend.prefill(ids) - ref_rt.backend.prefill(ids)).max() < 1e-3


def test_generate_result_and_stream(tiny_llama, tmp_path):
    folder, _ = exported(tiny_llama, tmp_path / "a", quant="int4")
    rt = runtimes.load(folder)
    result = rt.generate("hello", temperature=0, max_new_tokens=12)
    assert result.new_tokens <= 12 and result.ttft_ms > 0
    events = list(rt.stream("hello", temperature=0.6, top_p=0.95, seed=1, max_new_tokens=12))
    assert {e.kind for e in events} <= {"thinking", "answer", "tag"}


def test_group_size_fallback_is_recorded(tiny_llama, tmp_path):
    """128 divides the tiny model's widths; the record shows the group actually used."""
    _, manifest = exported(tiny_llama, tmp_path / "g", quant="int4", group_size=128, verify=False)
    assert manifest["quantization"]["tensors"]["model.layers.0.self_attn.q_proj.weight"]["scheme"]["group_size"] == 128


def test_verification_failure_leaves_nothing(tiny_llama, tmp_path):
    with pytest.raises(VerificationError, match="verification failed: kl_mean .* nothing was written"):
        export(tiny_llama, tmp_path / "bad", ExportOptions(quant="int4", min_top1=1.01))
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_is_never_touched(tiny_llama, tmp_path):
    folder, _ = exported(tiny_llama, tmp_path / "a", quant="fp32", verify=False)
    before = (folder / "edge_manifest.json").read_text()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(tiny_llama, folder, ExportOptions(quant="int4", verify=False))
    assert (folder / "edge_manifest.json").read_text() == before
    export(tiny_llama, folder, ExportOptions(quant="int4", verify=False, overwrite=True))
    assert json.loads((folder / "edge_manifest.json").read_text())["quantization"]["quant"] == "int4"


def test_scheme_the_target_cannot_carry(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="--quant fp8 cannot be carried by target onnx"):
        export(tiny_llama, tmp_path / "x", ExportOptions(quant="fp8"))


def test_keep_needs_a_gguf(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="--method keep carries a GGUF's quantized blocks"):
        export(tiny_llama, tmp_path / "x", ExportOptions(quant="int4", method="keep"))


def test_tampered_artifact_is_refused(tiny_llama, tmp_path):
    folder, _ = exported(tiny_llama, tmp_path / "a", quant="int4", verify=False)
    data = folder / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="model.onnx.data: sha256 does not match"):
        runtimes.load(folder)


def test_bad_calibration_files(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ExportError, match="empty.jsonl: no prompts in the file"):
        export(tiny_llama, tmp_path / "a", ExportOptions(quant="int4", method="awq", calibration=str(empty)))
    with pytest.raises(ExportError, match="missing.jsonl: cannot read prompts"):
        export(tiny_llama, tmp_path / "a", ExportOptions(quant="int4", method="gptq",
                                                        calibration=str(tmp_path / "missing.jsonl")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ExportError, match="broken.jsonl:2: not valid JSON"):
        export(tiny_llama, tmp_path / "a", ExportOptions(quant="int4", method="awq", calibration=str(broken)))
    assert not (tmp_path / "a").exists()


def test_clip_search_reaches_the_manifest_and_needs_int4(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from edge_export.cli import main
    _, manifest = exported(tiny_llama, tmp_path / "c", quant="int4", symmetric=False, clip_search=True, verify=False)
    scheme = manifest["quantization"]["tensors"]["model.layers.0.mlp.up_proj.weight"]["scheme"]
    assert scheme["clip_search"] is True and scheme["symmetric"] is False
    result = CliRunner().invoke(main, ["export", str(tiny_llama), "-o", str(tmp_path / "x"), "--quant", "int8",
                                       "--clip-search"])
    assert result.exit_code == 2 and "--clip-search applies to int4 groups; --quant int8 has none" in result.output
    assert not (tmp_path / "x").exists()
