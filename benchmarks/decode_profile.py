"""Where a decode step's time goes: onnxruntime's own profiler over one 128 + 128 generation.

    python3 benchmarks/decode_profile.py --out benchmarks/results/decode_profile_smollm2.json

For SmolLM2-135M int4 `keep` with a float32 cache and with `--kv-cache int8` (benchmarks/
smollm2_artifacts.py; GroupQueryAttention's cost does not depend on the weights' layout), the
protocol's 128-token prompt and 128 greedy tokens on 2 threads, KV buffer sized to the generation
as the runtime does. The machine is shared, so the generation runs --repeats times and each node's
time at each step is the minimum over the repeats (what it takes when nothing else runs). From
those per-node kernel times over the decode steps:

- GroupQueryAttention: all nodes of one step summed (median over steps, ms), and a least-squares
  line through every node's time against the number of positions already cached: a fixed cost
  per node (µs) plus a cost per cached position (ns);
- MatMulNBits: each node's weight bytes (codes, scales, zero points) over its median time, GB/s,
  summarized for the attention projections (q/k/v, o) and for the MLP's (gate/up, down).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_artifacts import ensure  # noqa: E402

LAYOUTS = {"float32 cache": "keep", "int8 cache": "keep-kv8"}
ITEM_BYTES = {onnx.TensorProto.UINT8: 1, onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT8: 1}


def profiled_generation(folder: Path, prompt_tokens: int, new_tokens: int, threads: int, repeats: int) -> str:
    """Run one warm-up and ``repeats`` generations under the profiler; the profile file's path."""
    import runtimes
    import runtimes.backends.onnxruntime as ortb
    from devices.protocol import prompt_ids
    from runtimes import Sampling
    plain = ortb.session_options

    def profiling_options(n):
        options = plain(n)
        options.enable_profiling = True
        options.profile_file_prefix = str(folder.parent / f"profile-{folder.name}")
        return options
    ortb.session_options = profiling_options
    try:
        rt = runtimes.load(folder, threads=threads)
    finally:
        ortb.session_options = plain
    ids = prompt_ids(lambda text: rt.tokenizer.encode(text, add_bos=False), prompt_tokens)
    sampling = Sampling(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    for _ in range(1 + repeats):
        rt.generator.generate(ids, sampling)
    return rt.backend.session.end_profiling()


def weight_bytes(model_path: Path) -> dict[str, int]:
    """MatMulNBits node name -> bytes of its constant inputs (codes, scales, zero points)."""
    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * ITEM_BYTES.get(t.data_type, 4) for t in model.graph.initializer}
    return {n.name: sum(sizes.get(i, 0) for i in n.input[1:]) for n in model.graph.node if n.op_type == "MatMulNBits"}


def decode_events(profile: list[dict], prompt_tokens: int, new_tokens: int, repeats: int) -> list[tuple[int, list[dict]]]:
    """(positions cached before the step, node events) for each decode step, each node's time the
    minimum over the last ``repeats`` generations (one prefill run, then new_tokens - 1 decode runs)."""
    runs = [e for e in profile if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = sorted((e for e in profile if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    starts = np.array([e["ts"] for e in nodes])
    generations = [runs[len(runs) - (g + 1) * new_tokens:len(runs) - g * new_tokens] for g in range(repeats)]
    best: dict[tuple[int, str], dict] = {}
    for generation in generations:
        for i, run in enumerate(generation[1:]):
            lo, hi = np.searchsorted(starts, [run["ts"], run["ts"] + run["dur"]], side="left")
            for e in nodes[lo:hi]:
                key = (i, e["name"])
                if key not in best or e["dur"] < best[key]["dur"]:
                    best[key] = e
    steps = [[] for _ in range(new_tokens - 1)]
    for (i, _), e in best.items():
        steps[i].append(e)
    return [(prompt_tokens + i, ev) for i, ev in enumerate(steps)]


def gqa_figures(steps) -> dict:
    per_step = [sum(e["dur"] for e in ev if e["args"].get("op_name") == "GroupQueryAttention") for _, ev in steps]
    points = [(pos, e["dur"]) for pos, ev in steps for e in ev if e["args"].get("op_name") == "GroupQueryAttention"]
    x, y = np.array([p for p, _ in points], float), np.array([d for _, d in points], float)
    slope, fixed = np.polyfit(x, y, 1)
    nodes = len(points) // len(steps)
    return {"nodes": nodes, "per_step_ms": round(statistics.median(per_step) / 1000, 3),
            "fixed_us_per_node": round(float(fixed), 1), "ns_per_cached_position": round(float(slope) * 1000, 1),
            "all_nodes_per_step_ms": round(statistics.median(sum(e["dur"] for e in ev) for _, ev in steps) / 1000, 3)}


def matmul_figures(steps, sizes: dict[str, int]) -> dict:
    times: dict[str, list[float]] = {}
    for _, ev in steps:
        for e in ev:
            if e["args"].get("op_name") == "MatMulNBits":
                times.setdefault(e["name"][:-len("_kernel_time")], []).append(e["dur"])
    groups: dict[str, list[float]] = {"attention_qkv_o": [], "mlp_gate_up_down": []}
    for name, durs in times.items():
        if name not in sizes or "lm_head" in name:
            continue
        gbs = sizes[name] / (statistics.median(durs) * 1e-6) / 1e9
        groups["mlp_gate_up_down" if "mlp" in name else "attention_qkv_o"].append(gbs)
    return {g: {"min_gbs": round(min(v), 1), "median_gbs": round(statistics.median(v), 1), "max_gbs": round(max(v), 1),
                "nodes": len(v)} for g, v in groups.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="/tmp/edge-bench-artifacts")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="profiled generations; each node's minimum is kept")
    ap.add_argument("--out", default="benchmarks/results/decode_profile_smollm2.json")
    args = ap.parse_args()
    import onnxruntime
    result = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
              "repeats": args.repeats,
              "onnxruntime": onnxruntime.__version__, "layouts": {}}
    for cache, label in LAYOUTS.items():
        folder = ensure(label, args.artifacts)
        path = profiled_generation(folder, args.prompt_tokens, args.new_tokens, args.threads, args.repeats)
        steps = decode_events(json.loads(Path(path).read_text()), args.prompt_tokens, args.new_tokens, args.repeats)
        sizes = weight_bytes(folder / json.loads((folder / "edge_manifest.json").read_text())["graph"]["file"])
        result["layouts"][cache] = {"artifact": label, "group_query_attention": gqa_figures(steps),
                                    "matmulnbits": matmul_figures(steps, sizes)}
        Path(path).unlink()
        print(json.dumps(result["layouts"][cache]), file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
