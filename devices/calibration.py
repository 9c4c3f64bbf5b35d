"""Published measurements the roofline estimator is calibrated on, and the ones it is tested on.

Each point is data: model, device profile, engine class, the weight layout's bits per weight,
the published figures and their source (../shared/DEVICES.md). ``used_for_calibration`` points
fit one decode efficiency (and one prefill rate) per engine class; the others are held out and
``tests/test_devices.py`` checks the estimator against them (within +-35%). A point with an
``excluded`` reason is neither: it is kept here so the reason stays visible.

The model dims are those of the published configs (devices may not import edge_export, so the
specs are written here): Llama-3.1-8B has R1-Distill-Llama-8B's dims, Qwen2.5-7B has
R1-Distill-Qwen-7B's.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtimes.models import ModelSpec

from .profiles import APPLE_GPU, CPU, JETSON_GPU, PHONE_NPU


def _llama(hidden, layers, heads, kv, head_dim, inter, tied=False) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", hidden, layers, heads, kv, head_dim, inter, 128256, rope_theta=500000.0,
                     tied_embeddings=tied)


def _qwen2(hidden, layers, heads, kv, inter, vocab) -> ModelSpec:
    return ModelSpec("Qwen2ForCausalLM", hidden, layers, heads, kv, 128, inter, vocab, attention_bias=True)


MODELS: dict[str, ModelSpec] = {
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 128, 14336),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 64, 8192, tied=True),
    "qwen2.5-7b": _qwen2(3584, 28, 28, 4, 18944, 152064),
    "r1-distill-qwen-1.5b": _qwen2(1536, 28, 12, 2, 8960, 151936),
}


@dataclass(frozen=True)
class PublishedPoint:
    """One published measurement.

    ``body_bits`` / ``head_bits``: stored bits per weight of the decoder layers / the output
    projection (scales included). ``decode_context``: tokens in the KV cache while decoding.
    ``ttft_ms`` with ``prompt_tokens``, or ``prefill_tok_s``: the published prefill figure, if any.
    """

    model: str
    device: str
    engine: str
    precision: str
    body_bits: float
    head_bits: float
    decode_tok_s: float
    decode_context: int
    source: str
    used_for_calibration: bool
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    prefill_tok_s: float | None = None
    note: str = ""
    excluded: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} on {self.device} ({self.engine}, {self.precision})"


AI_HUB = "quic/ai-hub-models perf.yaml (Qualcomm AI Hub)"
AI_HUB_BITS = "w4a16; per-block scale layout not published, 4.25 bits assumed"
AI_HUB_CONTEXT = "context 4096: the static-shape NPU graph reads the whole KV buffer each step"

POINTS: tuple[PublishedPoint, ...] = (
    PublishedPoint("llama-3.1-8b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 13.05, 4096, AI_HUB, True,
                   ttft_ms=155, prompt_tokens=128, note=f"{AI_HUB_BITS}; {AI_HUB_CONTEXT}"),
    PublishedPoint("llama-3.2-1b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 53.6, 4096, AI_HUB, True,
                   ttft_ms=37, prompt_tokens=128, note=f"{AI_HUB_BITS}; {AI_HUB_CONTEXT}"),
    PublishedPoint("qwen2.5-7b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 15.4, 4096, AI_HUB, False,
                   ttft_ms=136, prompt_tokens=128, note=f"{AI_HUB_BITS}; {AI_HUB_CONTEXT}"),
    PublishedPoint("qwen2.5-7b", "jetson-orin-nano-super", JETSON_GPU, "int4", 4.5, 4.5, 21.75, 256,
                   "NVIDIA-AI-IOT jetson-generative-ai-playground benchmarks (MLC)", True,
                   note="MLC q4f16_1: int4, group 32, fp16 scales; short context assumed"),
    PublishedPoint("llama-3.1-8b", "jetson-agx-thor", JETSON_GPU, "int4", 4.125, 16, 50.8, 256,
                   "TensorRT Edge-LLM perf page", False,
                   note="INT4 AWQ, group 128, fp16 scales; lm_head kept fp16 (ModelOpt's default excludes it, "
                        "assumed); short context assumed"),
    PublishedPoint("llama-3.1-8b", "apple-m1-max", APPLE_GPU, "int4", 4.5, 4.5, 33.67, 512,
                   "Apple ML research, 'On-device Llama 3.1 with Core ML'", True,
                   note="Core ML int4 block 32, fp16 scales, stateful KV, GPU; short context assumed; the post's "
                        "51.9 ms TTFT is not used (prompt length not given)"),
    PublishedPoint("llama-3.1-8b", "apple-m1-max", APPLE_GPU, "int4", 4.5, 4.5, 21.46, 8192,
                   "Apple ML research, 'On-device Llama 3.1 with Core ML'", False,
                   note="the same model at 8k context: tests the KV term"),
    PublishedPoint("llama-3.2-1b", "snapdragon-8-gen3", CPU, "int4", 4.5, 8, 50.2, 128,
                   "pytorch/executorch llama README (OnePlus 12, SpinQuant)", True, prefill_tok_s=260,
                   note="XNNPACK on the CPU: 4-bit groupwise (32) linears, 8-bit per-channel output layer"),
    PublishedPoint("r1-distill-qwen-1.5b", "snapdragon-8-gen3", CPU, "int8", 8, 8, 23, 1024,
                   "litert-community DeepSeek-R1-Distill-Qwen-1.5B model card (Galaxy S24 Ultra CPU)", False,
                   prefill_tok_s=261, note="dynamic int8, per-channel; decode context ~1k assumed; its 2 s TTFT "
                                           "is not used (prompt length not given)"),
    PublishedPoint("r1-distill-qwen-1.5b", "snapdragon-x-elite", PHONE_NPU, "int4", 4.25, 4.25, 16, 256,
                   "Windows developer blog, Jan 2025 (secondary copy)", False, ttft_ms=130, prompt_tokens=64,
                   excluded="the first ORT-QNN release of the distill decoded at ~15% of the bandwidth ceiling: "
                            "not a bandwidth-bound figure, so a roofline over-predicts it ~6x"),
)


def calibration_points(engine: str | None = None) -> list[PublishedPoint]:
    """Points that calibrate (optionally of one engine class)."""
    return [p for p in POINTS if p.used_for_calibration and engine in (None, p.engine)]


def held_out_points() -> list[PublishedPoint]:
    """Points kept out of calibration and not excluded: what the estimator is tested on."""
    return [p for p in POINTS if not p.used_for_calibration and not p.excluded]
