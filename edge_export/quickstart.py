"""`edge-export quickstart`: the main job end to end on the real SmolLM2-135M-Instruct.

Each step prints one line as it finishes, so a newcomer sees what the toolkit does and how long
each part takes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

MODEL = "smollm2-135m"
QUESTION = "What is 2+3?"


class _Steps:
    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.t0 = echo, time.perf_counter()

    def done(self, what: str) -> None:
        self.echo(f"[{time.perf_counter() - self.t0:6.1f}s] {what}")


def run_quickstart(out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Run every stage that exists on smollm2-135m; returns a summary dict."""
    from runtimes.reference import ReferenceDecoder

    from .checkpoint import open_checkpoint
    from .inspect import describe

    steps = _Steps(echo)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = describe(MODEL)
    steps.done(f"inspected {MODEL}: {info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters, "
               f"{info['dtype']}, int4 export ≈ {info['weight_bytes']['int4'] / 2**20:.1f} MiB")
    ckpt = open_checkpoint(MODEL)
    decoder = ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=512)
    answer = greedy_answer(decoder, ckpt.tokenizer, QUESTION)
    steps.done(f"reference decoder (float32 numpy) answers {QUESTION!r}: {answer!r}")
    return {"inspect": info, "reference_answer": answer}


def greedy_answer(decoder, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of the reference decoder to one chat question (stops at an EOS)."""
    ids = tokenizer.encode_chat(question)
    stop = set(decoder.spec.eos_token_ids) | set(decoder.spec.generation.get("eos_token_ids", []))
    logits, new = decoder.prefill(ids), []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop:
            break
        new.append(token)
        logits = decoder.decode(token)
    return tokenizer.decode(new, skip_special=True).strip()
