"""`edge-export eval`: a quantized checkpoint or an exported artifact against the original.

A candidate is either an artifact folder (run through its runtime backend) or a checkpoint with a
quantization scheme applied (its dequantized weights run through the reference decoder).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import open_checkpoint
from .verify import (LayerMajorScorer, RuntimeScorer, compare, data_file, encode_prompts, heldout_ids, load_prompts,
                     perplexity)


def candidate_scorer(candidate: str, reference_ckpt, options):
    """(scorer, description) for an artifact folder or a checkpoint + ``options`` (ExportOptions)."""
    if (Path(candidate) / "edge_manifest.json").is_file():
        import runtimes
        rt = runtimes.load(candidate, backend=options.backend if hasattr(options, "backend") else None,
                           threads=options.threads)
        return RuntimeScorer(rt.backend), {"artifact": str(candidate), "backend": rt.backend.name,
                                           "model_bytes": rt.artifact.model_bytes}
    from .export import calibration_ids, quant_rules
    from .quantize import QuantizedWeights
    from .export import resolve_method
    ckpt = reference_ckpt if candidate == str(reference_ckpt.path) else open_checkpoint(candidate)
    options = resolve_method(options, ckpt)
    calibration = calibration_ids(ckpt.tokenizer, options.calibration) if options.method in ("awq", "gptq") else None
    weights = QuantizedWeights(ckpt, quant_rules(options), calibration)
    held = {name: weights.dequantized(name) for name in ckpt.spec.tensor_shapes()}
    return LayerMajorScorer(ckpt.spec, held.__getitem__, hold=False), {
        "checkpoint": str(candidate), "quant": options.quant, "method": options.method,
        "group_size": options.group_size, "weight_bytes": _stored_bytes(weights, ckpt)}


def _stored_bytes(weights, ckpt) -> int:
    from .sizing import tensor_bytes
    from quantizers import scheme_from_dict
    total = 0
    for name, shape in ckpt.spec.tensor_shapes().items():
        record = weights.records.get(name)
        config = scheme_from_dict(record.scheme) if record and record.scheme else None
        total += tensor_bytes(shape, config, 4)
        if record and record.source == "decomposed":  # GGUF Q4_1's per-block float residual
            total += shape[0] * (shape[-1] // 32) * 4
    return total


def evaluate(candidate: str, reference: str, options, prompts: str | None = None, ppl: bool = True,
             questions: bool = False) -> dict:
    """All figures of verify.py for ``candidate`` against ``reference``; a JSON-ready dict."""
    ref_ckpt = open_checkpoint(reference)
    ids = encode_prompts(ref_ckpt.tokenizer, load_prompts(prompts))
    ref = LayerMajorScorer(ref_ckpt.spec, ref_ckpt.tensor)
    scorer, about = candidate_scorer(candidate, ref_ckpt, options)
    figures = compare(ref, scorer, ids)
    if ppl:
        text = heldout_ids(ref_ckpt.tokenizer)
        figures.ppl = perplexity(scorer, text)
        figures.ppl_reference = perplexity(ref, text)
    out = {"candidate": about, "reference": str(ref_ckpt.path), **figures.to_dict()}
    if questions:
        out["same_answers"] = same_answers(ref, scorer, ref_ckpt)
    return out


def same_answers(ref, scorer, ckpt, max_new: int = 24) -> dict:
    """How many short chat questions the candidate answers exactly as the reference (greedy)."""
    lines = data_file("chat_questions.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    prompts = [ckpt.tokenizer.encode_chat(item["question"]) for item in items]
    eos = set(ckpt.spec.eos_token_ids) | set(ckpt.spec.generation.get("eos_token_ids", []))
    ref_tokens, _ = ref.greedy(prompts, max_new)
    cand_tokens, _ = scorer.greedy(prompts, max_new)

    def answer(tokens):
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return ckpt.tokenizer.decode(tokens[:cut], skip_special=True).strip()
    same = [answer(a) == answer(b) for a, b in zip(ref_tokens, cand_tokens)]
    return {"same": int(np.sum(same)), "of": len(same),
            "examples": [{"question": it["question"], "reference": answer(a), "candidate": answer(b)}
                         for it, a, b in list(zip(items, ref_tokens, cand_tokens))[:3]]}
