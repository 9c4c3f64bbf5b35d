"""`--via optimum`: an architecture outside the registry (GPT-2, random weights) through optimum-onnx's
exporter and onnxruntime's MatMulNBitsQuantizer into the same artifact format and runtime.

Thresholds: fp32 must reproduce transformers exactly (top-1 agreement 1.0, KL < 1e-6, the same
greedy tokens as model.generate); int4 must pass the export's own thresholds (kl_mean <= 0.5,
top1_agreement >= 0.70) and, on this model, kl_mean < 0.02 and top1_agreement >= 0.9.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="building the GPT-2 checkpoint needs torch")
transformers = pytest.importorskip("transformers", reason="building the GPT-2 checkpoint needs transformers")

from click.testing import CliRunner  # noqa: E402

import runtimes  # noqa: E402
from edge_export.cli import main  # noqa: E402
from edge_export.errors import ArtifactError, ExportError, UnsupportedArchitectureError  # noqa: E402
from edge_export.export import ExportOptions, export  # noqa: E402
from edge_export.fixtures import R1_SPECIALS, byte_level_tokenizer  # noqa: E402
from edge_export.verify import data_file  # noqa: E402

from .conftest import SIMPLE_R1_TEMPLATE, SMALL_VOCAB, small_vocab_checkpoint  # noqa: E402
from .skip_policy import NO_OPTIMUM  # noqa: E402

try:
    from optimum.exporters.onnx import main_export  # noqa: F401
    OPTIMUM_MISSING = None
except ImportError as e:  # not installed, or installed beside a transformers it does not support
    OPTIMUM_MISSING = (f"{NO_OPTIMUM}, so .[all,dev] leaves it out and it does not import here ({e}); "
                       "pip install 'edge-export[optimum]' in an environment of its own")
needs_optimum = pytest.mark.skipif(OPTIMUM_MISSING is not None, reason=OPTIMUM_MISSING or "")
PROMPTS = 6  # of the built-in verification prompts, to keep the exports quick


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 (Conv1D layers: Gemm in ONNX) with the small byte-level tokenizer and R1's template."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=SMALL_VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=SMALL_VOCAB - 6, eos_token_id=SMALL_VOCAB - 5,
                                     initializer_range=0.05)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    byte_level_tokenizer(SMALL_VOCAB, [SMALL_VOCAB - 6 + i for i in range(6)]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1], "add_bos_token": True,
        "chat_template": SIMPLE_R1_TEMPLATE}, ensure_ascii=False))
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = data_file("eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()[:PROMPTS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def fp32_artifact(gpt2, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "gpt2-fp32"
    export(gpt2, out, ExportOptions(via="optimum", quant="fp32", prompts=prompts))
    return out


@pytest.fixture(scope="module")
def int4_artifact(gpt2, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("int4") / "gpt2-int4"
    result = CliRunner().invoke(main, ["export", str(gpt2), "-o", str(out), "--via", "optimum", "--quant", "int4",
                                       "--group-size", "32", "--json"])  # all 24 built-in prompts
    return out, result


@needs_optimum
def test_fp32_generates_the_same_greedy_tokens_as_transformers(gpt2, fp32_artifact):
    rt = runtimes.load(fp32_artifact)
    ids = rt.prompt_ids("Why is the sky blue?")
    ours = rt.generate(ids, temperature=0, max_new_tokens=24).tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32).eval()
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                            pad_token_id=SMALL_VOCAB - 5)[0, len(ids):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 3, "a degenerate continuation would test little"
    figures = json.loads((fp32_artifact / "edge_manifest.json").read_text())["verification"]
    assert figures["verified_against"] == "transformers"
    assert figures["top1_agreement"] == 1.0 and abs(figures["kl_mean"]) < 1e-6
    assert figures["greedy_match_tokens"] == 32.0


@needs_optimum
def test_int4_is_matmulnbits_and_passes_verification(int4_artifact):
    import onnx
    out, result = int4_artifact
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "edge_manifest.json").read_text())
    figures = manifest["verification"]
    assert figures["verified_against"] == "transformers" and figures["prompts"] == 24
    assert figures["kl_mean"] < 0.02 and figures["top1_agreement"] >= 0.9, figures
    quant = manifest["quantization"]
    assert (quant["quant"], quant["method"], quant["group_size"], quant["symmetric"]) == ("int4", "rtn", 32, True)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    assert bits == [4] * 8 + [8]  # 4 linears x 2 layers (GPT-2's Gemm rewritten), the head at int8
    assert not [n for n in graph.node if n.op_type == "Gemm"]
    assert quant["kept_float"] == ["transformer.wpe.weight", "transformer.wte.weight"]  # embeddings (Gather)
    assert sorted(quant["tensors"]) == sorted(n.name for n in nbits)


@needs_optimum
def test_artifact_format_and_checksums(fp32_artifact, tmp_path):
    manifest = json.loads((fp32_artifact / "edge_manifest.json").read_text())
    assert (manifest["target"], manifest["variant"], manifest["backend"]) == ("onnx", "optimum", "onnxruntime")
    assert manifest["model"]["architecture"] == "GPT2LMHeadModel" and manifest["max_context"] == 256
    graph = manifest["graph"]
    assert graph["kv"] == "concat" and graph["extra_inputs"] == ["position_ids"]
    assert graph["outputs"] == ["logits", "present.{i}.key", "present.{i}.value"]
    assert sorted(manifest["files"]) == ["model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]
    assert manifest["source"]["exporter"]["name"] == "optimum-onnx"
    tampered = tmp_path / "tampered"
    shutil.copytree(fp32_artifact, tampered)
    data = bytearray((tampered / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (tampered / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx.data: sha256 does not match"):
        runtimes.load(tampered)


@needs_optimum
def test_reference_backend_is_refused_with_a_reason(fp32_artifact):
    with pytest.raises(ArtifactError, match="backend 'reference' cannot run this onnx/optimum artifact of "
                                            "GPT2LMHeadModel .*no weights table.*; it runs on: onnxruntime"):
        runtimes.load(fp32_artifact, backend="reference")
    result = CliRunner().invoke(main, ["run", str(fp32_artifact), "Hi", "--backend", "reference"])
    assert result.exit_code == 2 and "cannot run this onnx/optimum artifact" in result.output


@needs_optimum
def test_cli_run_streams_from_the_artifact(fp32_artifact):
    result = CliRunner().invoke(main, ["run", str(fp32_artifact), "Hello", "--temperature", "0",
                                       "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["new_tokens"] == 8


@needs_optimum
def test_registered_architecture_through_optimum(tmp_path, prompts):
    """A Llama (grouped-query attention, rotary positions from position_ids) takes the same route."""
    checkpoint = small_vocab_checkpoint("r1-distill-llama-8b", tmp_path / "llama")
    manifest = export(checkpoint, tmp_path / "llama-fp32", ExportOptions(via="optimum", quant="fp32", prompts=prompts))
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["model"]["num_kv_heads"] < manifest["model"]["num_heads"]
    figures = manifest["verification"]
    assert figures["top1_agreement"] == 1.0 and abs(figures["kl_mean"]) < 1e-5, figures
    assert runtimes.load(tmp_path / "llama-fp32").generate("Hi", temperature=0, max_new_tokens=4).new_tokens >= 1


def test_unregistered_architecture_points_at_via_optimum(gpt2, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="model type 'GPT2LMHeadModel' is not supported.*"
                                                           "`--via optimum` exports other architectures"):
        export(gpt2, tmp_path / "out", ExportOptions(quant="int4"))


@pytest.mark.parametrize("args, message", [
    (["--quant", "int8"], "--via optimum takes --quant int4 or fp32, not int8"),
    (["--method", "gptq"], "--via optimum quantizes by round-to-nearest only"),
    (["--target", "tensorrt"], "target tensorrt does not honour --via (via='optimum'): it applies to onnx/ort only"),
    (["--variant", "portable"], "target onnx/portable does not honour --via (via='optimum')"),
])
def test_options_it_cannot_honour_are_one_line_errors(gpt2, tmp_path, args, message):
    result = CliRunner().invoke(main, ["export", str(gpt2), "-o", str(tmp_path / "out"), "--via", "optimum", *args])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {result.output.strip()[7:]}" and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(OPTIMUM_MISSING is None, reason="optimum-onnx is importable here")
def test_missing_optimum_names_the_install(gpt2, tmp_path):
    with pytest.raises(ExportError, match=r"--via optimum.*pip install 'edge-export\[optimum\]'"):
        export(gpt2, tmp_path / "out", ExportOptions(via="optimum", quant="fp32"))
    assert not (tmp_path / "out").exists()
