#!/usr/bin/env bash
# The engine half of the tensorrt target, on a machine with an NVIDIA GPU, in one short run:
#   benchmarks/trt_device_check.sh ARTIFACT_DIR...   (copies of `--target tensorrt` artifacts)
# Says what TensorRT the machine has; where it has one, builds each artifact's engine with
# `edge-export build-engine`, prints the inspector's precision summary and generates through the
# `tensorrt` backend against the `reference` backend; where it has none, shows what build-engine
# and the backend say there. Needs numpy, onnx, click, tokenizers, jinja2 and torch (CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib.util, shutil
print("tensorrt module:", importlib.util.find_spec("tensorrt") is not None, "| trtexec:", shutil.which("trtexec"))
import ctypes.util
print("libnvinfer:", ctypes.util.find_library("nvinfer") or "not found")
PY
for artifact in "$@"; do
  echo "== $artifact"
  python3 -m edge_export.cli build-engine "$artifact" --json; echo "build-engine exit code: $?"
  python3 - "$artifact" <<'PY'
import sys, numpy as np, runtimes
from runtimes.errors import EdgeError
path = sys.argv[1]
try:
    rt = runtimes.load(path, backend="tensorrt")
except EdgeError as e:
    print("tensorrt backend:", e)
    sys.exit(0)
ref = runtimes.load(path, backend="reference")
ids = list(range(3, 40))
a, b = rt.backend.prefill(ids), ref.backend.prefill(ids)
print("prefill max|diff|", float(np.abs(a - b).max()), "argmax", int(a.argmax()), int(b.argmax()))
agree = sum(int(rt.backend.decode(t).argmax()) == int(ref.backend.decode(t).argmax()) for t in (5, 9, 11, 13))
print("decode argmax agreement", agree, "of 4")
PY
done
