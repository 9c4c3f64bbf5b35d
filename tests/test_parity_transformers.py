"""The toolkit held to transformers itself, on checkpoints transformers wrote.

The reference decoder and every export read the same ModelSpec, so agreeing with each other proves
nothing about how a config.json is read. Here transformers (the installed 5.x) builds each
registered architecture from a config, saves it with ``save_pretrained`` (so config.json is
spelled as transformers 5 spells it: ``rope_parameters``, ``dtype``), and:
- the reference decoder's logits match transformers' within 1e-4, on prefill and token by token;
- an fp32 ONNX export, run through ``runtimes``, produces ``model.generate``'s greedy tokens;
- the same checkpoint with its config rewritten in the 4.x spelling (``rope_theta`` +
  ``rope_scaling``, ``torch_dtype``) reads to the same ModelSpec and the same logits.

The matrix (architecture x rope type x tied head x head_dim x storage) is covered pairwise, not
as a full product. Prompts are longer than the tiny ``original_max_position_embeddings`` (64), so
the scaled rope types are exercised past their original context.
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import runtimes
from edge_export.checkpoint import open_checkpoint
from edge_export.export import ExportOptions, export
from runtimes.reference import ReferenceDecoder

from .conftest import SMALL_VOCAB, write_small_tokenizer

ORIGINAL_CONTEXT = 64
THETA = 50_000.0  # not any architecture's default, so a theta read from the wrong key shows
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL_CONTEXT},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT},
}
ARCHS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
STORAGE = ("bfloat16", "float16", "float32-sharded")
EOS = SMALL_VOCAB - 5


@dataclass(frozen=True)
class Case:
    arch: str
    rope: str
    tied: bool
    wide_heads: bool  # head_dim 32 != hidden_size / num_attention_heads (16)
    storage: str

    @property
    def id(self) -> str:
        return (f"{self.arch}-{self.rope}-{'tied' if self.tied else 'untied'}-"
                f"{'hd32' if self.wide_heads else 'hd16'}-{self.storage}")


def pairwise_cases() -> list[Case]:
    """Every architecture x rope pair once; tied, head_dim and storage assigned so that every pair
    of values of any two factors occurs in some case (checked by test_matrix_is_pairwise)."""
    cases = []
    for a, arch in enumerate(ARCHS):
        for r, rope in enumerate(ROPES):
            cases.append(Case(arch, rope, tied=(a + r) % 2 == 1, wide_heads=(a + r // 2) % 2 == 1,
                              storage=STORAGE[(a + r) % 3]))
    return cases


CASES = pairwise_cases()


def test_matrix_is_pairwise():
    factors = {"arch": list(ARCHS), "rope": list(ROPES), "tied": [False, True], "wide_heads": [False, True],
               "storage": list(STORAGE)}
    for f1, f2 in itertools.combinations(factors, 2):
        seen = {(getattr(c, f1), getattr(c, f2)) for c in CASES}
        assert seen == set(itertools.product(factors[f1], factors[f2])), (f1, f2)


def hf_config(case: Case):
    head_dim = 32 if case.wide_heads else 16
    rope = dict(ROPES[case.rope] or {"rope_type": "default"}, rope_theta=THETA)
    return ARCHS[case.arch](
        vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
        rope_parameters=rope, tie_word_embeddings=case.tied, rms_norm_eps=1e-5,
        bos_token_id=SMALL_VOCAB - 6, eos_token_id=EOS)


def build_model(case: Case, seed: int = 0):
    """A random transformers model whose greedy tokens are decisive: weights ~ N(0, 0.2), norms ~ 1."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(case), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def save(model, case: Case, folder: Path) -> Path:
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(case.storage, torch.float32)
    model.to(dtype).save_pretrained(folder, max_shard_size="100KB" if case.storage.endswith("sharded") else "5GB")
    write_small_tokenizer(folder)
    return folder


def to_4x_spelling(folder: Path, out: Path) -> Path:
    """The same checkpoint with config.json as transformers 4.x wrote it."""
    shutil.copytree(folder, out)
    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    config["torch_dtype"] = config.pop("dtype")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def written(request, tmp_path_factory):
    """(case, the float32 transformers model as loaded back from disk, the checkpoint folder)."""
    case = request.param
    folder = save(build_model(case), case, tmp_path_factory.mktemp(case.id))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return case, loaded, folder


def prompt(n: int = ORIGINAL_CONTEXT + 16, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, SMALL_VOCAB - 8, n).tolist()


def transformers_logits(model, ids: list[int], steps: int) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Prefill logits [T, vocab], then ``steps`` greedy decode steps' logits, each fed one token."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prefill, past = out.logits[0].numpy(), out.past_key_values
        tokens, decoded = [int(prefill[-1].argmax())], []
        for _ in range(steps):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            decoded.append(out.logits[0, -1].numpy())
            tokens.append(int(decoded[-1].argmax()))
    return prefill, decoded, tokens


def test_config_is_read_without_unknown_keys(written, caplog):
    case, _, folder = written
    with caplog.at_level(logging.WARNING):
        spec = open_checkpoint(folder).spec
    assert not [r for r in caplog.records if "not known" in r.getMessage()]
    assert spec.rope_theta == THETA
    assert spec.tied_embeddings == case.tied
    assert spec.head_dim == (32 if case.wide_heads else 16)
    assert (spec.rope_scaling or {}).get("rope_type", "default") == case.rope


def test_reference_matches_transformers(written):
    case, model, folder = written
    ids = prompt()
    prefill, decoded, tokens = transformers_logits(model, ids, steps=8)
    ckpt = open_checkpoint(folder)
    ref = ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=256)
    ours = ref.forward(ids, all_logits=True)
    assert np.abs(ours - prefill).max() < 1e-4
    for token, theirs in zip(tokens, decoded):
        assert np.abs(ref.decode(token) - theirs).max() < 1e-4


def test_4x_spelling_reads_identically(written, tmp_path):
    case, _, folder = written
    old = open_checkpoint(to_4x_spelling(folder, tmp_path / "v4"))
    new = open_checkpoint(folder)
    assert old.spec == new.spec
    ids = prompt(ORIGINAL_CONTEXT + 8)
    a = ReferenceDecoder(new.spec, new.tensor, max_context=128).forward(ids, all_logits=True)
    b = ReferenceDecoder(old.spec, old.tensor, max_context=128).forward(ids, all_logits=True)
    np.testing.assert_array_equal(a, b)


def test_fp32_onnx_export_generates_as_transformers(written, tmp_path):
    case, model, folder = written
    ids = prompt()
    new_tokens = 24
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=EOS, pad_token_id=EOS)[0, len(ids):].tolist()
    out = tmp_path / "onnx"
    export(str(folder), out, ExportOptions(quant="fp32", max_context=256, verify=False))
    result = runtimes.load(out).generate(ids, temperature=0.0, max_new_tokens=new_tokens)
    assert result.tokens == theirs
