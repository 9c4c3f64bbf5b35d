"""Phi-3 / Phi-4-mini (Phi3ForCausalLM) held to transformers' own implementation, on every target.

The architecture joined through the decoder description alone (runtimes/models/phi3.py): fused
qkv_proj and gate_up_proj split on read, a partial rotary (0.75 of each head) and LongRoPE. The
checkpoint here is written by transformers itself (``Phi3ForCausalLM`` from a config, then
``save_pretrained``), with a tiny original context (64) so that prompts cross it:
- a prompt shorter than 64 rotates with the short factors, and decoding past 64 switches to the
  long ones for the new keys only (keys already cached are not re-rotated, as in transformers);
- a prompt longer than 64 uses the long factors from its first token.

Every target's artifact is then run and compared with transformers on the weights that artifact
stores (read back by the reference reader and loaded into the transformers model), by greedy
tokens: onnx ort and portable through ``runtimes``, coreml through its verification path (the
converted module), tensorrt's graph on onnxruntime; qnn's QDQ graphs on onnxruntime's CPU provider
token by token on transformers' sequence, where uint16 activations leave the decision clear.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import runtimes
from edge_export.checkpoint import open_checkpoint
from edge_export.export import ExportOptions, export
from runtimes.models import get_architecture
from runtimes.reference import ReferenceDecoder
from runtimes.weights import ArtifactWeights

from .conftest import SMALL_VOCAB, write_small_tokenizer

ORIGINAL_CONTEXT = 64
EOS = SMALL_VOCAB - 5
# head_dim 64 x partial_rotary_factor 0.75 = 48 rotated channels (onnxruntime's GroupQueryAttention
# needs rotary_dim / 2 to be a multiple of 8; Phi-4-mini rotates 96 of 128)
ROTARY_PAIRS = 24


def phi3_config() -> transformers.Phi3Config:
    rng = np.random.default_rng(7)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": (1.0 + rng.random(ROTARY_PAIRS) * 0.5).round(4).tolist(),
            "long_factor": (1.0 + rng.random(ROTARY_PAIRS) * 8.0).round(4).tolist()}
    return transformers.Phi3Config(
        vocab_size=SMALL_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=ORIGINAL_CONTEXT, rope_parameters=rope, partial_rotary_factor=0.75,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=SMALL_VOCAB - 6, eos_token_id=EOS,
        pad_token_id=EOS, sliding_window=None)


def build_model(seed: int = 0):
    """A random Phi3 whose greedy tokens are decisive: weights ~ N(0, 0.14), norms ~ 1 (logits of a
    few units, so float32 rounding in transformers stays well under the 1e-4 bound)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(phi3_config(), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.14)
    return model.eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(the float32 transformers model as loaded back from disk, the checkpoint folder)."""
    folder = tmp_path_factory.mktemp("phi3")
    build_model().to(torch.bfloat16).save_pretrained(folder)
    write_small_tokenizer(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), folder


def prompt(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, SMALL_VOCAB - 8, n).tolist()


def transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers' forward over its KV cache, one token a step: LongRoPE's
    factors chosen per step, keys already cached kept as they were rotated. (``model.generate``
    differs once: Phi3ForCausalLM.prepare_inputs_for_generation drops the cache and re-runs the
    whole sequence at the step that first passes the original context, re-rotating every key.
    Runtimes with a KV cache, onnxruntime-genai's included, do not; see test_generate_long_prompt.)"""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_checkpoint_is_fused_and_read_split(written, caplog):
    _, folder = written
    names = json.loads((folder / "config.json").read_text())
    assert names["architectures"] == ["Phi3ForCausalLM"]
    with caplog.at_level(logging.WARNING):
        ckpt = open_checkpoint(folder)
    assert not [r for r in caplog.records if "not known" in r.getMessage()]
    spec = ckpt.spec
    assert (spec.rotary_dim, spec.head_dim, spec.tied_embeddings) == (48, 64, True)
    assert spec.rope_scaling["rope_type"] == "longrope"
    assert spec.rope_scaling["original_max_position_embeddings"] == ORIGINAL_CONTEXT
    # transformers' defaults: factor = 256 / 64, attention factor sqrt(1 + ln 4 / ln 64)
    assert spec.rope_scaling["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(64)))
    q = ckpt.tensor(spec.tensor_name("q_proj", 0))
    assert q.shape == (256, 256) and ckpt.tensor(spec.tensor_name("up_proj", 1)).shape == (512, 256)


@pytest.mark.parametrize("n_prompt", [ORIGINAL_CONTEXT - 8, ORIGINAL_CONTEXT + 16],
                         ids=["crosses-while-decoding", "long-from-prefill"])
def test_reference_matches_transformers(written, n_prompt):
    model, folder = written
    ids = prompt(n_prompt)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prefill, past = out.logits[0].numpy(), out.past_key_values
        tokens, decoded = [int(prefill[-1].argmax())], []
        for _ in range(16):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            decoded.append(out.logits[0, -1].numpy())
            tokens.append(int(decoded[-1].argmax()))
    ckpt = open_checkpoint(folder)
    ref = ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=256)
    assert np.abs(ref.forward(ids, all_logits=True) - prefill).max() < 1e-4
    for token, theirs in zip(tokens, decoded):
        assert np.abs(ref.decode(token) - theirs).max() < 1e-4


def test_long_factors_matter(written):
    """The check above would pass with the short factors only if the switch changed nothing: it does."""
    _, folder = written
    ckpt = open_checkpoint(folder)
    ids = prompt(ORIGINAL_CONTEXT + 16)
    spec = ckpt.spec
    short_only = dict(spec.rope_scaling, long_factor=spec.rope_scaling["short_factor"])
    a = ReferenceDecoder(spec, ckpt.tensor, max_context=256).forward(ids)
    b = ReferenceDecoder(type(spec)(**{**spec.__dict__, "rope_scaling": short_only}), ckpt.tensor,
                         max_context=256).forward(ids)
    assert np.abs(a - b).max() > 1e-2


def test_4x_spelling_reads_identically(written, tmp_path):
    _, folder = written
    old_folder = tmp_path / "v4"
    shutil.copytree(folder, old_folder)
    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope["type"] = rope.pop("rope_type")  # Phi-3's own spelling
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    (old_folder / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(old_folder).spec == open_checkpoint(folder).spec


def test_original_context_defaults_as_transformers_phi3config(written, tmp_path):
    """Phi3Config's top-level original_max_position_embeddings defaults to 4096 and overrides the
    rope dict's: a config.json without it is read with 4096, as transformers reads it."""
    model, folder = written
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    config = json.loads((folder / "config.json").read_text())
    config.pop("original_max_position_embeddings", None)
    config["rope_parameters"]["original_max_position_embeddings"] = ORIGINAL_CONTEXT
    (bare / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(bare)
    spec = open_checkpoint(bare).spec
    assert spec.rope_scaling["original_max_position_embeddings"] == theirs.original_max_position_embeddings == 4096


def _transformers_on(artifact_folder: Path, model) -> torch.nn.Module:
    """``model``'s architecture with the weights ``artifact_folder`` stores (dequantized, fused back
    into qkv_proj / gate_up_proj as Phi-3 holds them)."""
    artifact = runtimes.artifact.load_artifact(artifact_folder)
    spec, weights = artifact.spec, ArtifactWeights(artifact)
    names = [n for n in spec.tensor_shapes() if not (n == spec.tensor_name("lm_head") and spec.tied_embeddings)]
    tensors = get_architecture(spec.architecture).fuse(spec, {n: weights(n) for n in names})
    clone = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    missing, unexpected = clone.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    clone.tie_weights()
    return clone


TARGETS = {
    "onnx-ort-fp32": dict(target="onnx", quant="fp32"),
    "onnx-portable-fp32": dict(target="onnx", variant="portable", quant="fp32"),
    "coreml-int8": dict(target="coreml", quant="int8"),
    "tensorrt-int4": dict(target="tensorrt", quant="int4"),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_generates_as_transformers(written, tmp_path, name):
    """Each target's artifact, run where it runs here, gives transformers' greedy tokens on the
    weights it stores: 24 tokens from a 56-token prompt, so decoding crosses the original context."""
    model, folder = written
    out = tmp_path / name
    export(str(folder), out, ExportOptions(max_context=128, verify=False, **TARGETS[name]))
    ids, n = prompt(ORIGINAL_CONTEXT - 8), 24
    theirs = transformers_greedy(_transformers_on(out, model), ids, n)
    ours = _greedy(out, name, ids, n)
    assert ours == theirs


# w8a16's uint16 activations move these random-weight logits by up to ~0.4 (measured: max |diff|
# 0.24-0.37 against the stored weights' reference), so a token whose top-2 margin is smaller is a tie
TIE_MARGIN = 0.5


def test_qnn_graphs_decode_as_transformers(written, tmp_path):
    """qnn's QDQ graphs on onnxruntime's CPU provider (static chunked prefill, then decode across the
    original context): fed transformers' greedy sequence, each step's argmax is transformers' token
    wherever transformers' own top-2 margin is beyond what uint16 activations move, and on at least
    80% of the steps in all (here 22 of 24: the two others are ties)."""
    model, folder = written
    out = tmp_path / "qnn"
    export(str(folder), out, ExportOptions(target="onnx", variant="qnn", quant="int8", max_context=128,
                                           verify=False))
    clone, ids, n = _transformers_on(out, model), prompt(ORIGINAL_CONTEXT - 8), 24
    tokens = transformers_greedy(clone, ids, n)
    with torch.no_grad():
        logits = clone(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:].numpy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > TIE_MARGIN
    backend = runtimes.load(out, provider="cpu").backend
    ours = [int(backend.prefill(ids).argmax())] + [int(backend.decode(t).argmax()) for t in tokens[:-1]]
    assert [o for o, c in zip(ours, clear) if c] == [t for t, c in zip(tokens, clear) if c]
    past_switch = ORIGINAL_CONTEXT - len(ids) + 1  # the first step whose sequence is past 64
    assert clear[past_switch:].sum() >= 4  # decisive steps on the long factors were checked
    assert np.mean(np.array(ours) == np.array(tokens)) >= 0.8


def test_generate_long_prompt_as_transformers_generate(written, tmp_path):
    """A prompt already past the original context: model.generate itself, token for token."""
    model, folder = written
    ids, n = prompt(ORIGINAL_CONTEXT + 8), 24
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                                pad_token_id=EOS)[0, len(ids):].tolist()
    out = tmp_path / "ort"
    export(str(folder), out, ExportOptions(quant="fp32", max_context=128, verify=False))
    assert runtimes.load(out).generate(ids, temperature=0.0, max_new_tokens=n, ignore_eos=True).tokens == theirs


def _greedy(folder: Path, name: str, ids: list[int], n: int) -> list[int]:
    if name.startswith("coreml"):
        from edge_export.targets.coreml_torch import TorchModuleBackend, verification_module
        rt = runtimes.load(folder, backend="reference")
        rt = runtimes.Runtime(rt.artifact, TorchModuleBackend(verification_module(rt.artifact), threads=1))
    else:
        rt = runtimes.load(folder)
    return rt.generate(ids, temperature=0.0, max_new_tokens=n, ignore_eos=True).tokens
