"""`python -m devices.runner ARTIFACT --json`: the benchmark in a process of its own.

The host runs it as a subprocess (so peak RSS is the runtime's alone, as for the peers) and a
remote device runs the very same module; it prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys

from .protocol import BENCH_OPTIONS, RUNNER_OPTIONS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="devices.runner")
    ap.add_argument("artifact")
    ap.add_argument("--backend")
    ap.add_argument("--provider")
    for name in RUNNER_OPTIONS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=BENCH_OPTIONS[name].default,
                        help=BENCH_OPTIONS[name].help)
    args = ap.parse_args(argv)
    import runtimes
    from runtimes.errors import EdgeError

    from .estimate import artifact_target
    from .protocol import run_protocol
    try:
        rt = runtimes.load(args.artifact, backend=args.backend, provider=args.provider, threads=args.threads)
        result = run_protocol(rt, args.prompt_tokens, args.new_tokens, args.runs, args.warmup, args.long_context)
    except EdgeError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    manifest = rt.artifact.manifest
    result.update(backend=rt.backend.name, threads=args.threads, model_bytes=rt.artifact.model_bytes,
                  artifact=rt.artifact.path.name, target=artifact_target(manifest),
                  quant=(manifest.get("quantization") or {}).get("quant"))
    engine = manifest.get("engine") or {}
    if engine.get("built") and rt.backend.name == "tensorrt":
        # what TensorRT really runs (engine inspector): an FP8 engine running FP16 GEMMs shows here
        result["engine_layers"] = engine.get("layers")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
