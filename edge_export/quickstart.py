"""`edge-export quickstart`: the main job end to end on the real SmolLM2-135M-Instruct.

Inspect the checkpoint, export it to int4 ONNX (its GGUF Q4_1 blocks carried exactly), verify
the artifact against the float reference, answer a question through the runtime, and benchmark
it on this host, estimate two devices from their spec sheets (the artifact on the engine that runs
it there, and the same model as TensorRT int4 on the Jetson's GPU), and write report.html. Each step
prints one line as it finishes; every estimate line gives its range, engine and calibration source.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

MODEL = "smollm2-135m"
QUESTION = "What is 2+3?"
ESTIMATED = ("snapdragon-8-elite", "jetson-orin-nano-super")
GPU_PROFILE, GPU_TARGET = "jetson-orin-nano-super", "tensorrt"


class _Steps:
    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.t0 = echo, time.perf_counter()

    def done(self, what: str) -> None:
        self.echo(f"[{time.perf_counter() - self.t0:6.1f}s] {what}")


def run_quickstart(out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Run every stage on smollm2-135m into folder ``out``; returns a summary dict."""
    import devices
    import runtimes

    from .export import ExportOptions, export
    from .inspect import describe

    steps, out = _Steps(echo), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = describe(MODEL)
    steps.done(f"inspected {MODEL}: {info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters, "
               f"{info['dtype']} GGUF, {info['bytes_on_disk'] / 2**20:.1f} MiB")
    artifact = out / "smollm2-135m-int4"
    manifest = export(MODEL, artifact, ExportOptions(quant="int4", overwrite=True))
    v = manifest["verification"]
    steps.done(f"exported int4 ONNX ({manifest['quantization']['method']}: GGUF blocks carried) to {artifact}, "
               f"{sum(f['bytes'] for f in manifest['files'].values()) / 2**20:.1f} MiB; verified against the float "
               f"reference: kl_mean {v['kl_mean']:.4f}, top1_agreement {v['top1_agreement']:.3f}")
    rt = runtimes.load(artifact)
    result = rt.generate(QUESTION, temperature=0.0, max_new_tokens=32)
    steps.done(f"answered {QUESTION!r}: {result.answer.strip()!r} ({result.decode_tok_s:.0f} tok/s)")
    bench = devices.bench(str(artifact), "host", runs=3, warmup=1, threads=2)
    (out / "bench_host.json").write_text(json.dumps(bench, indent=2))
    steps.done(f"benchmarked on this host (128 prompt + 128 new tokens, 2 threads, median of 3): TTFT "
               f"{bench['ttft_ms']:.0f} ms, decode {bench['decode_tok_s']:.0f} tok/s, peak RSS {bench['peak_rss_mb']:.0f} MB")
    paths = [out / "bench_host.json"]
    for profile in ESTIMATED:
        estimate = devices.bench(str(artifact), f"estimate:{profile}")
        paths.append(out / f"bench_{profile}.json")
        paths[-1].write_text(json.dumps(estimate, indent=2))
        steps.done(estimate_line(f"estimated on {profile}, this artifact", estimate))
    gpu = gpu_estimate(manifest)
    paths.append(out / f"bench_{GPU_PROFILE}_{GPU_TARGET}.json")
    paths[-1].write_text(json.dumps(gpu, indent=2))
    steps.done(estimate_line(f"estimated on {GPU_PROFILE}, as {GPU_TARGET} int4", gpu))
    from .report import write_report
    report = write_report([str(p) for p in paths], str(out / "report.html"))
    steps.done(f"wrote {report}")
    return {"inspect": info, "verification": v, "answer": result.answer, "bench": bench}


def estimate_line(what: str, estimate: dict) -> str:
    """One quickstart line: figures, their calibration ranges, the engine and where it is calibrated."""
    decode, ttft = estimate["decode_tok_s_range"], estimate["ttft_ms_range"]
    return (f"{what} (not measured): decode {estimate['decode_tok_s']:.0f} tok/s (range {decode[0]:.0f}-"
            f"{decode[1]:.0f}), TTFT {estimate['ttft_ms']:.0f} ms (range {ttft[0]:.0f}-{ttft[1]:.0f}); engine "
            f"{estimate['engine']}: {estimate['method']['engine_why']}; calibrated on published measurements "
            "(devices/CALIBRATION.md)")


def gpu_estimate(manifest: dict) -> dict:
    """The artifact's model as TensorRT int4 on the Jetson's GPU (its onnx/ort graph runs on the
    CPU there): what `plan` prices, as a bench result."""
    from devices.estimate import estimate_result
    from runtimes.models import ModelSpec

    from .plan import export_workload
    work = export_workload(ModelSpec.from_dict(manifest["model"]), "int4", GPU_TARGET)
    result = estimate_result(work, GPU_PROFILE, GPU_TARGET, max_context=manifest.get("max_context"))
    result.update(artifact=f"{MODEL} as {GPU_TARGET} int4 (planned)")
    return result
