"""The command line: help, version, inspect, fixture, and one-line errors with exit code 2."""
import importlib.util
import json

from click.testing import CliRunner

from edge_export import __version__
from edge_export.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_and_version():
    out = run("--help")
    assert out.exit_code == 0
    for command in ("export", "run", "chat", "eval", "bench", "inspect", "fixture", "quickstart"):
        assert command in out.output
    assert __version__ in run("--version").output
    assert "onnx/ort" in run("export", "--help").output


def test_inspect_json(tiny_llama):
    out = run("inspect", str(tiny_llama), "--json")
    assert out.exit_code == 0
    info = json.loads(out.output)
    for key in ("architecture", "parameters", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "vocab_size", "kv_bytes_per_token", "weight_bytes"):
        assert key in info
    assert info["architecture"] == "LlamaForCausalLM" and info["num_kv_heads"] == 2
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 2  # K and V, 2 layers, 2 kv heads, head_dim 32, fp16
    w = info["weight_bytes"]
    assert w["fp16"] > w["int8"] > w["int4"] and w["fp8"] < w["fp16"]


def test_inspect_human(tiny_llama):
    out = run("inspect", str(tiny_llama))
    assert "LlamaForCausalLM" in out.output and "KV cache (fp16)" in out.output
    assert "rope              theta 500000, llama3 (original context 8,192)\n" in out.output


def test_errors_are_one_line_exit_2(tmp_path):
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [f"error: {tmp_path}: no config.json; point at an HF model folder "
                                               "(config.json + *.safetensors) or a .gguf file"]
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "no such file or folder" in out.output and "Traceback" not in out.output


def test_debug_shows_traceback(tmp_path):
    out = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path)])
    assert out.exit_code != 0 and out.exception is not None


def test_fixture_command(tmp_path):
    out = run("fixture", "--preset", "r1-distill-llama-8b", "--scale", "tiny", "-o", str(tmp_path / "f"))
    assert out.exit_code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= {p.name for p in (tmp_path / "f").iterdir()}
    bad = CliRunner().invoke(main, ["fixture", "--preset", "gpt-5", "-o", str(tmp_path / "g")])
    assert bad.exit_code == 2 and "unknown preset 'gpt-5'" in bad.output


def test_full_fixture_refuses_when_disk_is_too_small(tmp_path, monkeypatch):
    """A disk that reports 50 GB free (shutil.disk_usage, what the check reads) cannot hold the 70B
    fixture's 141 GB: refused before anything is written."""
    import shutil
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=50 * 10**9))
    out = CliRunner().invoke(main, ["fixture", "--preset", "r1-distill-llama-70b", "--scale", "full", "-o", str(tmp_path / "big")])
    assert out.exit_code == 2 and out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'big'}: r1-distill-llama-70b at scale full needs 141.1 GB of disk, only 50.0 GB free; "
        "choose another folder or --scale tiny"]
    assert not (tmp_path / "big").exists()


def test_export_run_bench_eval_commands(tiny_llama, tmp_path):
    art = tmp_path / "art"
    out = run("export", str(tiny_llama), "-o", str(art), "--quant", "int4", "--min-top1", "0", "--max-kl", "100")
    assert out.exit_code == 0 and "wrote" in out.output and "kl_mean" in out.output
    again = CliRunner().invoke(main, ["export", str(tiny_llama), "-o", str(art)])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    out = run("run", str(art), "hello", "--json", "--temperature", "0", "--max-new-tokens", "8")
    result = json.loads(out.output)
    assert set(result) >= {"thinking", "answer", "new_tokens", "thinking_tokens", "ttft_ms", "decode_tok_s"}
    out = run("run", str(art), "hello", "--backend", "reference", "--temperature", "0", "--max-new-tokens", "4")
    assert out.exit_code == 0
    out = run("bench", str(art), "--device", "host", "--prompt-tokens", "16", "--new-tokens", "8", "--runs", "2",
              "--warmup", "0", "--json")
    bench = json.loads(out.output)
    assert bench["measured"] is True and bench["runs"] == 2 and bench["new_tokens"] == 8
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "model_bytes"):
        assert bench[key] > 0
    out = run("eval", str(art), "--reference", str(tiny_llama), "--json", "--no-ppl")
    figures = json.loads(out.output)
    assert 0 <= figures["top1_agreement"] <= 1 and figures["kl_mean"] >= 0 and figures["positions"] > 0


def test_run_refuses_a_tampered_artifact(tiny_llama, tmp_path):
    art = tmp_path / "art"
    run("export", str(tiny_llama), "-o", str(art), "--quant", "fp32", "--no-verify")
    (art / "tokenizer.json").write_text("{}")
    out = CliRunner().invoke(main, ["run", str(art), "hi"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [
        f"error: {art / 'tokenizer.json'}: {2} bytes, the manifest says "
        f"{json.loads((art / 'edge_manifest.json').read_text())['files']['tokenizer.json']['bytes']}; "
        "the file was modified or truncated, re-export the artifact"]


def test_run_prompt_longer_than_context(tiny_llama, tmp_path):
    art = tmp_path / "art"
    run("export", str(tiny_llama), "-o", str(art), "--quant", "fp32", "--no-verify", "--max-context", "16")
    out = CliRunner().invoke(main, ["run", str(art), "word " * 40])
    assert out.exit_code == 2 and "shorten the prompt or re-export with a larger --max-context" in out.output


def test_targets_command():
    rows = {(r["target"], r["variant"]): r for r in json.loads(run("targets", "--json").output)}
    assert {("onnx", "ort"), ("onnx", "portable"), ("tensorrt", "explicit")} <= set(rows)
    assert rows["onnx", "ort"]["runs_here"] is True and "int4" in rows["onnx", "ort"]["quant"]
    assert "fp8" in rows["onnx", "portable"]["quant"] and "fp8" not in rows["onnx", "ort"]["quant"]
    trt = rows["tensorrt", "explicit"]
    if importlib.util.find_spec("tensorrt") is None:
        assert trt["runs_here"] is False and "TensorRT" in trt["why_not"]
    assert "onnx/ort" in run("targets").output


def test_tensor_loss_flag_reaches_the_options(tmp_path):
    """--tensor-loss is parsed into ExportOptions.tensor_loss; an unknown measure is one line, exit 2."""
    out = CliRunner().invoke(main, ["export", "smollm2-135m", "-o", str(tmp_path / "a"), "--tensor-loss", "bogus"])
    assert out.exit_code == 2 and "--tensor-loss" in out.output and "Traceback" not in out.output
    from edge_export.cli_options import options_from_cli
    from edge_export.options import ExportOptions
    defaults = {"target": "onnx", "variant": None, "quant": "int4", "method": None, "head": "int8",
                "group_size": "32", "asymmetric": False, "clip_search": False, "act_order": False,
                "max_context": 2048, "kv_cache": None, "accuracy_level": "4", "soc": None, "prefill_chunk": 64,
                "opt_tokens": 128, "device": None, "fp8_activations": None, "calibration": None,
                "tensor_loss": "kl", "no_verify": False, "max_kl": None, "min_top1": None, "overwrite": False,
                "via": None}
    assert options_from_cli(defaults) == ExportOptions(tensor_loss="kl")
