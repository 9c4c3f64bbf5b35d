"""The reference decoder against llama.cpp on the same real GGUF: greedy answers, token for token.

The reference decoder runs the GGUF's dequantized weights in float32 numpy (its layers, with the
questions batched through each decode step as export verification runs them); llama.cpp
(llama-cpp-python) runs the same file with its own kernels (which quantize activations for its
quantized dot products, so a few answers drift apart after a near-tie). Both get the same prompt
ids (the model's chat template over each of the 40 built-in questions) and generate up to
``--new-tokens`` greedy tokens, stopping at end of sequence.

    python3 benchmarks/parity_llamacpp.py [--gguf smollm2-135m] [--new-tokens 48]

writes benchmarks/results/parity_llamacpp_smollm2.json: per question whether the answers are
identical, the first differing position, and both texts. tests/test_parity_llamacpp.py runs the
same comparison and asserts a floor under the count measured here.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


class LlamaCppGreedy:
    """Greedy decoding with llama.cpp on given prompt ids (no sampler, no template of its own)."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int = 2):
        import llama_cpp
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax_last(self) -> int:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def generate(self, ids: list[int], new_tokens: int, eos: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._argmax_last()]
        while len(out) < new_tokens and out[-1] not in eos:
            self.llm.eval([out[-1]])
            out.append(self._argmax_last())
        return out


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """A greedy continuation cut after its first end-of-sequence token."""
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
    return tokens[:end + 1]


def compare(gguf: str = "smollm2-135m", new_tokens: int = 48, limit: int | None = None) -> dict:
    """Greedy answers of the reference decoder and llama.cpp to the built-in chat questions."""
    from edge_export.checkpoint import open_checkpoint, resolve
    from edge_export.evaluate import chat_questions
    from edge_export.verify import LayerMajorScorer

    ckpt = open_checkpoint(gguf)
    eos = set(ckpt.spec.eos_token_ids)
    questions = chat_questions()[:limit]
    prompts = [ckpt.tokenizer.encode_chat(item["question"]) for item in questions]
    # the reference decoder's layers, all questions batched through each decode step (weights read once a step)
    greedy, _ = LayerMajorScorer(ckpt.spec, ckpt.tensor).greedy(prompts, new_tokens)
    llama = LlamaCppGreedy(resolve(gguf))
    rows = []
    for item, ids, tokens in zip(questions, prompts, greedy):
        ours, theirs = until_eos(tokens, eos), llama.generate(ids, new_tokens, eos)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                          None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
        rows.append({"question": item["question"], "identical": ours == theirs, "first_difference": first_diff,
                     "reference": ckpt.tokenizer.decode(ours), "llama_cpp": ckpt.tokenizer.decode(theirs)})
    return {"gguf": gguf, "new_tokens": new_tokens, "questions": len(rows),
            "identical": sum(r["identical"] for r in rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    start = time.perf_counter()
    result = compare(args.gguf, args.new_tokens)
    result["seconds"] = round(time.perf_counter() - start, 1)
    import llama_cpp
    result["llama_cpp_python"] = llama_cpp.__version__
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "parity_llamacpp_smollm2.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{result['identical']}/{result['questions']} identical greedy answers ({result['seconds']} s); wrote {path}")


if __name__ == "__main__":
    main()
