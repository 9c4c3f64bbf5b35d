"""The Core ML target on SmolLM2-135M-Instruct, measured off macOS.

    python3 benchmarks/coreml_check.py --out benchmarks/results/coreml_smollm2.json

`--target coreml --quant int4` (the GGUF's Q4_1 blocks carried; embedding Q8_0) with the export's
own verification: the converted torch module built from weight.bin against the float GGUF over
the built-in prompts (kl_mean, top1_agreement). Then the same module against the `reference`
backend on the very same weights over --prompts prompts x --steps greedy steps (KL of the
reference's distribution to the module's, top-1): what fp16 compute and cache change. Also the
program's op counts, weight.bin and artifact sizes, the export's wall time and this process's
peak RSS (VmHWM; the export holds the model in float32 while it traces).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CONSTEXPR = "constexpr_blockwise_shift_scale"
PROMPTS = ["What is the boiling point of water at sea level in Celsius?", "How do I reverse a string in Python?",
           "Name three primary colors.", "What is 12 times 12?", "Why is the sky blue?"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max())
    return z / z.sum()


def module_vs_reference(folder: Path, max_context: int, prompts: int, steps: int) -> dict:
    """KL(reference || converted module) and top-1 agreement, greedy on the reference's tokens."""
    import runtimes
    from edge_export.targets.coreml_torch import CoreMLDecoder, TorchModuleBackend
    from runtimes.artifact import load_artifact
    from runtimes.weights import ArtifactWeights
    artifact = load_artifact(folder)
    module = TorchModuleBackend(CoreMLDecoder(artifact.spec, ArtifactWeights(artifact), max_context), threads=2)
    reference = runtimes.load(folder, backend="reference")
    kls, agree = [], []
    for prompt in PROMPTS[:prompts]:
        ids = reference.prompt_ids(prompt)
        a, b = module.prefill(ids), reference.backend.prefill(ids)
        for _ in range(steps):
            pa, pb = softmax(a), softmax(b)
            kls.append(float((pb * (np.log(pb) - np.log(pa))).sum()))
            agree.append(bool(a.argmax() == b.argmax()))
            token = int(b.argmax())
            a, b = module.decode(token), reference.backend.decode(token)
    return {"prompts": prompts, "steps": steps, "kl_mean": float(np.mean(kls)), "top1_agreement": float(np.mean(agree))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default="/tmp/edge-bench-coreml/smollm2-int4")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--verify-prompts", type=int, default=0, help="verify on the first N built-in prompts (0: all)")
    ap.add_argument("--out", default="benchmarks/results/coreml_smollm2.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2_artifacts import first_prompts
    from devices.protocol import peak_rss_mb
    from edge_export.export import ExportOptions, export
    t = time.perf_counter()
    manifest = export("smollm2-135m", args.artifact, ExportOptions(target="coreml", quant="int4", overwrite=True,
                                                                   max_context=args.max_context, threads=2,
                                                                   prompts=first_prompts(args.verify_prompts,
                                                                                         Path(args.artifact).parent)))
    seconds = time.perf_counter() - t
    files = manifest["files"]
    weight_bin = next(f["bytes"] for n, f in files.items() if n.endswith("weight.bin"))
    ops = manifest["graph"]["ops"]
    v = manifest["verification"]
    result = {
        "model": "smollm2-135m", "quant": "int4", "max_context": args.max_context,
        "export_s": round(seconds, 1), "export_peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "verification": {k: v[k] for k in ("kl_mean", "top1_agreement", "prompts", "positions", "verified_with")},
        "ops": {"constexpr_blockwise_shift_scale": ops.get(CONSTEXPR, 0), "linear": ops.get("linear", 0)},
        "weight_bin_mib": round(weight_bin / 2**20, 1),
        "artifact_mib": round(sum(f["bytes"] for f in files.values()) / 2**20, 1),
    }
    print(json.dumps(result), file=sys.stderr, flush=True)
    result["module_vs_reference_backend"] = module_vs_reference(Path(args.artifact), args.max_context,
                                                                args.prompts, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
