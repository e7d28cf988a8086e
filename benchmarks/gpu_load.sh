#!/usr/bin/env bash
# Our server on a GPU under the HTTP load generator. Usage:
#   benchmarks/gpu_load.sh CHECKPOINT OUT_DIR LABEL "<http_load.py level args>" [serve args...]
# e.g. benchmarks/gpu_load.sh /tmp/ckpt $OUT/0.6b "ours 0.6B" "--concurrency 1,64,128 --frames 125" --max-num-seqs 128
# DIAG="<http_load.py level args>": afterwards, one more load with every server process's Python
# stacks sampled (vllm_qwen3tts/stack_sampler.py) and their CPU use and the GPU's utilisation
# logged (proc_monitor.py); summaries at the end.
set -uo pipefail
model=$1; out=$2; label=$3; levels=$4; shift 4
port=${PORT:-8765}
mkdir -p "$out"
if [ -n "${DIAG:-}" ]; then export QWEN3TTS_STACK_SAMPLES_DIR="$out/stacks"; fi
python3 -m vllm_qwen3tts.cli serve --model "$model" --port $port --host 127.0.0.1 "$@" > "$out/server.log" 2>&1 &
pid=$!
ready=0
for i in $(seq 1 250); do
  sleep 2
  if curl -sf localhost:$port/ready >/dev/null; then ready=1; break; fi
  kill -0 $pid 2>/dev/null || break
done
if [ $ready != 1 ]; then echo "server not ready"; tail -40 "$out/server.log"; kill $pid 2>/dev/null; exit 1; fi
echo "server ready after $((i * 2)) s"
python3 benchmarks/proc_monitor.py --pid $pid --out "$out/monitor.jsonl" --interval 1 &
monitor=$!
# shellcheck disable=SC2086
python3 benchmarks/http_load.py --url http://127.0.0.1:$port --label "$label" $levels --out "$out/load.json" \
  --plot "$out/load.png" 2>&1 | tee "$out/load.log" | tail -15
if [ -n "${DIAG:-}" ]; then
  sleep 6; cp -r "$out/stacks" "$out/stacks_before"  # the sampler flushes every 5 s
  kill $monitor; python3 benchmarks/proc_monitor.py --pid $pid --out "$out/monitor_diag.jsonl" --interval 1 &
  monitor=$!
  # shellcheck disable=SC2086
  python3 benchmarks/http_load.py --url http://127.0.0.1:$port --label "$label (sampled)" $DIAG \
    --out "$out/load_diag.json" 2>&1 | tail -4
  sleep 6
  python3 benchmarks/fold_stacks.py "$out/stacks" --since "$out/stacks_before" --top 12 --out "$out/stacks.json" \
    > "$out/stacks.txt"
  python3 benchmarks/proc_monitor.py --summary "$out/monitor_diag.jsonl"
fi
kill $monitor 2>/dev/null
grep -E "codec worker: |Avg generation throughput" "$out/server.log" | tail -8
kill $pid; wait $pid 2>/dev/null
grep -E "Traceback|Error" "$out/server.log" | head -5
true
