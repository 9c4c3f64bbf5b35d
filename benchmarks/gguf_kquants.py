"""A Q4_K_M made by llama.cpp, exported with ``--method keep``: does it answer as llama.cpp does?

    python benchmarks/gguf_kquants.py [--questions 40] [--out benchmarks/results/gguf_q4km_smollm2.json]

1. The packaged SmolLM2-135M-Instruct Q4_1 GGUF written back as F32 and quantized to Q4_K_M by
   llama.cpp's own quantizer (llama-cpp-python's ``llama_model_quantize``). SmolLM2's width 576 is
   not a multiple of 256, so most tensors fall back to Q5_0 / Q8_0 and a few get Q4_K / Q6_K.
2. ``export --target onnx --method keep`` of that file at the default accuracy level (MatMulNBits
   with int8 activations, as llama.cpp's own K-quant dot products use); every tensor carried.
3. Greedy answers (up to 48 new tokens, stopping at EOS) to the built-in chat questions, the same
   prompt ids fed to the artifact (runtimes, onnxruntime) and to llama.cpp on the same GGUF.
   Identical: the same token ids up to EOS. Correct: the answer contains one of the question's
   expected strings (case-insensitive).

Writes the .json and, beside it, the .md table the README quotes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger("gguf_kquants")
MAX_NEW = 48
FLOOR = {"identical": 10, "correct_below_llama_cpp": 2}  # issue 13's floor on the 40 questions


def make_q4km(workdir: Path) -> Path:
    """SmolLM2's Q4_1 GGUF -> F32 GGUF -> llama.cpp Q4_K_M; returns the Q4_K_M path."""
    from edge_export.checkpoint.gguf_reader import smollm2_gguf_path
    from edge_export.checkpoint.gguf_requant import llama_cpp_quantize, write_float_copy
    f32 = write_float_copy(smollm2_gguf_path(), workdir / "smollm2-f32.gguf")
    out = llama_cpp_quantize(f32, workdir / "smollm2-q4_k_m.gguf", "Q4_K_M")
    f32.unlink()
    return out


def export_keep(gguf: Path, out: Path, threads: int = 2) -> dict:
    from edge_export.export import ExportOptions, export
    return export(str(gguf), str(out), ExportOptions(target="onnx", method="keep", verify=False, max_context=512,
                                                      threads=threads))


def llama_cpp_greedy(gguf: Path, prompts: list[list[int]], eos: set[int], threads: int = 2) -> list[list[int]]:
    """llama.cpp's greedy tokens (argmax of its logits) after each prompt, up to EOS or MAX_NEW."""
    import llama_cpp
    # logits_all: llama-cpp-python 0.3 fills `scores` only then (its own sampling reads the context directly)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_batch=512, logits_all=True,
                          verbose=False)
    answers = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        while len(out) < MAX_NEW and (not out or out[-1] not in eos):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if out[-1] not in eos and len(out) < MAX_NEW:
                llm.eval([out[-1]])
        answers.append(out)
    return answers


def artifact_greedy(artifact: Path, prompts: list[list[int]], threads: int = 2) -> list[list[int]]:
    import runtimes
    from runtimes.generate import Sampling
    rt = runtimes.load(artifact, threads=threads)
    return [rt.generator.generate(ids, Sampling(temperature=0.0, max_new_tokens=MAX_NEW)).tokens for ids in prompts]


def compare(gguf: Path, artifact: Path, questions: list[dict], threads: int = 2) -> dict:
    """Greedy answers of the artifact and of llama.cpp on ``gguf`` -> counts and per-question rows."""
    from edge_export.checkpoint.gguf_reader import GGUFCheckpoint
    ckpt = GGUFCheckpoint(gguf)
    eos = set(ckpt.spec.eos_token_ids) | set(ckpt.spec.generation.get("eos_token_ids", []))
    prompts = [ckpt.tokenizer.encode_chat(q["question"]) for q in questions]
    log.info("greedy answers of the artifact to %d questions", len(prompts))
    ours = artifact_greedy(artifact, prompts, threads)
    log.info("greedy answers of llama.cpp on %s", gguf.name)
    theirs = llama_cpp_greedy(gguf, prompts, eos, threads)

    def answer(tokens):  # up to EOS, without it (the Generator does not return it, llama.cpp's loop does)
        return [int(t) for t in tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]]

    def text(tokens):
        return ckpt.tokenizer.decode(answer(tokens), skip_special=True).strip()

    def correct(q, tokens):
        return any(s.lower() in text(tokens).lower() for s in q["answer_contains"])
    rows = [{"question": q["question"], "identical": answer(a) == answer(b), "correct": correct(q, a),
             "llama_cpp_correct": correct(q, b), "answer": text(a), "llama_cpp_answer": text(b),
             "tokens": answer(a), "llama_cpp_tokens": answer(b)} for q, a, b in zip(questions, ours, theirs)]
    return {"questions": len(rows), "identical": sum(r["identical"] for r in rows),
            "correct": sum(r["correct"] for r in rows), "llama_cpp_correct": sum(r["llama_cpp_correct"] for r in rows),
            "rows": rows}


def carried_census(manifest: dict, gguf: Path) -> list[dict]:
    """Per GGML type in the file: how many tensors, and how the export carried them."""
    records = manifest["quantization"]["tensors"]
    census: dict[str, Counter] = {}
    for record in records.values():
        census.setdefault(record.get("source_type", "?"), Counter())[record["source"]] += 1
    return [{"source_type": t, "tensors": sum(c.values()), "carried_as": dict(sorted(c.items()))}
            for t, c in sorted(census.items())]


def markdown(result: dict) -> str:
    lines = ["| GGUF type (llama.cpp Q4_K_M of SmolLM2) | tensors | how `--method keep` carried them |",
             "| --- | --- | --- |"]
    for row in result["census"]:
        how = ", ".join(f"{k} {v}" for k, v in row["carried_as"].items())
        lines.append(f"| {row['source_type']} | {row['tensors']} | {how} |")
    lines += ["", "| greedy answers, 48 tokens, onnx/ort accuracy level 4 vs llama.cpp | value |", "| --- | --- |",
              f"| identical to llama.cpp's | {result['identical']} / {result['questions']} |",
              f"| correct: edge-export artifact | {result['correct']} / {result['questions']} |",
              f"| correct: llama.cpp | {result['llama_cpp_correct']} / {result['questions']} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/gguf_q4km_smollm2.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from edge_export.evaluate import chat_questions
    import llama_cpp
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gguf = make_q4km(work)
        log.info("export --method keep of %s", gguf.name)
        manifest = export_keep(gguf, work / "artifact", args.threads)
        result = compare(gguf, work / "artifact", chat_questions()[:args.questions], args.threads)
    result.update(census=carried_census(manifest, gguf), llama_cpp_python=llama_cpp.__version__,
                  accuracy_level=4, max_new_tokens=MAX_NEW, floor=FLOOR,
                  seconds=round(time.perf_counter() - start, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
