"""The loss of a tensor a target does not carry exactly (edge_export/tensor_loss.py), on the tiny
R1-shaped Q4_K_M that llama.cpp quantized: the layer-major KL against a whole-model run of the
verification scorer, the output-error proxy against a case whose answer is known, and which of the
two an export of SmolLM2's Q4_K_M gets."""
from __future__ import annotations

import numpy as np
import pytest

from edge_export.checkpoint.gguf_reader import GGUFCheckpoint
from edge_export.tensor_loss import PROMPTS, TOKENS, _locate, choose_measure, kl_flops, measure_losses
from edge_export.verify import LayerMajorScorer, encode_prompts, load_prompts
from tests.test_gguf_kquants import r1_tiny_q4km, r1_tiny_tokenized, smollm2_q4km  # noqa: F401 (fixtures)


def _tensors(spec) -> list[str]:
    """One tensor of each kind where it matters: the embedding, the first and last layers, the head."""
    return [spec.tensor_name("embed"), spec.tensor_name("q_proj", 0), spec.tensor_name("down_proj", 0),
            spec.tensor_name("o_proj", spec.num_layers - 1), spec.tensor_name("lm_head")]


def test_layer_major_kl_equals_a_whole_model_run(r1_tiny_q4km):
    """Each tensor perturbed alone (5% noise): the KL measured layer-major, branching at the tensor's
    layer, equals the KL the verification scorer gets running the whole model with that tensor
    replaced, on the same prompts and the reference's greedy tokens."""
    ckpt = GGUFCheckpoint(r1_tiny_q4km)
    rng = np.random.default_rng(7)  # not the fixture's seed 0, whose stream made the weights themselves
    stored = {name: ckpt.tensor(name) * (1 + 0.05 * rng.standard_normal(ckpt.spec.tensor_shapes()[name]))
              .astype(np.float32) for name in _tensors(ckpt.spec)}
    loss = measure_losses(ckpt, stored.__getitem__, list(stored), "kl", prompts=3, tokens=6)
    assert loss["measure"] == "kl" and loss["prompts"] == 3 and loss["positions"] == 18
    ids = encode_prompts(ckpt.tokenizer, load_prompts(None))[:3]
    reference = LayerMajorScorer(ckpt.spec, ckpt.tensor)
    tokens, _ = reference.greedy(ids, 6)
    seqs = [p + t[:-1] for p, t in zip(ids, tokens)]

    def log_probs(scorer):  # float64, so float32 rounding of log-probs does not blur a small KL
        out = []
        for logits, p in zip(scorer.sequence_logits(seqs), ids):
            z = logits[len(p) - 1:].astype(np.float64)
            z -= z.max(-1, keepdims=True)
            out.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
        return out
    ref = log_probs(reference)
    for name, value in stored.items():
        cand = log_probs(LayerMajorScorer(ckpt.spec, lambda n: value if n == name else ckpt.tensor(n)))
        kl = np.mean(np.concatenate([(np.exp(r) * (r - c)).sum(-1) for r, c in zip(ref, cand)]))
        assert kl > 0, name  # the perturbation reaches the logits
        assert loss["tensors"][name]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-12), name
        assert loss["tensors"][name]["relative_weight_error"] == pytest.approx(0.05, rel=0.05), name


def test_output_error_of_a_scaled_tensor_is_its_scale(r1_tiny_q4km):
    """W' = 1.01 W changes every output of W by exactly 1%, whatever the inputs: the proxy says 0.01
    for a linear, the head and the embedding alike."""
    ckpt = GGUFCheckpoint(r1_tiny_q4km)
    stored = {name: ckpt.tensor(name) * np.float32(1.01) for name in _tensors(ckpt.spec)}
    loss = measure_losses(ckpt, stored.__getitem__, list(stored), "relative_output_error", prompts=2)
    assert loss["measure"] == "relative_output_error" and loss["why"] == "asked for"
    for name in stored:
        assert loss["tensors"][name]["relative_output_error"] == pytest.approx(0.01, rel=1e-3), name
        assert loss["tensors"][name]["relative_weight_error"] == pytest.approx(0.01, rel=1e-3), name


def test_unknown_measure_is_refused(r1_tiny_q4km):
    from edge_export.errors import ExportError
    with pytest.raises(ExportError, match="tensor loss measure 'mse' is not one of auto, kl, relative_output_error"):
        measure_losses(GGUFCheckpoint(r1_tiny_q4km), None, [], "mse")


def test_smollm2_q4km_gets_the_kl_for_its_k_quants_and_the_proxy_when_all_are_requantized(smollm2_q4km):
    """On SmolLM2's Q4_K_M, Core ML's inexact tensors (the 30 Q4_K / Q6_K, whose group scales it rounds
    to float16) fit the KL's budget; a target that re-quantizes all 211 quantized tensors gets the proxy."""
    ckpt = GGUFCheckpoint(smollm2_q4km)
    spec = ckpt.spec
    ids = encode_prompts(ckpt.tokenizer, load_prompts(None))[:PROMPTS]
    quantized = {n: ckpt.stored_dtype(n) for n in spec.tensor_shapes() if ckpt.stored_dtype(n) != "F32"}
    k_quants = [_locate(spec, n) for n, t in quantized.items() if t in ("Q4_K", "Q6_K")]
    assert len(k_quants) == 30 and len(quantized) == 211
    assert choose_measure(spec, k_quants, ids, TOKENS)[0] == "kl"
    everything = [_locate(spec, n) for n in quantized]
    measure, why = choose_measure(spec, everything, ids, TOKENS)
    assert measure == "relative_output_error" and "over the 1e+12 budget" in why
    assert kl_flops(spec, everything, 100, 10) > kl_flops(spec, k_quants, 100, 10)


def test_smollm2_q4km_on_coreml_names_the_loss_of_each_rounded_k_quant(smollm2_q4km, tmp_path):
    """Core ML on llama.cpp's SmolLM2 Q4_K_M (converted and saved here; prediction needs macOS): the
    Q5_0 / Q8_0 tensors are stored bit for bit; the Q4_K / Q6_K ones, whose group scales the float16
    program rounds, are marked inexact, each with the KL of that tensor alone."""
    from edge_export.export import ExportOptions, export
    manifest = export(str(smollm2_q4km), str(tmp_path / "coreml"), ExportOptions(target="coreml", verify=False,
                                                                                  max_context=64))
    records = manifest["quantization"]["tensors"]
    quantized = {n: r for n, r in records.items() if r.get("source_type") != "F32"}
    assert len(quantized) == 211
    for name, record in quantized.items():
        rounded = record["source_type"] in ("Q4_K", "Q6_K")
        assert record["exact"] is not rounded, name
        assert ("loss" in record) is rounded, name
        if rounded:
            assert 0 < record["loss"]["kl"] < 1e-3 and 0 < record["loss"]["relative_weight_error"] < 1e-3, name
    how = manifest["quantization"]["tensor_loss"]
    assert how["measure"] == "kl" and how["tensors"] == 30 and how["prompts"] == PROMPTS
    assert how["positions"] == PROMPTS * TOKENS
