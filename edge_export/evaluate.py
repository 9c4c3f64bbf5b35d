"""`edge-export eval`: a quantized checkpoint or an exported artifact against the original.

A candidate is either an artifact folder (run through its runtime backend) or a checkpoint with a
quantization scheme applied (its dequantized weights run through the reference decoder).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import open_checkpoint
from .verify import (N_NEW, FixedReference, LayerMajorScorer, RuntimeScorer, compare, data_file, encode_prompts,
                     heldout_ids, load_prompts, perplexity)

ANSWER_TOKENS = 24


def candidate_scorer(candidate: str, reference_ckpt, options):
    """(scorer, description) for an artifact folder or a checkpoint + ``options`` (ExportOptions)."""
    if (Path(candidate) / "edge_manifest.json").is_file():
        import runtimes
        rt = runtimes.load(candidate, threads=options.threads)
        return RuntimeScorer(rt.backend), {"artifact": str(candidate), "backend": rt.backend.name,
                                           "model_bytes": rt.artifact.model_bytes}
    from .calibration import calibration_ids
    from .export import quant_rules, resolve_method
    from .quantize import QuantizedWeights
    ckpt = reference_ckpt if candidate == str(reference_ckpt.path) else open_checkpoint(candidate)
    options = resolve_method(options, ckpt)
    calibration = calibration_ids(ckpt.tokenizer, options.calibration) if options.method in ("awq", "gptq") else None
    weights = QuantizedWeights(ckpt, quant_rules(options), calibration)
    held = {name: weights.dequantized(name) for name in ckpt.spec.tensor_shapes()}
    return LayerMajorScorer(ckpt.spec, held.__getitem__, hold=False), {
        "checkpoint": str(candidate), "quant": options.quant, "method": options.method,
        "group_size": options.group_size, "weight_bytes": _stored_bytes(weights, ckpt)}


def _stored_bytes(weights, ckpt) -> int:
    from quantizers import scheme_from_dict

    from .sizing import tensor_bytes
    total = 0
    for name, shape in ckpt.spec.tensor_shapes().items():
        record = weights.records.get(name)
        config = scheme_from_dict(record.scheme) if record and record.scheme else None
        total += tensor_bytes(shape, config, 4)
        if record and record.source == "decomposed":  # a GGUF minimum's per-group float residual
            total += shape[0] * (shape[-1] // (record.scheme.get("group_size") or 32)) * 4
    return total


@dataclass
class ReferencePass:
    """What the reference computes once, however many candidates are compared with it."""
    prompt_ids: list
    tokens: list
    logprobs: list
    ppl: float | None = None
    question_ids: list | None = None
    question_tokens: list | None = None


def reference_pass(ref_ckpt, prompts: str | None = None, ppl: bool = True, questions: bool = False) -> ReferencePass:
    ids = encode_prompts(ref_ckpt.tokenizer, load_prompts(prompts))
    ref = LayerMajorScorer(ref_ckpt.spec, ref_ckpt.tensor)
    tokens, logprobs = ref.greedy(ids, N_NEW)
    result = ReferencePass(ids, tokens, logprobs)
    if ppl:
        result.ppl = perplexity(ref, heldout_ids(ref_ckpt.tokenizer))
    if questions:
        result.question_ids = [ref_ckpt.tokenizer.encode_chat(item["question"]) for item in chat_questions()]
        result.question_tokens, _ = ref.greedy(result.question_ids, ANSWER_TOKENS)
    return result


def evaluate(candidate: str, reference: str, options, prompts: str | None = None, ppl: bool = True,
             questions: bool = False, ref: ReferencePass | None = None) -> dict:
    """All figures of verify.py for ``candidate`` against ``reference``; a JSON-ready dict.
    ``ref`` reuses a reference pass computed earlier for the same reference and prompts."""
    ref_ckpt = open_checkpoint(reference)
    ref = ref or reference_pass(ref_ckpt, prompts, ppl, questions)
    scorer, about = candidate_scorer(candidate, ref_ckpt, options)
    figures = compare(FixedReference(ref.tokens, ref.logprobs), scorer, ref.prompt_ids)
    if ppl:
        figures.ppl = perplexity(scorer, heldout_ids(ref_ckpt.tokenizer))
        figures.ppl_reference = ref.ppl
    out = {"candidate": about, "reference": str(ref_ckpt.path), **figures.to_dict()}
    if questions:
        out["same_answers"] = same_answers(ref, scorer, ref_ckpt)
    return out


def chat_questions() -> list[dict]:
    lines = data_file("chat_questions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def same_answers(ref: ReferencePass, scorer, ckpt) -> dict:
    """How many short chat questions the candidate answers exactly as the reference (greedy)."""
    items = chat_questions()
    eos = set(ckpt.spec.eos_token_ids) | set(ckpt.spec.generation.get("eos_token_ids", []))
    cand_tokens, _ = scorer.greedy(ref.question_ids, ANSWER_TOKENS)

    def answer(tokens):
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return ckpt.tokenizer.decode(tokens[:cut], skip_special=True).strip()
    same = [answer(a) == answer(b) for a, b in zip(ref.question_tokens, cand_tokens)]
    return {"same": int(np.sum(same)), "of": len(same),
            "examples": [{"question": it["question"], "reference": answer(a), "candidate": answer(b)}
                         for it, a, b in list(zip(items, ref.question_tokens, cand_tokens))[:3]]}
