#!/usr/bin/env bash
# Our server on a GPU under the HTTP load generator. Usage:
#   benchmarks/gpu_load.sh CHECKPOINT OUT_DIR LABEL "<http_load.py level args>" [serve args...]
# e.g. benchmarks/gpu_load.sh /tmp/ckpt $OUT/0.6b "ours 0.6B" "--concurrency 1,64,128 --frames 125" --max-num-seqs 128
set -uo pipefail
model=$1; out=$2; label=$3; levels=$4; shift 4
port=${PORT:-8765}
mkdir -p "$out"
python3 -m vllm_qwen3tts.cli serve --model "$model" --port $port --host 127.0.0.1 "$@" > "$out/server.log" 2>&1 &
pid=$!
ready=0
for i in $(seq 1 200); do
  sleep 2
  if curl -sf localhost:$port/ready >/dev/null; then ready=1; break; fi
  kill -0 $pid 2>/dev/null || break
done
if [ $ready != 1 ]; then echo "server not ready"; tail -40 "$out/server.log"; kill $pid 2>/dev/null; exit 1; fi
echo "server ready after $((i * 2)) s"
# shellcheck disable=SC2086
python3 benchmarks/http_load.py --url http://127.0.0.1:$port --label "$label" $levels --out "$out/load.json" \
  --plot "$out/load.png" 2>&1 | tee "$out/load.log" | tail -15
curl -s localhost:$port/metrics | grep -E "^qwen3tts_(codec|time_to_first_audio_seconds_(sum|count))" | head -20
kill $pid; wait $pid 2>/dev/null
grep -E "Traceback|Error" "$out/server.log" | head -5
true
