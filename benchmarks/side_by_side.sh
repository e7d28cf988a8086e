#!/usr/bin/env bash
# Our server and vllm-omni 0.26.0 on one GPU, same checkpoint, same harness, same forced length.
# Both start detached (setsid: they outlive the device call that started them, so a later call on
# the same warm machine can measure them), each with its own share of GPU memory.
#
#   benchmarks/side_by_side.sh start CKPT OUT_DIR        # both start; returns once ours is ready
#   benchmarks/side_by_side.sh measure OUT_DIR "<http_load.py level args>"
#                                                        # waits for omni, loads ours then omni
#   benchmarks/side_by_side.sh stop OUT_DIR
#
# FRAMES (default 125): every request of both systems is forced to this many frames.
# Memory: OURS_MEM (vLLM's share for our talker, default 0.22; our codec worker takes ~12 GiB more
# for its CUDA graphs), OMNI_GPU_MEM0/OMNI_GPU_MEM1 (default 0.25 each: talker, code2wav).
set -uo pipefail
cmd=$1; shift
frames=${FRAMES:-125}
ours_port=${OURS_PORT:-8765}
omni_port=${OMNI_PORT:-8091}

wait_for() {  # url seconds
  for _ in $(seq 1 $(($2 / 2))); do curl -sf --max-time 2 "$1" >/dev/null && return 0; sleep 2; done
  return 1
}

case $cmd in
start)
  ckpt=$1; out=$2; mkdir -p "$out/omni"
  OMNI_FIXED_FRAMES=$frames OMNI_SMOKE=0 OMNI_READY_TIMEOUT=1500 OMNI_GPU_MEM0=${OMNI_GPU_MEM0:-0.25} \
    OMNI_GPU_MEM1=${OMNI_GPU_MEM1:-0.25} bash benchmarks/omni/serve_omni.sh "$ckpt" $omni_port "$out/omni" \
    > "$out/omni/serve_omni.log" 2>&1 &
  sleep 20  # let omni's stages claim their memory first: vLLM sizes its cache from what is free
  setsid python3 -m vllm_qwen3tts.cli serve --model "$ckpt" --port $ours_port --host 127.0.0.1 \
    --max-num-seqs 128 --max-concurrency-per-key 100000 --requests-per-minute-per-key 10000000 \
    --max-queued-requests 4096 --gpu-memory-utilization "${OURS_MEM:-0.22}" > "$out/ours_server.log" 2>&1 &
  echo $! > "$out/ours.pid"
  t0=$(date +%s)
  if wait_for "http://127.0.0.1:$ours_port/ready" 600; then
    echo "ours ready after $(( $(date +%s) - t0 )) s"
  else
    echo "ours not ready"; tail -30 "$out/ours_server.log"
  fi
  ;;
measure)
  out=$1; levels=$2
  t0=$(date +%s)
  if wait_for "http://127.0.0.1:$omni_port/health" 400; then
    echo "omni ready (waited $(( $(date +%s) - t0 )) s here)"
  else
    echo "omni not ready"; tail -30 "$out/omni/omni_server.log"
  fi
  # shellcheck disable=SC2086
  python3 benchmarks/http_load.py --url http://127.0.0.1:$ours_port --label "ours (vllm-qwen3tts)" --frames $frames \
    --timeout 120 $levels --out "$out/ours.json" 2>&1 | tail -12
  # shellcheck disable=SC2086
  python3 benchmarks/http_load.py --url http://127.0.0.1:$omni_port --system omni --label "vllm-omni 0.26.0" \
    --frames $frames --extra-body '{"task_type":"CustomVoice","language":"Auto"}' --timeout 120 $levels --out "$out/omni.json" \
    2>&1 | tail -12
  python3 benchmarks/http_load.py --plot-only "$out/ours.json" "$out/omni.json" --plot "$out/side_by_side.png"
  ;;
stop)
  out=$1
  kill -- -"$(cat "$out/omni/omni.pgid")" 2>/dev/null
  kill -- -"$(cat "$out/ours.pid")" 2>/dev/null
  ;;
esac
true
