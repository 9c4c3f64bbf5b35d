"""The onnx/qnn variant: QDQ graphs for onnxruntime's QNN execution provider, and the `qnn` backend.

Built from the real SmolLM2-135M-Instruct (its GGUF, first 2 of 30 layers, full 49152 vocabulary):
the HTP simulator runs about 20 M weights a second, so a 2-layer slice (35 M weights, most of
them the tied lm_head) costs ~2 s a step and the whole model ~7 s. Graph-structure and CPU checks
run everywhere; the HTP checks need onnxruntime-qnn (pip install onnxruntime-qnn, a plugin beside
onnxruntime, Linux x86_64 / Windows) and skip with that reason elsewhere.

Tolerances, over the prompt's last position and (w8a16) the next 3 greedy tokens, teacher-forced:
- the NPU's own arithmetic: KL(reference decoder on the artifact's stored weights || HTP) mean
  < 0.02 nats (measured: 0.001-0.006);
- end to end against the float checkpoint: w8a16 KL mean < 0.05 and top-1 >= 3/4 (measured:
  0.006, 4/4); w4a16 (LPBQ) KL < 0.5 (measured 0.015; re-quantizing this already 4-bit model to
  int4 reaches 0.4-2 on single tokens of the full model, as int4 rtn does in the README's table).
Tiny random checkpoints of every architecture (Qwen2's biases, Qwen3's q/k norms) run the same
graphs on the CPU provider and the HTP within KL 0.1 of their stored weights.
"""
from __future__ import annotations

import dataclasses
import json
import platform

import numpy as np
import onnx
import pytest

import quantizers as Q
import runtimes
from edge_export.checkpoint import open_checkpoint
from edge_export.checkpoint.safetensors_io import write_safetensors
from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export
from edge_export.targets import onnx_layers, onnx_qnn, onnx_qnn_qdq
from edge_export.targets.onnx_qnn import compile_context, lpbq
from runtimes.backends.qnn import StaticDecoder, qnn_available
from runtimes.errors import ArtifactError, ContextOverflowError
from runtimes.models import get_architecture
from runtimes.reference import ReferenceDecoder

QNN_OK, QNN_WHY = qnn_available()
needs_qnn = pytest.mark.skipif(not QNN_OK, reason=QNN_WHY)
LAYERS, CONTEXT = 2, 256
PROMPT = "What is the capital of France? Answer briefly."
STANDARD_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMul", "Add", "Mul", "Sigmoid", "Softmax", "Gather",
                "Reshape", "Transpose", "Concat", "Slice", "RMSNormalization"}


@pytest.fixture(scope="module")
def smollm2_slice(tmp_path_factory):
    """The real SmolLM2's first LAYERS layers as an HF folder (float32 from the GGUF's blocks)."""
    ckpt = open_checkpoint("smollm2-135m")
    spec = dataclasses.replace(ckpt.spec, num_layers=LAYERS)
    folder = tmp_path_factory.mktemp("smollm2_slice")
    write_safetensors(folder / "model.safetensors",
                      [(n, s, "F32", (lambda n=n: ckpt.tensor(n))) for n, s in spec.tensor_shapes().items()])
    (folder / "config.json").write_text(json.dumps(get_architecture(spec.architecture).config_from_spec(spec)))
    tok = ckpt.tokenizer
    tok.tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "add_bos_token": tok.add_bos}))
    return folder


def _export(source, folder, quant):
    return export(source, folder, ExportOptions(target="onnx", variant="qnn", quant=quant, max_context=CONTEXT,
                                                verify=False))


@pytest.fixture(scope="module")
def w8a16(smollm2_slice, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qnn") / "w8a16"
    return folder, _export(smollm2_slice, folder, "int8")


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp, lq = (x - x.max() - np.log(np.exp(x - x.max()).sum()) for x in (p_logits.astype(np.float64),
                                                                       q_logits.astype(np.float64)))
    return float((np.exp(lp) * (lp - lq)).sum())


def _compare(candidate, references, ids, steps):
    """Teacher-forced on the first reference's greedy tokens: per reference, KLs and top-1 hits."""
    rows = [[candidate.prefill(ids)] + [r.prefill(ids) for r in references]]
    for _ in range(steps):
        token = int(np.argmax(rows[-1][1]))
        rows.append([candidate.decode(token)] + [r.decode(token) for r in references])
    return [([_kl(row[j], row[0]) for row in rows], [row[j].argmax() == row[0].argmax() for row in rows])
            for j in range(1, len(references) + 1)]


# ---- everywhere: the graphs themselves -----------------------------------------------------
def test_graphs_are_static_qdq_of_standard_ops(w8a16):
    folder, manifest = w8a16
    graph = manifest["graph"]
    assert manifest["variant"] == "qnn" and manifest["backend"] == "qnn"
    assert {"prefill.onnx", "decode.onnx", "prefill.onnx.data"} <= set(manifest["files"])
    assert graph["soc"]["name"] == "SM8650" and graph["soc"]["htp_arch"] == 75
    for name, seq in (("prefill", graph["prefill"]["seq_len"]), ("decode", 1)):
        model = onnx.load(str(folder / graph[name]["file"]), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert ops <= STANDARD_OPS and {n.domain for n in model.graph.node} <= {""}, ops - STANDARD_OPS
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [23]
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(model.graph.input) + list(model.graph.output)}
        assert all(all(d > 0 for d in shape) for shape in shapes.values())  # static
        assert shapes["past.0.key"] == [1, 3, CONTEXT, 64] and shapes["present.1.value"] == [1, 3, seq, 64]
        assert shapes["attention_mask"] == [1, 1, seq, CONTEXT + seq] and shapes["logits"] == [1, 1, 49152]
        types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        assert types.pop("input_ids") == onnx.TensorProto.INT32
        assert set(types.values()) == {onnx.TensorProto.UINT16}  # the cache and logits are codes
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".qweight")]
    assert len(weights) == LAYERS * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    assert graph["quantization"]["calibration"]["prompts"] == 16


def test_qdq_graphs_on_cpu_match_the_reference(w8a16, smollm2_slice):
    """onnxruntime's CPU provider runs the same QDQ graphs: the graphs, the chunking (a prompt of
    two chunks, the first padded) and the cache bookkeeping are right independently of the NPU."""
    folder, _ = w8a16
    cpu = _cpu_decoder(folder)
    stored = runtimes.load(folder, backend="reference")
    ids = stored.prompt_ids(PROMPT)
    (kl_stored, top1_stored), = _compare(cpu, [stored.backend], ids * 2, 3)
    assert np.mean(kl_stored) < 0.02 and np.mean(top1_stored) >= 0.75, (kl_stored, top1_stored)
    ckpt = open_checkpoint(smollm2_slice)
    (kl_float, _), = _compare(cpu, [ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=CONTEXT)], ids, 1)
    assert np.mean(kl_float) < 0.05, kl_float


def test_lpbq_packs_int4_with_4bit_block_scales():
    """QNN's low-power blocks: int4 codes, a float scale per row times 1..15 per block of 32; its
    error is no worse than plain max/7 int4 groups with float scales."""
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)
    lin = lpbq(w, 32)
    assert lin.codes.shape == (128, 48) and lin.codes.min() >= -8 and lin.codes.max() <= 7
    assert lin.block_scales.shape == (4, 48) and 1 <= lin.block_scales.min() and lin.block_scales.max() <= 15
    block_scales = lin.block_scales * lin.scales  # [4 blocks, 48 rows]
    back = (lin.codes.astype(np.float32).reshape(4, 32, 48) * block_scales[:, None, :]).reshape(128, 48).T
    groups = w.reshape(48, 4, 32)
    plain_scales = np.abs(groups).max(-1, keepdims=True) / 7
    plain = (np.clip(np.round(groups / plain_scales), -8, 7) * plain_scales).reshape(48, 128)
    assert np.square(back - w).sum() <= np.square(plain - w).sum()


@pytest.mark.parametrize("source", ["int4-groups", "int4-per-row", "int8-groups", "float"])
def test_requantizing_a_block_of_rows_at_a_time_changes_nothing(source, monkeypatch):
    """to_qlinear quantizes every output row on its own, so running it ROW_BLOCK_ELEMENTS weights
    at a time (a 152k-row head is never whole in float32) gives the very codes and scales."""
    w = np.random.default_rng(1).standard_normal((37, 128)).astype(np.float32)
    value = {"int4-groups": lambda: Q.quantize(w, Q.Int4Config(group_size=32, symmetric=False)),
             "int4-per-row": lambda: Q.quantize(w, Q.Int4Config(group_size=128)),
             "int8-groups": lambda: Q.quantize(w, Q.Int8Config(group_size=64)),
             "float": lambda: w}[source]()
    whole = onnx_qnn.to_qlinear(value, "w")
    monkeypatch.setattr(onnx_qnn, "ROW_BLOCK_ELEMENTS", 5 * 128)  # blocks of 5 rows, the last of 2
    blocked = onnx_qnn.to_qlinear(value, "w")
    for field in ("codes", "scales", "block_scales"):
        a, b = getattr(whole, field), getattr(blocked, field)
        assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b))), field
    assert (blocked.bits, blocked.block_size, blocked.codes.shape) == (whole.bits, whole.block_size, (128, 37))


def test_qnn_refuses_float_and_foreign_artifacts(smollm2_slice, tmp_path):
    with pytest.raises(ExportError, match=r"--quant fp32 cannot be carried by target onnx/qnn \(it takes: int8, int4\)"):
        export(smollm2_slice, tmp_path / "f", ExportOptions(target="onnx", variant="qnn", quant="fp32", verify=False))
    assert not (tmp_path / "f").exists()
    if QNN_OK:
        ort_folder = tmp_path / "ort"
        export(smollm2_slice, ort_folder, ExportOptions(quant="int8", max_context=64, verify=False))
        with pytest.raises(ArtifactError, match="the qnn backend runs artifacts of --target onnx --variant qnn"):
            runtimes.load(ort_folder, backend="qnn")


def _cpu_decoder(folder):
    """The artifact's QDQ graphs on onnxruntime's CPU provider (exact Q/DQ arithmetic in float)."""
    import onnxruntime as ort
    graph = runtimes.artifact.load_artifact(folder).manifest["graph"]
    sessions = {k: ort.InferenceSession(str(folder / graph[k]["file"]), providers=["CPUExecutionProvider"])
                for k in ("prefill", "decode")}
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    artifact = runtimes.artifact.load_artifact(folder)
    return StaticDecoder(artifact.spec, graph, artifact.manifest["max_context"],
                         lambda k, feeds: dict(zip(names[k], sessions[k].run(None, feeds))), graph["io"])


def test_every_architecture_on_cpu_and_htp(tiny_checkpoint, tmp_path):
    """Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm) tiny random checkpoints: their QDQ
    graphs on the CPU provider, and on the HTP where onnxruntime-qnn is installed, against the
    reference decoder on the artifact's stored weights (random weights: a looser KL bound)."""
    folder = tmp_path / "qnn"
    export(tiny_checkpoint, folder, ExportOptions(target="onnx", variant="qnn", quant="int8", max_context=96,
                                                  verify=False))
    stored = runtimes.load(folder, backend="reference")
    ids = stored.prompt_ids("hello there")
    candidates = [_cpu_decoder(folder)]
    if QNN_OK:
        rt = runtimes.load(folder)
        assert {n for counts in rt.backend.ep_assignment().values() for n in counts} == {"QNNExecutionProvider"}
        candidates.append(rt.backend)
    for candidate in candidates:
        (kl, _), = _compare(candidate, [stored.backend], ids, 2)
        assert np.mean(kl) < 0.1, (type(candidate).__name__, kl)
    if QNN_OK:  # the shared Generator over the HTP
        result = rt.generate("hello", temperature=0, max_new_tokens=3, ignore_eos=True)
        assert result.new_tokens == 3 and result.ttft_ms > 0 and result.decode_tok_s > 0


def _whole_graph_ranges(model, folder, points, spec, max_context, seq, prompts):
    """Calibration as it ran before it went layer by layer, the independent check of that pass:
    the whole float graph in one onnxruntime session per shape (weights folded to float), driven
    by the runtime's own StaticDecoder, every calibrated point made a graph output."""
    import onnxruntime as ort
    observed = [t for t, kind in points.items() if kind == onnx_qnn_qdq.ACT]
    outputs = {v.name for v in model.graph.output}
    files = {}
    for graph, length in (("prefill", seq), ("decode", 1)):
        m = onnx_qnn_qdq.with_seq_len(model, spec, max_context, length)
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in observed if t not in outputs)
        files[graph] = folder / f".whole_{graph}.onnx"
        files[graph].write_bytes(m.SerializeToString())
    ranges = {}

    def observe(out):
        for t in observed:
            r = ranges.setdefault(t, [float(out[t].min()), float(out[t].max())])
            r[0], r[1] = min(r[0], float(out[t].min())), max(r[1], float(out[t].max()))

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    sessions = {k: ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for k, f in files.items()}
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    decoder = StaticDecoder(spec, {"prefill": {"seq_len": seq}}, max_context,
                            lambda graph, feeds: dict(zip(names[graph], sessions[graph].run(None, feeds))), None, observe)
    for ids in prompts:
        logits = decoder.prefill(ids[-(max_context - onnx_qnn_qdq.CALIBRATION_DECODE_STEPS):])
        for _ in range(onnx_qnn_qdq.CALIBRATION_DECODE_STEPS):
            logits = decoder.decode(int(np.argmax(logits)))
    for f in files.values():
        f.unlink()
    return {t: tuple(r) for t, r in ranges.items()}


@pytest.mark.parametrize("hold", [True, False], ids=["sessions-held", "layers-reloaded"])
def test_layer_major_calibration_matches_the_whole_graph(tiny_checkpoint, tmp_path, monkeypatch, hold):
    """The layer-by-layer calibration pass (prompts chunked and padded as the runtime does, then
    greedy decode steps) finds the same range at every activation point as the whole float graph
    run by the runtime's StaticDecoder, so the uint16 scales and zero points, and with them the
    artifact, are the same. Both with every layer's session kept and with each layer rebuilt at
    every decode step (what a model too big to fold whole does)."""
    if not hold:
        monkeypatch.setattr(onnx_qnn_qdq, "FOLD_WEIGHTS_BYTES", 0)
    seen = {}
    layer_major = onnx_qnn.calibrate

    def both(model, folder, points, spec, max_context, seq, prompts, threads):
        seen["points"] = points
        seen["whole"] = _whole_graph_ranges(model, folder, points, spec, max_context, seq, prompts)
        seen["layer"] = layer_major(model, folder, points, spec, max_context, seq, prompts, threads)
        graph = onnx_layers.LayerGraph(model, folder)
        seen["embed"] = onnx.load_from_string(graph._segment_model(graph.segments[0]))
        return seen["layer"]

    monkeypatch.setattr(onnx_qnn, "calibrate", both)
    export(tiny_checkpoint, tmp_path / "q", ExportOptions(target="onnx", variant="qnn", quant="int4", max_context=96,
                                                          verify=False, prefill_chunk=16))
    whole, layer = seen["whole"], seen["layer"]
    assert set(layer) == set(whole) and len(whole) > 20 * 2
    # the embedding segment gathers the uint16 table's rows, then dequantizes only those
    embed = seen["embed"]
    table = next(n for n in embed.graph.node if n.op_type == "Gather").input[0]
    assert table in {t.name for t in embed.graph.initializer} and table.endswith("embed_tokens.table")
    assert [n.op_type for n in embed.graph.node] == ["Gather", "DequantizeLinear"]
    for t, (lo, hi) in whole.items():
        assert np.allclose(layer[t], (lo, hi), rtol=1e-5, atol=1e-6), (t, layer[t], (lo, hi))
    params = {k: onnx_qnn_qdq.resolve_params(seen["points"], seen[k]) for k in ("whole", "layer")}
    for t, (scale, zero_point) in params["whole"].items():
        assert params["layer"][t][0] == pytest.approx(scale, rel=1e-5) and abs(params["layer"][t][1] - zero_point) <= 1


# ---- on the HTP simulator --------------------------------------------------------------------
@needs_qnn
def test_w8a16_runs_every_node_on_the_htp_and_matches(w8a16, smollm2_slice):
    """Compiled for the SoC into context binaries (which also proves every node went to QNN: CPU
    fallback is disabled), then run through the qnn backend against both references."""
    folder, _ = w8a16
    context = compile_context(folder)
    for graph, counts in context["nodes_by_provider"].items():
        assert set(counts) == {"QNNExecutionProvider"} and counts["QNNExecutionProvider"] > 250, (graph, counts)
    rt = runtimes.load(folder)  # the manifest's backend: qnn, on the context binaries
    assert rt.backend.name == "qnn" and rt.backend.ep_assignment()["decode"] == {"QNNExecutionProvider": 1}
    ckpt = open_checkpoint(smollm2_slice)
    ids = rt.prompt_ids(PROMPT)
    stored = runtimes.load(folder, backend="reference").backend
    (kl_float, top1_float), (kl_stored, _) = _compare(
        rt.backend, [ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=CONTEXT), stored], ids, 3)
    assert np.mean(kl_stored) < 0.02, kl_stored
    assert np.mean(kl_float) < 0.05 and np.mean(top1_float) >= 0.75, (kl_float, top1_float)
    with pytest.raises(ContextOverflowError, match="do not fit the artifact's context of 256"):
        rt.backend.prefill([1] * (CONTEXT + 1))


@needs_qnn
def test_w4a16_lpbq_on_the_htp(smollm2_slice, tmp_path):
    manifest = _export(smollm2_slice, tmp_path / "w4a16", "int4")
    assert manifest["graph"]["quantization"]["scheme"].startswith("w4a16: int4 LPBQ")
    rt = runtimes.load(tmp_path / "w4a16", backend="qnn")  # compiled from the QDQ graphs at load
    assert {n for counts in rt.backend.ep_assignment().values() for n in counts} == {"QNNExecutionProvider"}
    ckpt = open_checkpoint(smollm2_slice)
    stored = runtimes.load(tmp_path / "w4a16", backend="reference").backend
    (kl_float, _), (kl_stored, _) = _compare(
        rt.backend, [ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=CONTEXT), stored], rt.prompt_ids(PROMPT), 0)
    assert np.mean(kl_stored) < 0.02 and np.mean(kl_float) < 0.5, (kl_stored, kl_float)


def test_export_verifies_on_the_cpu_provider_off_a_snapdragon(smollm2_slice, tmp_path):
    """Off a Snapdragon the HTP is a simulator (hours for SmolLM2's built-in prompts), so an export
    verifies the very same static QDQ graphs on onnxruntime's CPU provider, and says so."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "Name a prime above 10."}))
    manifest = export(smollm2_slice, tmp_path / "v", ExportOptions(target="onnx", variant="qnn", quant="int8",
                                                                    max_context=CONTEXT, prompts=str(prompts),
                                                                    max_kl=10, min_top1=0.0))
    figures = manifest["verification"]
    assert figures["prompts"] == 2 and figures["kl_mean"] < 0.2
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "CPU provider" in figures["verified_with"]


def test_soc_and_prefill_chunk_come_from_the_options(tiny_llama, tmp_path):
    """--device names a Snapdragon profile: its SoC is what the graphs are for (no constant); the
    prefill chunk is QnnOptions.prefill_chunk; export hands the calibration prompts in."""
    manifest = export(tiny_llama, tmp_path / "q", ExportOptions(target="onnx", variant="qnn", quant="int8",
                                                               max_context=96, verify=False,
                                                               device="snapdragon-8-elite", prefill_chunk=16))
    graph = manifest["graph"]
    assert graph["soc"] == {"name": "SM8750", "soc_model": 69, "htp_arch": 79, "marketing_name": "Snapdragon 8 Elite"}
    assert graph["prefill"]["seq_len"] == 16 and graph["kv_dtype"] == "uint16"
    assert graph["quantization"]["calibration"]["prompts"] == 16
