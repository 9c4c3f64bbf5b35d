"""The qnn variant on SmolLM2-135M-Instruct: w8a16 and w4a16, on the HTP simulator that
onnxruntime-qnn ships for Linux x86_64 and on onnxruntime's CPU provider.

    python3 benchmarks/qnn_check.py --out benchmarks/results/qnn_smollm2.json

Per quant: the export (calibration included, `--no-verify`), the artifact's size; then the `qnn`
backend on the HTP (CPU fallback disabled): session load time, nodes per execution provider, and
teacher-forced KL / top-1 against the float reference on the first --prompts built-in prompts x
--tokens of the reference's greedy tokens, with the simulated prefill-chunk and decode-step
times; and the same graphs and tokens on onnxruntime's CPU provider (what an export verifies with
off a Snapdragon). Writes the JSON and the README's table (.md) beside it.

The workload is trimmed to fit a shared 2-core machine: the simulator takes seconds per decode step
(about 5 s for SmolLM2), so the default is the first built-in prompt x 8 reference tokens (one
prefill chunk and 7 decode steps per quant), and the KL / top-1 on the HTP rest on 8 positions.
The JSON records the prompts, tokens and the run's wall time; the 24-prompt verification an export
runs is too long for the simulator.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

QUANTS = {"w8a16": "int8", "w4a16": "int4"}


def export_one(quant: str, folder: Path, context: int) -> tuple[dict, float]:
    from edge_export.export import ExportOptions, export
    t = time.perf_counter()
    manifest = export("smollm2-135m", folder, ExportOptions(target="onnx", variant="qnn", quant=quant,
                                                            max_context=context, overwrite=True, threads=2,
                                                            verify=False))
    return manifest, time.perf_counter() - t


def reference_tokens(prompts: int, tokens: int):
    """The float reference's greedy tokens and log-probs on the first ``prompts`` built-in prompts."""
    from edge_export.checkpoint import open_checkpoint
    from edge_export.verify import LayerMajorScorer, encode_prompts, load_prompts
    ckpt = open_checkpoint("smollm2-135m")
    ids = encode_prompts(ckpt.tokenizer, load_prompts(None))[:prompts]
    toks, logprobs = LayerMajorScorer(ckpt.spec, ckpt.tensor).greedy(ids, tokens)
    return ids, toks, logprobs


class Timed:
    """A backend whose prefill and decode calls are timed (seconds)."""

    def __init__(self, backend):
        self.backend, self.prefill_s, self.decode_s = backend, [], []

    def prefill(self, ids):
        t = time.perf_counter()
        out = self.backend.prefill(ids)
        self.prefill_s.append((time.perf_counter() - t, len(ids)))
        return out

    def decode(self, token):
        t = time.perf_counter()
        out = self.backend.decode(token)
        self.decode_s.append(time.perf_counter() - t)
        return out


def teacher_forced(backend, ref) -> tuple[float, float]:
    """kl_mean and top-1 agreement of ``backend`` on the reference's greedy tokens."""
    from edge_export.verify import RuntimeScorer
    ids, toks, logprobs = ref
    kls, agree = [], []
    for p, tokens, rl in zip(ids, toks, logprobs):
        cl = RuntimeScorer(backend).teacher_forced([p], [tokens])[0]
        kls.extend((np.exp(rl.astype(np.float64)) * (rl - cl)).sum(axis=-1))
        agree.extend(rl.argmax(-1) == cl.argmax(-1))
    return round(float(np.mean(kls)), 3), round(float(np.mean(agree)), 3)


def on_cpu(folder: Path, ref) -> dict:
    import runtimes
    rt = runtimes.load(folder, provider="cpu", threads=2)
    kl, top1 = teacher_forced(rt.backend, ref)
    return {"kl_mean": kl, "top1_agreement": top1}


def on_htp(folder: Path, ref) -> dict:
    import onnx

    import runtimes
    t = time.perf_counter()
    rt = runtimes.load(folder, threads=2)
    load_s = time.perf_counter() - t
    graph = rt.artifact.manifest["graph"]
    nodes = {name: len(onnx.load(str(rt.artifact.file(graph[name]["file"])), load_external_data=False).graph.node)
             for name in ("prefill", "decode")}
    timed = Timed(rt.backend)
    kl, top1 = teacher_forced(timed, ref)
    ids, toks = ref[0], ref[1]
    chunk = graph["prefill"]["seq_len"]
    chunks = [s / max(1, -(-n // chunk)) for s, n in timed.prefill_s]
    return {"backend": rt.backend.name, "session_load_s": round(load_s, 1), "ep_assignment": rt.backend.ep_assignment(),
            "graph_nodes": nodes, "prompts": len(ids), "tokens": len(toks[0]), "kl_mean": kl, "top1_agreement": top1, "prefill_chunk_tokens": chunk,
            "prefill_chunk_s": round(statistics.median(chunks), 1), "decode_step_s": round(statistics.median(timed.decode_s), 1),
            # what one simulated decode step gets through: every weight once
            "weights_per_s_millions": round(rt.artifact.spec.parameter_count / statistics.median(timed.decode_s) / 1e6, 1)}


def markdown(result: dict) -> str:
    q = result["quants"]
    names = list(q)
    h = result["htp_prompts"], result["htp_tokens"]

    def row(label, fn):
        return f"| {label} | " + " | ".join(fn(q[n]) for n in names) + " |"

    def on_qnn(r):  # nodes as the session partitioned them (onnxruntime's QDQ handling changes the count)
        counts = r["htp"]["ep_assignment"]
        return " + ".join(f"{counts[g].get('QNNExecutionProvider', 0)} / {sum(counts[g].values())}" for g in counts)
    return "\n".join([
        "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names),
        row("nodes on the HTP / all nodes, prefill + decode graph (CPU fallback disabled)", on_qnn),
        row(f"on the HTP: first {h[0]} built-in prompt{'s' * (h[0] > 1)} × {h[1]} tokens, KL, top-1",
            lambda r: f"{r['htp']['kl_mean']:.3f}, {r['htp']['top1_agreement']:.3f}"),
        row("same graphs and tokens on onnxruntime's CPU provider, KL, top-1",
            lambda r: f"{r['cpu']['kl_mean']:.3f}, {r['cpu']['top1_agreement']:.3f}"),
        row("artifact", lambda r: f"{r['artifact_mb']:.0f} MB"),
        row("export (calibration included, `--no-verify`) / session load on the HTP",
            lambda r: f"{r['export_s']:.0f} s / {r['htp']['session_load_s']:.0f} s"),
        row("simulated prefill chunk (64 tokens) / decode step",
            lambda r: f"{r['htp']['prefill_chunk_s']:.1f} s / {r['htp']['decode_step_s']:.1f} s"),
    ]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="/tmp/edge-bench-qnn")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=1, help="built-in prompts run on the HTP simulator")
    ap.add_argument("--tokens", type=int, default=8, help="reference tokens per prompt on the HTP simulator")
    ap.add_argument("--out", default="benchmarks/results/qnn_smollm2.json")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the --out JSON, run nothing")
    args = ap.parse_args()
    if args.markdown_only:
        Path(args.out).with_suffix(".md").write_text(markdown(json.loads(Path(args.out).read_text())))
        return
    import onnxruntime_qnn
    start = time.perf_counter()
    ref = reference_tokens(args.prompts, args.tokens)
    result = {"model": "smollm2-135m", "max_context": args.context, "htp_prompts": args.prompts,
              "htp_tokens": args.tokens, "onnxruntime_qnn": getattr(onnxruntime_qnn, "__version__", "?"), "quants": {}}
    for name, quant in QUANTS.items():
        folder = Path(args.artifacts) / name
        manifest, seconds = export_one(quant, folder, args.context)
        row = {"quant": quant, "export_s": round(seconds, 1),
               "artifact_mb": round(sum(f["bytes"] for f in manifest["files"].values()) / 1e6, 1),
               "cpu": on_cpu(folder, ref)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        row["htp"] = on_htp(folder, ref)
        print(json.dumps(row["htp"]), file=sys.stderr, flush=True)
        result["quants"][name] = row
        result["wall_s"] = round(time.perf_counter() - start)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
