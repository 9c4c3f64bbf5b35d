"""Published measurements the estimator is calibrated on, and the ones it is tested on.

Each point is data: model, device profile, engine class, the weight layout's bits per weight,
the published figures and where they are published (devices/CALIBRATION.md lists them as a
table). ``used_for_calibration`` points fit each engine class's decode efficiency, fixed cost per
layer and prefill compute rate (devices/fit.py); the others are held out and
``tests/test_devices.py`` checks the estimator against them (within +-35%). A point with an
``excluded`` reason is neither: it is kept here so the reason stays visible.

The model dims are those of the published configs (devices may not import edge_export, so the
specs are written here). Gemma-2 and Phi-3.5 are written as Llama-shaped specs of the same dims:
the estimator needs only their parameter and KV sizes, which that shape reproduces.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtimes.capabilities import APPLE_GPU, CPU, JETSON_CPU, JETSON_GPU, PHONE_NPU
from runtimes.models import ModelSpec


def _llama(hidden, layers, heads, kv, head_dim, inter, vocab=128256, tied=False) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", hidden, layers, heads, kv, head_dim, inter, vocab, rope_theta=500000.0,
                     tied_embeddings=tied)


def _qwen2(hidden, layers, heads, kv, inter, vocab, tied=False) -> ModelSpec:
    return ModelSpec("Qwen2ForCausalLM", hidden, layers, heads, kv, 128, inter, vocab, attention_bias=True,
                     tied_embeddings=tied)


MODELS: dict[str, ModelSpec] = {
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 128, 14336),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 64, 8192, tied=True),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 128, 8192, tied=True),
    "qwen2.5-7b": _qwen2(3584, 28, 28, 4, 18944, 152064),
    "r1-distill-qwen-1.5b": _qwen2(1536, 28, 12, 2, 8960, 151936),
    "gemma-2-2b": _llama(2304, 26, 8, 4, 256, 9216, vocab=256000, tied=True),
    "phi-3.5-mini": _llama(3072, 32, 32, 32, 96, 8192, vocab=32064),
    "smollm2-135m": _llama(576, 30, 9, 3, 64, 1536, vocab=49152, tied=True),
    "smollm2-360m": _llama(960, 32, 15, 5, 64, 2560, vocab=49152, tied=True),
    "qwen2.5-0.5b": ModelSpec("Qwen2ForCausalLM", 896, 24, 14, 2, 64, 4864, 151936, attention_bias=True,
                              tied_embeddings=True),
    # Cosmos-Reason2-2B's language model: Qwen3-VL-2B's text decoder (its vision encoder is not priced)
    "qwen3-vl-2b-text": ModelSpec("Qwen3ForCausalLM", 2048, 28, 16, 8, 128, 6144, 151936, qk_norm=True,
                                  tied_embeddings=True),
    "qwen3-4b": ModelSpec("Qwen3ForCausalLM", 2560, 36, 32, 8, 128, 9728, 151936, qk_norm=True,
                          tied_embeddings=True),
    "qwen3-0.6b": ModelSpec("Qwen3ForCausalLM", 1024, 28, 16, 8, 128, 3072, 151936, qk_norm=True,
                            tied_embeddings=True),
}

# A point's software stack, where its class holds more than one: the fixed cost per layer is the
# class's (launches and synchronisation on that hardware), the share of bandwidth is the stack's.
# The class's own stack (what its targets run: TensorRT / MLC-class kernels on a Jetson GPU) is "".
OWN_STACK, LLAMA_CPP = "", "llama.cpp"


@dataclass(frozen=True)
class PublishedPoint:
    """One published measurement.

    ``body_bits`` / ``head_bits``: stored bits per weight of the decoder layers / the output
    projection (scales included). ``decode_context``: tokens in the KV cache while decoding.
    ``ttft_ms`` or ``prefill_tok_s``, with ``prompt_tokens``: the published prefill figure, if any.
    ``compute``: the precision the prefill computes in (int8: dynamic int8 activations; int16:
    w4a16 NPU graphs; fp16; float: bf16 / fp32 CPU kernels).
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
    compute: str = "fp16"
    note: str = ""
    excluded: str = ""
    calibrates: tuple[str, ...] = ("decode", "prefill")  # what a calibration point fits
    bandwidth_gb_s: float | None = None  # a machine without a profile: its read bandwidth, measured with the point
    stack: str = OWN_STACK  # another software stack of the class: its own efficiency, the class's fixed cost
    known_misses: tuple[str, ...] = ()  # held-out figures the estimator misses by more than the tolerance (note: why)

    @property
    def label(self) -> str:
        engine = f"{self.engine} {self.stack}" if self.stack else self.engine
        return (f"{self.model} on {self.device} ({engine}, {self.precision}, {self.decode_tok_s:g} tok/s at "
                f"{self.decode_context})")


def ai_hub(model_id: str) -> str:
    return f"https://github.com/quic/ai-hub-models/blob/main/qai_hub_models/models/{model_id}/perf.yaml"


AI_HUB_NOTE = ("Qualcomm AI Hub, Genie, w4a16, context 4096 (the static-shape NPU graph reads the whole KV "
               "buffer each step); TTFT: the range's lower end, a 128-token prompt (AI Hub scales it by "
               "context / 128 for the upper end); per-block scale layout not published, 4.25 bits assumed")
EXECUTORCH = "https://github.com/pytorch/executorch/blob/main/examples/models/llama/README.md"
EXECUTORCH_NOTE = ("ExecuTorch XNNPACK + KleidiAI on the OnePlus 12's CPU (Snapdragon 8 Gen 3), prompt of 64 "
                   "tokens; SpinQuant / QAT+LoRA: 4-bit groupwise (32) linears with 8-bit dynamic activations, "
                   "8-bit per-channel output layer; body bits from the published .pte size")
MLC_SUPER = ("https://developer.nvidia.com/blog/nvidia-jetson-orin-nano-developer-kit-gets-a-super-boost/ "
             "(table: NVIDIA-AI-IOT/jetson-generative-ai-playground docs/benchmarks.md)")
MLC_NOTE = "MLC q4f16 (int4, group 32, fp16 scales, embedding quantized too); context not stated, short assumed"
GEMMA_EXCLUDED = ("MLC's Gemma-2 decodes 30-55% below what the other four models fit on both boards; how MLC "
                  "stores its 256k-vocabulary tied head (soft-capped logits) is not published, so its bytes "
                  "cannot be sized")
YZMA = "https://github.com/hybridgroup/yzma/blob/main/benchmarks/linux.md"
YZMA_NOTE = ("SmolLM-135M (SmolLM2-135M's dims) Q2_K through yzma's Go bindings to llama.cpp b10964; bits per "
             "weight not published (4.5 assumed: the fixed cost dominates at this size)")
YZMA_EXCLUDED = ("not a decode rate: its 'tokens a second' count the ~7 prompt tokens with the ~18 forward passes "
                 "of each 24-position run and time the binding's per-token sampling; read as 137 passes/s it is "
                 "1.4x below the estimate, while the smolhub llama-server figure agrees with it")
EDGE_LLM = "https://nvidia.github.io/TensorRT-Edge-LLM/user_guide/performance/performance-benchmarks.html"
EDGE_LLM_NOTE = ("TensorRT Edge-LLM 0.4.0, INT4 AWQ (group 128, fp16 scales: 4.125 bits), batch 1; the output "
                 "projection (or tied embedding) kept fp16 (ModelOpt's default excludes lm_head, assumed); TTFT: "
                 "its 'Prefill (ms)' for the stated prompt, computed in fp16 (w4a16); generation length not "
                 "stated, decode context = prompt + 128 assumed")
HOKWANG = "https://github.com/hokwangchoi/jetson-orin-nano-benchmarks/blob/main/vlm-benchmarks/assets/results/"
HOKWANG_NOTE = ("Jetson Orin Nano Super in MAXN_SUPER (the repository's device README), JetPack 6.2; a community "
                "measurement (blog: https://hokwangchoi.com/blog/vlm-benchmarks/). Cosmos-Reason2-2B is Qwen3-VL-2B "
                "post-trained: its text decoder is what decodes; output projection (tied embedding) kept fp16 as "
                "for the other Edge-LLM points (the author splits the lm_head MatMul to fit the board's contiguous "
                "allocations; its precision is not stated)")
SMOLHUB = "https://www.smolhub.com/posts/jetson-nano-super-benchmark-non-reasoning/"
SMOLHUB_NOTE = ("llama.cpp CUDA (llama-server, -ngl 99, -c 2560), Jetson Orin Nano Super in its 25W mode (the "
                "profile's 102 GB/s assumed to hold in it), one request at a time; decode rate and TTFT p50 from "
                "Table 15 (ctx=2048, gen=256), decode context 2048 + 128 mean. GGUF sizes read as MiB: the "
                "table's Q8_0 files match Q8_0's 8.5 bits/weight only so. Prefill computes in int8 (llama.cpp's "
                "MMQ kernels for quantized weights). Source text: YuvrajSingh-mist/SmolHub-Website "
                "_posts/2026-05-29-jetson-nano-super-benchmark-non-reasoning.md at 48c9f3f")
NORMIEBENCH = "https://github.com/brand-o/normiebench/issues/"
Q4_K_M_NOTE = ("llama.cpp Metal, Q4_K_M (4.9 bits/weight on average by file size; output Q6_K), tg128 / pp512; "
               "a community result. Calibrates prefill only: edge-export's artifacts reach Apple's GPU through "
               "Core ML, which decodes the same model 27% slower on the M1 Max (Apple's 33.67 against 46.2 "
               "tok/s), and no Core ML TTFT with a stated prompt length is published")

POINTS: tuple[PublishedPoint, ...] = (
    # ---- phone NPU: Qualcomm AI Hub, Snapdragon 8 Elite ----
    PublishedPoint("llama-3.1-8b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 13.05, 4096,
                   ai_hub("llama_v3_1_8b_instruct"), True, ttft_ms=155, prompt_tokens=128, compute="int16",
                   note=AI_HUB_NOTE),
    PublishedPoint("llama-3.2-1b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 53.64, 4096,
                   ai_hub("llama_v3_2_1b_instruct"), True, ttft_ms=37.07, prompt_tokens=128, compute="int16",
                   note=AI_HUB_NOTE),
    PublishedPoint("llama-3.2-3b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 23.47, 4096,
                   ai_hub("llama_v3_2_3b_instruct"), True, ttft_ms=88.2, prompt_tokens=128, compute="int16",
                   note=AI_HUB_NOTE),
    PublishedPoint("qwen2.5-7b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 15.4, 4096,
                   ai_hub("qwen2_5_7b_instruct"), False, ttft_ms=136, prompt_tokens=128, compute="int16",
                   note=AI_HUB_NOTE),
    PublishedPoint("llama-3.2-3b", "snapdragon-x-elite", PHONE_NPU, "int4", 4.25, 4.25, 18.42, 4096,
                   ai_hub("llama_v3_2_3b_instruct"), False, ttft_ms=125.9, prompt_tokens=128, compute="int16",
                   note=AI_HUB_NOTE,
                   excluded="the X Elite's older Hexagon (v73) decodes the same graph 22% slower than the 8 Elite's "
                            "(v79) despite 1.6x the bandwidth: one fixed cost per class cannot carry both "
                            "generations, and no X Elite-only class has enough points"),
    PublishedPoint("llama-3.2-1b", "snapdragon-8-elite", PHONE_NPU, "int4", 4.25, 4.25, 33.74, 4096,
                   ai_hub("llama_v3_2_1b_instruct"), False, ttft_ms=81.2, prompt_tokens=128, compute="int16",
                   excluded="AI Hub's 'w4' path (not w4a16) decodes 37% slower than w4a16 at the same weight "
                            "bytes: not a layout edge-export's onnx/qnn produces"),
    PublishedPoint("r1-distill-qwen-1.5b", "snapdragon-x-elite", PHONE_NPU, "int4", 4.25, 4.25, 16, 256,
                   "https://blogs.windows.com/windowsdeveloper/2025/01/29/running-distilled-deepseek-r1-models-"
                   "locally-on-copilot-pcs-powered-by-windows-copilot-runtime/ (figures from a secondary copy; the "
                   "post past its opening could not be read here)", False, ttft_ms=130, prompt_tokens=64,
                   compute="int16",
                   excluded="the first ORT-QNN release of the distill decoded at ~15% of the bandwidth ceiling: "
                            "not a bandwidth-bound figure"),
    # ---- phone CPU: ExecuTorch on the OnePlus 12, LiteRT on the Galaxy S24 Ultra ----
    PublishedPoint("llama-3.2-1b", "snapdragon-8-gen3", CPU, "int4", 5.0, 8, 50.2, 128, EXECUTORCH, True,
                   prefill_tok_s=260.5, prompt_tokens=64, compute="int8", note=f"SpinQuant; {EXECUTORCH_NOTE}"),
    PublishedPoint("llama-3.2-3b", "snapdragon-8-gen3", CPU, "int4", 5.0, 8, 19.7, 128, EXECUTORCH, True,
                   prefill_tok_s=89.7, prompt_tokens=64, compute="int8", note=f"SpinQuant; {EXECUTORCH_NOTE}"),
    PublishedPoint("llama-3.2-1b", "snapdragon-8-gen3", CPU, "fp16", 16, 16, 19.2, 128, EXECUTORCH, True,
                   prefill_tok_s=60.3, prompt_tokens=64, compute="float", note=f"BF16 baseline; {EXECUTORCH_NOTE}"),
    PublishedPoint("llama-3.2-3b", "snapdragon-8-gen3", CPU, "fp16", 16, 16, 7.6, 128, EXECUTORCH, True,
                   prefill_tok_s=21.2, prompt_tokens=64, compute="float", note=f"BF16 baseline; {EXECUTORCH_NOTE}"),
    PublishedPoint("llama-3.1-8b", "snapdragon-8-gen3", CPU, "int4", 4.25, 4.25, 10.85, 128, EXECUTORCH, True,
                   compute="int8", note="Llama 3 8B (Llama-3.1-8B's dims), 8da4w group 128 PTQ, embedding 4-bit "
                                        "group 32, OnePlus 12"),
    PublishedPoint("r1-distill-qwen-1.5b", "snapdragon-8-gen3", CPU, "int8", 8, 8, 23, 1024,
                   "https://huggingface.co/litert-community/DeepSeek-R1-Distill-Qwen-1.5B (model card, Galaxy "
                   "S24 Ultra CPU)", True, prefill_tok_s=261, prompt_tokens=128, compute="int8",
                   note="LiteRT dynamic int8, per-channel; decode context ~1k and prompt 128 assumed (not stated); "
                        "its 2 s TTFT is not used. Held out before this calibration; a different engine (TFLite) "
                        "at 74% of the ExecuTorch points' efficiency, it is calibrated on so that the CPU range "
                        "carries that spread"),
    PublishedPoint("smollm2-135m", "host", CPU, "int4", 112.2 * 2**20 * 8 / 134.5e6, 112.2 * 2**20 * 8 / 134.5e6,
                   237.8, 192, "benchmarks/results/decode_cpu_smollm2.json (measured here)", True,
                   prefill_tok_s=1432.3, prompt_tokens=128, compute="int8", bandwidth_gb_s=49.7,
                   note="this repository's own measurement: the quickstart's int4 artifact through onnxruntime on "
                        "2 threads of the x86 build host (read bandwidth measured with it, 49.7 GB/s); bits per "
                        "weight from its 112.2 MiB. The only sub-1B CPU point: without it the CPU's fixed cost "
                        "per layer comes from 1B-8B phone points alone"),
    PublishedPoint("llama-3.2-1b", "snapdragon-8-gen3", CPU, "int4", 5.4, 8, 45.8, 128, EXECUTORCH, False,
                   prefill_tok_s=252.0, prompt_tokens=64, compute="int8",
                   note=f"QAT+LoRA (LoRA adapters kept bf16: body bits from the 1,127 MiB .pte); {EXECUTORCH_NOTE}"),
    # ---- Jetson GPU: MLC on Orin Nano (NVIDIA's Super announcement), TensorRT Edge-LLM, llama.cpp ----
    *(PublishedPoint(model, device, JETSON_GPU, "int4", 4.5, 4.5, rate, 256, MLC_SUPER,
                     (device != "jetson-orin-nano-8gb" or model != "llama-3.2-3b") and model != "gemma-2-2b", note=MLC_NOTE, excluded=GEMMA_EXCLUDED if model == "gemma-2-2b" else "")
      for device, rates in (("jetson-orin-nano-super", (19.14, 43.07, 21.75, 34.97, 38.1)),
                            ("jetson-orin-nano-8gb", (14.0, 27.7, 14.2, 21.5, 24.7)))
      for model, rate in zip(("llama-3.1-8b", "llama-3.2-3b", "qwen2.5-7b", "gemma-2-2b", "phi-3.5-mini"), rates)),
    # TensorRT Edge-LLM on the AGX Thor (the engine edge-export's tensorrt target runs), BS=1 rows of
    # its 0.4.0 table. The 8B was held out before; the sub-1B Qwen3-0.6B is held out; the 4B calibrates.
    *(PublishedPoint(model, "jetson-agx-thor", JETSON_GPU, "int4", 4.125, 16, rate, prompt + 128, EDGE_LLM, fits,
                     ttft_ms=ttft, prompt_tokens=prompt, note=EDGE_LLM_NOTE)
      for model, rate, ttft, prompt, fits in (("llama-3.1-8b", 50.8, 215.5, 383, False),
                                              ("qwen3-0.6b", 270.2, 21.0, 366, False),
                                              ("qwen3-4b", 76.4, 116.2, 364, True))),
    # The same model through TensorRT Edge-LLM and llama.cpp on one Orin Nano Super (MAXN_SUPER):
    # Cosmos-Reason2-2B's language model, text prompts. Both held out.
    PublishedPoint("qwen3-vl-2b-text", "jetson-orin-nano-super", JETSON_GPU, "int4", 4.125, 16, 62.2, 19 + 42,
                   HOKWANG + "trt/trt_profile_text_5x_20260419_013103.json", False, ttft_ms=29.26,
                   prompt_tokens=19,
                   note=f"TensorRT Edge-LLM, W4A16 AWQ (ModelOpt), 'tokens_per_second': 62.24 over 5 runs of 83 "
                        f"generated tokens; LLM prefill 29.26 ms for a 19-token text prompt. {HOKWANG_NOTE} The "
                        "TTFT was a known miss (-41%) while prefill was priced as the longer of its FLOPs and one "
                        "weight pass; with the terms added and the 512-token prefill below calibrating the rate it "
                        "tests how prefill scales with the prompt on this board"),
    # The same engine, model and board, an image prompt: the LLM prefill stage alone over 512 tokens
    # (~494 image + ~18 text; the vision encoder's 208 ms is its own stage). The only fp16 TensorRT
    # prefill on an Orin: it calibrates the fp16 prefill rate, not decode (its 59.8 tok/s would fit the
    # held-out text run's decode on the same model and board).
    PublishedPoint("qwen3-vl-2b-text", "jetson-orin-nano-super", JETSON_GPU, "int4", 4.125, 16, 59.78, 512 + 64,
                   HOKWANG + "trt/trt_profile_image_5x_20260419_013103.json", True, ttft_ms=210.85,
                   prompt_tokens=512, calibrates=("prefill",),
                   note=f"TensorRT Edge-LLM, W4A16 AWQ (ModelOpt), image prompt: 'prefill' "
                        f"'average_time_per_run_ms': 210.85 with 'average_tokens_per_run': 512.0 (5 runs, 2560 "
                        f"computed tokens, none reused; stage 'llm_prefill' median 210.85 ms), 2470 image tokens "
                        f"over the 5 runs; the 'vision_encoder' stage (208.0 ms) is separate and not counted; "
                        f"decode 59.78 tok/s over 127 generated tokens (not used). The 512 tokens go through the "
                        f"text decoder as any prompt would (DeepStack's added vision features are additions, not "
                        f"priced). {HOKWANG_NOTE}"),
    PublishedPoint("qwen3-vl-2b-text", "jetson-orin-nano-super", JETSON_GPU, "int4", 1.1e9 * 8 / 1.72e9,
                   1.1e9 * 8 / 1.72e9, 38.3, 32 + 64,
                   HOKWANG + "llamacpp/llamacpp_cosmos_q4km_20260418_233102_streaming.json", False, stack=LLAMA_CPP,
                   note=f"llama.cpp Q4_K_M ('~1.1 GB model file', 5.1 bits/weight), llama-server: median 'tps' "
                        f"38.33 (tpot 26.03 ms) over 5 runs of 128 tokens; its 33.3 ms TTFT is not used: the prompt's "
                        f"token count is not published (~32 with the chat template assumed for the context). "
                        f"{HOKWANG_NOTE}"),
    # llama.cpp CUDA (its own stack: its own share of bandwidth, the class's fixed cost), smolhub's
    # Table 15 at 25W: prompt 2048, 256 generated. The size range's two ends calibrate, the three
    # sub-1B models between them are held out.
    *(PublishedPoint(model, "jetson-orin-nano-super", JETSON_GPU, precision, bits, bits, rate, 2048 + 128, SMOLHUB,
                     fits, ttft_ms=ttft, prompt_tokens=2048, compute="int8", stack=LLAMA_CPP,
                     note=f"{quant}, {mib} MiB ({bits:.2f} bits/weight over the whole file); {SMOLHUB_NOTE}{extra}")
      for model, precision, quant, mib, rate, ttft, fits, extra in (
          ("smollm2-135m", "int4", "Q4_K_M", 101, 165.1, 308.7, True,
           ". The smallest model calibrates: the 3B-8B MLC points leave the fixed cost per layer undetermined (a fit "
           "on them alone gives 81 us and over-predicts this point by about half); the page's later revision "
           "reads 165.2 tok/s"),
          ("smollm2-360m", "int8", "Q8_0", 369, 101.8, 502.5, False, ""),
          ("qwen2.5-0.5b", "int4", "Q4_K_M (token embedding / tied output kept f16 in Qwen's file)", 469, 92.6,
           530.9, False, ""),
          ("qwen3-0.6b", "int8", "Q8_0", 610, 49.4, 771.0, False, ""),
          ("llama-3.2-1b", "int4", "Q4_K_M", 771, 47.0, 982.7, True,
           ". The largest model calibrates, with SmolLM2-135M: together they separate llama.cpp's share of "
           "bandwidth from the fixed cost")
      ) for bits in (mib * 2**20 * 8 / MODELS[model].parameter_count,)),
    PublishedPoint("llama-3.2-1b", "jetson-orin-nano-super", JETSON_GPU, "int8", 8.5, 8.5, 62, 800,
                   "https://www.jeremymorgan.com/blog/tech/nvidia-jetson-orin-nano-speed-test/ (as tabulated in "
                   "msmcs-robotics/WayfindR-driver docs/jetson_orin_nano_llm_benchmarks.md)", False,
                   note="Ollama (llama.cpp CUDA), 25W mode, '~62' tok/s over ~1600 generated tokens (mean context "
                        "~800 assumed); Ollama's default llama3.2:1b tag is Q8_0 (8.5 bits/weight, assumed from its "
                        "1.3 GB size); a community figure, approximate as published", stack=LLAMA_CPP,
                   excluded="not a decode rate that bytes can size: ~1600 tokens over ~26 s of wall time, and the "
                            "same table has Qwen2.5-0.5B (~50) slower than Llama-3.2-1B (~62) with a third of its "
                            "bytes; smolhub's systematic run of the same engine on the same board and power mode "
                            "decodes the smaller Q4_K_M file of this model at 47.0 (llama.cpp) and 44.8 (Ollama) "
                            "tok/s. Held out before the llama.cpp stack had its own efficiency (then -3%); priced "
                            "as llama.cpp now, -49%"),
    PublishedPoint("smollm2-135m", "jetson-orin-nano-super", JETSON_GPU, "int4", 4.5, 4.5, 190.5, 16, YZMA, False,
                   note=YZMA_NOTE, excluded=YZMA_EXCLUDED),
    PublishedPoint("smollm2-135m", "jetson-orin-nano-super", JETSON_CPU, "int4", 4.5, 4.5, round(84.2 * 18 / 25, 1),
                   16, YZMA, True, calibrates=("decode",),
                   note=f"{YZMA_NOTE}. Published as 84.2 'tokens a second' on the 6 CPU cores; its benchmark code "
                        "counts ~7 prompt tokens with the ~18 forward passes of each 24-position run, so 25 "
                        "counted tokens are 18 passes: 60.6 passes/s, taken as the decode rate (the binding's "
                        "per-token sampling included). The only Jetson CPU figure found"),
    PublishedPoint("smollm2-135m", "jetson-orin-nano-super", JETSON_GPU, "int4", 4.5, 4.5, 64.5, 256, MLC_SUPER,
                   False, excluded="the table names only 'SmolLM2', not which size; not used"),
    # ---- Apple GPU: Core ML (Apple), llama.cpp Metal ----
    PublishedPoint("llama-3.1-8b", "apple-m1-max", APPLE_GPU, "int4", 4.5, 4.5, 33.67, 512,
                   "https://machinelearning.apple.com/research/core-ml-on-device-llama", True,
                   note="Core ML int4 block 32, fp16 scales, stateful KV, GPU; short context assumed; the post's "
                        "51.9 ms TTFT is not used (prompt length not given)"),
    PublishedPoint("llama-3.1-8b", "apple-m1-max", APPLE_GPU, "int4", 4.5, 4.5, 21.46, 8192,
                   "https://machinelearning.apple.com/research/core-ml-on-device-llama", True,
                   note="the same model at 8k context. Held out before this calibration; the fixed-cost model "
                        "over-predicts it by 35% when fitted on the short-context point alone (Core ML's decode "
                        "slows with the context more than the KV bytes explain), so it calibrates and the "
                        "apple-gpu range carries that"),
    PublishedPoint("llama-3.1-8b", "apple-m1-max", APPLE_GPU, "int4", 4.85, 6.56, 46.2, 128, NORMIEBENCH + "40",
                   True, prefill_tok_s=499.58, prompt_tokens=512, note=Q4_K_M_NOTE, calibrates=("prefill",)),
    PublishedPoint("llama-3.1-8b", "apple-m4", APPLE_GPU, "int4", 4.85, 6.56, 20.87, 128, NORMIEBENCH + "3",
                   True, prefill_tok_s=224.81, prompt_tokens=512, note=Q4_K_M_NOTE, calibrates=("prefill",)),
)


def calibration_points(engine: str | None = None, figure: str | None = None) -> list[PublishedPoint]:
    """Points that calibrate (optionally of one engine class, and one figure: decode | prefill)."""
    return [p for p in POINTS if p.used_for_calibration and not p.excluded and engine in (None, p.engine)
            and figure in (None, *p.calibrates)]


def held_out_points() -> list[PublishedPoint]:
    """Points kept out of calibration and not excluded: what the estimator is tested on."""
    return [p for p in POINTS if not p.used_for_calibration and not p.excluded]
