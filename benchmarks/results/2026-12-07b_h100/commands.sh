#!/usr/bin/env bash
# The device calls of the second 2026-12-07 session (one H100, vLLM 0.26.0 from the kit), in order,
# each after the kit's parts were sent and `source .gpukit/setup.sh`; results land in $OUT.
#   suite: the GPU suite alone on the machine (scripts/gpu_tests.sh run); meanwhile, on the CPU, the
#          full-size random 0.6B CustomVoice checkpoint for the soak is made
#   start: the soak's server (benchmarks/gpu_soak.sh start), then on it, fresh: the first burst of 64
#          streams after /ready (no warm-up), one stream (16 requests), 128 ramped streams (4 rounds,
#          8 client processes); 125 forced frames, streaming PCM (benchmarks/http_load.py)
#   soak:  benchmarks/gpu_soak.sh measure: 10,000 mixed requests at 128 concurrent, disconnects mixed in
set -uo pipefail
phase=$1
export STATE=/tmp/gpu_soak SERVE_EXTRA="--kv-cache-memory-bytes 6442450944" CONCURRENCY=128
url=http://127.0.0.1:8770
load() {  # name, http_load.py level arguments...
  local name=$1; shift
  timeout 200 python3 benchmarks/http_load.py --url $url --api-key soak-key --label "ours 0.6B, $name" --frames 125 \
    --timeout 120 "$@" --out "$OUT/http/$name.json" > "$OUT/http/$name.log" 2>&1
  echo "$name rc=$? after ${SECONDS} s"; tail -6 "$OUT/http/$name.log"
}
case $phase in
suite)
  mkdir -p $STATE
  setsid python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full \
    --out $STATE/ckpt-0.6b-cv > $STATE/ckpt.log 2>&1 &
  timeout 560 scripts/gpu_tests.sh run; echo "suite rc=$? after ${SECONDS} s"
  cp $STATE/ckpt.log "$OUT/" 2>/dev/null
  ;;
start)
  mkdir -p "$OUT/http"
  bash benchmarks/gpu_soak.sh start || exit 1
  load first_burst_64 --concurrency 64 --rounds 1 --warmup-frames 0
  load c1 --concurrency 1 --rounds 16
  load c128_ramped --concurrency 128 --rounds 4 --ramp-s 2 --client-procs 8
  cp $STATE/server.log "$OUT/http/server_during_http.log"
  ;;
soak)
  MAX_S=${MAX_S:-540} bash benchmarks/gpu_soak.sh measure
  ;;
esac
