#!/usr/bin/env bash
# The soak of deliverable 5 on the lent GPU: 10,000 mixed requests (benchmarks/soak.py) against
# `vllm-qwen3tts serve` on a full-size random 0.6B CustomVoice checkpoint; results in $OUT/soak/.
#
# Two device calls (a cold server start alone takes ~3 min of the 10 a call may last):
#   1. benchmarks/gpu_soak.sh start     # makes the checkpoint, starts the server detached (setsid),
#                                       # returns once /ready says 200 (~4 min cold)
#   2. benchmarks/gpu_soak.sh measure   # the soak (stops sending after MAX_S, default 420 s), the
#                                       # idle check, the server's log; then stops the server
# Call 2 must come while the machine from call 1 is still warm (it keeps the server and STATE).
# Each call runs after `source .gpukit/setup.sh` (/work/shared/gpu/README.md; call 1 after the
# kit's last part and the project's `pip install -e .`).
# `benchmarks/gpu_soak.sh all` does both in one call, giving the soak what is left of ~9 min
# (it fails as incomplete if 10,000 requests do not fit); `stop` ends a server left running.
#
# Sizing: with every sentence forced to FRAMES=25 (2 s of audio), a request is ~25 talker steps
# plus its first-audio latency; NOTES §18 measured ~600 audio-s/s at 128 streams of 125 frames on
# an H200 (~400-500 on an H100). 10,000 requests of ~1.3 sentences each are ~26,000 audio-s, about
# a minute of GPU work at that rate; short requests are bound by per-request costs in the API
# process instead, so CONCURRENCY=64 (half the engine's 128 sequences) is expected to take 2-5 min.
#
# Environment: STATE (server state across the two calls, default /tmp/gpu_soak), CKPT (checkpoint
# directory, default $STATE/ckpt-0.6b-cv), REQUESTS (10000), CONCURRENCY (64), FRAMES (25),
# MAX_S (the soak's --max-duration-s), START_WAIT_S (480), PORT (8770), ALL_BUDGET_S (`all`: the
# seconds the whole call may take, default 540), SERVE_EXTRA (more `serve` arguments, e.g.
# `--kv-cache-memory-bytes 6442450944` so that the server's start does not size its KV cache from
# memory that other GPU processes starting beside it are changing).
set -uo pipefail
cmd=${1:?usage: $0 start|measure|all|stop}
state=${STATE:-/tmp/gpu_soak}
ckpt=${CKPT:-$state/ckpt-0.6b-cv}
port=${PORT:-8770}
key=soak-key
url=http://127.0.0.1:$port
out=${OUT:-$state/out}/soak
mkdir -p "$state" "$out"
t0=$(date +%s)

start() {
  if [ ! -f "$ckpt/config.json" ]; then
    python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out "$ckpt" \
      || { echo "make-checkpoint failed"; return 1; }
    echo "checkpoint made in $(( $(date +%s) - t0 )) s"
  fi
  # per-key limits out of the way: a 429 would count as an error of the soak
  setsid python3 -m vllm_qwen3tts.cli serve --model "$ckpt" --host 127.0.0.1 --port "$port" --api-key "$key" \
    --max-num-seqs 128 --max-concurrency-per-key 100000 --requests-per-minute-per-key 10000000 \
    --max-queued-requests 4096 --gpu-memory-utilization 0.5 ${SERVE_EXTRA:-} > "$state/server.log" 2>&1 &
  echo $! > "$state/server.pid"
  local started
  started=$(date +%s)
  while [ $(( $(date +%s) - started )) -lt "${START_WAIT_S:-480}" ]; do
    if curl -sf --max-time 2 "$url/ready" >/dev/null; then
      echo "server ready after $(( $(date +%s) - started )) s (pid $(cat "$state/server.pid"))"
      return 0
    fi
    kill -0 "$(cat "$state/server.pid")" 2>/dev/null || break
    sleep 2
  done
  echo "server not ready"; tail -30 "$state/server.log"; return 1
}

measure() {
  curl -sf --max-time 5 "$url/ready" >/dev/null || { echo "server not ready"; tail -30 "$state/server.log"; return 1; }
  local max_s=${MAX_S:-420} rc
  python3 benchmarks/soak.py --base-url "$url" --api-key "$key" --server-pid "$(cat "$state/server.pid")" \
    --requests "${REQUESTS:-10000}" --concurrency "${CONCURRENCY:-64}" --frames "${FRAMES:-25}" \
    --max-duration-s "$max_s" --timeout 120 --out "$out/soak.json" 2> "$out/soak_progress.log" | tee "$out/soak.txt"
  rc=${PIPESTATUS[0]}
  cp "$state/server.log" "$out/server.log"
  grep -cE "Traceback|ERROR" "$out/server.log" | xargs echo "server log lines with Traceback/ERROR:"
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | xargs echo "GPU:"
  echo "soak exit code $rc"
  return "$rc"
}

stop() {
  kill -- -"$(cat "$state/server.pid" 2>/dev/null)" 2>/dev/null
  sleep 5
  kill -9 -- -"$(cat "$state/server.pid" 2>/dev/null)" 2>/dev/null
  true
}

case $cmd in
start) start || { stop; exit 1; } ;;
measure) measure; rc=$?; stop; exit $rc ;;
all)
  start || { stop; exit 1; }
  MAX_S=$(( ${ALL_BUDGET_S:-540} - ($(date +%s) - t0) - 40 ))  # what is left of the call, less the idle check and writing
  echo "the soak gets at most $MAX_S s"
  measure; rc=$?; stop; exit $rc ;;
stop) stop ;;
*) echo "usage: $0 start|measure|all|stop" >&2; exit 2 ;;
esac
