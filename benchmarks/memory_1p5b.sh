#!/usr/bin/env bash
# Peak RSS and time of quantizing + exporting the full r1-distill-qwen-1.5b fixture (3.5 GB bf16),
# measured with /usr/bin/time -v, beside onnxruntime-genai's model builder on the same checkpoint.
#   benchmarks/memory_1p5b.sh [FIXTURE_DIR] [OUT_JSONL]
set -euo pipefail
FIX="${1:-/tmp/r1-1.5b-full}"
OUT="${2:-benchmarks/results/memory_1p5b.jsonl}"
PEERS="${PEERS:-/tmp/edge-peers}"
mkdir -p "$(dirname "$OUT")"
[ -f "$FIX/config.json" ] || edge-export fixture --preset r1-distill-qwen-1.5b --scale full -o "$FIX"
measure() {  # label, command...
  local label="$1"; shift
  /usr/bin/time -v "$@" > /tmp/mem_cmd.log 2> /tmp/mem_time.log || { tail -n 5 /tmp/mem_cmd.log /tmp/mem_time.log; return 1; }
  local kb secs
  kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' /tmp/mem_time.log)
  secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' /tmp/mem_time.log)
  echo "{\"label\": \"$label\", \"peak_rss_mb\": $((kb / 1024)), \"wall\": \"$secs\"}" | tee -a "$OUT"
}
# memory, not accuracy, is measured here: AWQ/GPTQ calibrate on 16 of the built-in prompts to keep it short
CAL="$(dirname "$0")/calibration_small.jsonl"
for m in ${METHODS:-rtn awq gptq}; do
  measure "edge-export int4 $m (quantize + lower, no verification)" \
    edge-export export "$FIX" -o /tmp/mem-art-$m --quant int4 --method $m --no-verify --overwrite --calibration "$CAL"
done
measure "edge-export int4 rtn (export with verification)" \
  edge-export export "$FIX" -o /tmp/mem-art-rtn-verified --quant int4 --method rtn --overwrite --min-top1 0 --max-kl 100
if [ -x "$PEERS/venv-build/bin/python" ]; then
  measure "onnxruntime-genai builder int4 (cpu)" \
    "$PEERS/venv-build/bin/python" -m onnxruntime_genai.models.builder -i "$FIX" -o /tmp/mem-genai -p int4 -e cpu -c /tmp/mem-genai-cache
fi
python3 "$(dirname "$0")/memory_table.py"  # the README table, benchmarks/results/memory_1p5b.md
