#!/usr/bin/env bash
# Peak RSS and wall time of int4 RTN exports of a full-size 7B/8B fixture to every target, measured
# with /usr/bin/time -v, beside onnxruntime-genai's model builder on the same checkpoint.
#   benchmarks/memory_7b.sh [PRESET] [FIXTURE_DIR]      (PRESET: r1-distill-qwen-7b | r1-distill-llama-8b)
# Environment: JOBS (default: every job below), PEERS (the peers' folder, benchmarks' setup.sh),
# OUT (results JSONL, default benchmarks/results/memory_<preset>.jsonl).
# The fixture is 15-16 GB and each artifact 4-5 GB: one model at a time, each artifact removed
# once measured. Verification runs a reduced set (4 prompts x 16 tokens, recorded in the manifest).
set -uo pipefail
PRESET="${1:-r1-distill-qwen-7b}"
FIX="${2:-/tmp/$PRESET-full}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$HERE/results/memory_$PRESET.jsonl}"
PEERS="${PEERS:-/tmp/edge-peers}"
ART="${ART:-/tmp/mem7b-artifact}"
JOBS="${JOBS:-ort portable tensorrt coreml qnn ort-verified coreml-verified genai}"
mkdir -p "$(dirname "$OUT")"
[ -f "$FIX/config.json" ] || edge-export fixture --preset "$PRESET" --scale full -o "$FIX"
df -h "$(dirname "$ART")" | tail -1

measure() {  # label, command...: one JSON line with peak RSS (GiB) and wall time, or the failure
  local label="$1"; shift
  rm -rf "$ART"
  /usr/bin/time -v "$@" > "$ART.cmd.log" 2> "$ART.time.log"
  local rc=$? kb secs
  kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$ART.time.log")
  secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$ART.time.log")
  local verification="null" last
  if [ -f "$ART/edge_manifest.json" ]; then
    verification=$(python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get('verification')))" \
                   "$ART/edge_manifest.json")
  fi
  last=$(tail -n 1 "$ART.cmd.log" | tr -d '"\\' | cut -c1-300)
  echo "{\"preset\": \"$PRESET\", \"label\": \"$label\", \"exit\": $rc, \"peak_rss_gib\": $(python3 -c "print(round(${kb:-0}/1048576, 2))"), \"wall\": \"$secs\", \"verification\": $verification, \"last_line\": \"$last\"}" | tee -a "$OUT"
  rm -rf "$ART" "$ART-genai-cache"
}

PROMPTS="$HERE/verify_prompts_4.jsonl"
for job in $JOBS; do
  case "$job" in
    ort|portable|qnn)
      measure "onnx/$job int4 rtn, no verification" \
        edge-export export "$FIX" -o "$ART" --target onnx --variant "$job" --quant int4 --no-verify ;;
    tensorrt|coreml)
      measure "$job int4 rtn, no verification" \
        edge-export export "$FIX" -o "$ART" --target "$job" --quant int4 --no-verify ;;
    ort-verified)
      measure "onnx/ort int4 rtn, verified (4 prompts x 16 tokens)" \
        edge-export export "$FIX" -o "$ART" --target onnx --quant int4 --verify-prompts "$PROMPTS" \
        --verify-tokens 16 --max-kl 100 --min-top1 0 ;;
    portable-verified|tensorrt-verified)
      target=(--target onnx --variant portable); [ "$job" = tensorrt-verified ] && target=(--target tensorrt)
      measure "${job%-verified} int4 rtn, verified layer by layer (4 prompts x 16 tokens)" \
        edge-export export "$FIX" -o "$ART" "${target[@]}" --quant int4 --verify-prompts "$PROMPTS" \
        --verify-tokens 16 --max-kl 100 --min-top1 0 ;;
    coreml-verified)
      measure "coreml int4 rtn, verified (4 prompts x 16 tokens)" \
        edge-export export "$FIX" -o "$ART" --target coreml --quant int4 --verify-prompts "$PROMPTS" \
        --verify-tokens 16 --max-kl 100 --min-top1 0 ;;
    genai)
      if [ -x "$PEERS/venv-build/bin/python" ]; then
        # capped (GENAI_CAP_GIB, default 16): on 24 GiB it would otherwise take the machine's other jobs down with it
        measure "onnxruntime-genai builder int4 (cpu)" python3 "$HERE/rss_cap.py" "${GENAI_CAP_GIB:-16}" \
          "$PEERS/venv-build/bin/python" -m onnxruntime_genai.models.builder -i "$FIX" -o "$ART" -p int4 -e cpu \
          -c "$ART-genai-cache"
      else
        echo "no onnxruntime-genai builder under $PEERS (run ../shared/peers/setup.sh)"
      fi ;;
    *) echo "unknown job $job" ;;
  esac
done
python3 "$HERE/memory_table.py"
