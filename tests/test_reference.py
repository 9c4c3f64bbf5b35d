"""The numpy reference decoder against transformers' logits, per architecture (tolerance 1e-4)."""
import numpy as np
import pytest

from edge_export.checkpoint import open_checkpoint
from runtimes.reference import ReferenceDecoder

torch = pytest.importorskip("torch", reason="transformers comparison needs torch (test-only dependency)")
transformers = pytest.importorskip("transformers")


def test_reference_matches_transformers(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    ids = np.random.default_rng(1).integers(0, ckpt.spec.vocab_size, 24)
    decoder = ReferenceDecoder(ckpt.spec, ckpt.tensor)
    decoder.reset()
    prefill = decoder.forward(ids[:16], all_logits=True)
    steps = np.stack([decoder.decode(int(t)) for t in ids[16:]])  # one token at a time through the KV cache
    ours = np.concatenate([prefill, steps])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        theirs = model(torch.tensor(ids[None])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 1e-4


def test_context_overflow_is_clear(tiny_llama):
    from runtimes.errors import ContextOverflowError
    ckpt = open_checkpoint(tiny_llama)
    decoder = ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=8)
    with pytest.raises(ContextOverflowError, match="do not fit the context of 8"):
        decoder.prefill(list(range(9)))
