#!/usr/bin/env bash
# One GPU, three servers started together and measured one after another by the same harness:
# ours on a 0.6B checkpoint, ours on a 1.7B one, and (optionally) vllm-omni 0.26.0 on the 0.6B one.
# Everything starts detached (setsid), so a later device call on the same warm machine measures
# what an earlier one started; a server start costs minutes (compiles), the loads seconds.
#
#   benchmarks/gpu_matrix.sh start CKPT06 CKPT17 OUT_DIR     # returns once ours are ready (or time is up)
#   benchmarks/gpu_matrix.sh measure OUT_DIR "<http_load.py level args>" [ours06 ours17 omni]
#   benchmarks/gpu_matrix.sh stop OUT_DIR
#
# TAG (measure): a suffix for the report names (a measure without it replaces NAME.json).
# FRAMES (default 125) forces every request of every system to that many frames. OMNI=0 leaves
# vllm-omni out. Memory: OURS_MEM (vLLM's share per server of ours, default 0.15; each codec worker
# takes ~12 GiB more) and OURS_KV_BYTES (its KV cache, default 6 GiB: ~56k tokens, 128 streams of
# 125 frames need ~24k; fixed, because vLLM otherwise sizes it from the memory free while it
# profiles, which the other servers starting beside it change), OMNI_GPU_MEM0/OMNI_GPU_MEM1
# (default 0.18 each). RAMP_S: clients of a closed
# loop start over that many seconds in a second pass of the concurrency levels (default 2; 0: none).
# STACKS=1 (start): ours run with the stack sampler, paused (vllm_qwen3tts/tools/stack_sampler.py).
# DIAG="<http_load.py level args>" (measure): for ours, one more load after the others, with the
# stack sampler on and every server process's CPU and the GPU's utilisation logged (proc_monitor.py);
# the measured levels before it run unsampled. FIRST1="<http_load.py level args>" (measure): for
# ours, those levels again with every request's first chunk 1 frame (`initial_codec_chunk_frames`).
# MPS06=1 (start): a third server of ours, ours06mps (0.6B, port 8767), started with `--mps` (a CUDA
# MPS control daemon private to it; no GPU setting changes), so its engine's and codec worker's
# kernels share the SMs while the other servers time-slice as usual: an A/B of MPS on one machine.
# With vllm-omni too, four servers: OURS17=0 leaves ours 1.7B out.
# CLIENT_PROCS (measure, default 8): the load generator's client processes for closed loops
# (`http_load.py --client-procs`; one process took ~0.4 s to write 128 requests at once, NOTES §17).
# FM17=1 (start): ours17fm (1.7B, port 8768) with `--mps` and vLLM's cudagraph_mode FULL (CUDA graphs
# for steps that prefill too): the low-latency configuration against ours17's defaults.
set -uo pipefail
cmd=$1; shift
frames=${FRAMES:-125}
declare -A PORT=([ours06]=8765 [ours17]=8766 [ours06mps]=8767 [ours17fm]=8768 [omni]=8091)
ours=(ours06); [ "${OURS17:-1}" = 1 ] && ours+=(ours17); [ "${MPS06:-0}" = 1 ] && ours+=(ours06mps)
[ "${FM17:-0}" = 1 ] && ours+=(ours17fm)

wait_for() {  # url seconds
  for _ in $(seq 1 $(($2 / 2))); do curl -sf --max-time 2 "$1" >/dev/null && return 0; sleep 2; done
  return 1
}

start_ours() {  # name ckpt out [serve flags]
  if [ "${STACKS:-0}" = 1 ]; then
    mkdir -p "$3/$1_stacks" && touch "$3/$1_stacks/PAUSED"
    export QWEN3TTS_STACK_SAMPLES_DIR="$3/$1_stacks"
  fi
  setsid python3 -m vllm_qwen3tts.cli serve --model "$2" --port "${PORT[$1]}" --host 127.0.0.1 \
    --max-num-seqs 128 --max-concurrency-per-key 100000 --requests-per-minute-per-key 10000000 \
    --max-queued-requests 4096 --gpu-memory-utilization "${OURS_MEM:-0.15}" \
    --kv-cache-memory-bytes "${OURS_KV_BYTES:-6442450944}" "${@:4}" > "$3/$1_server.log" 2>&1 &
  echo $! > "$3/$1.pid"
  date +%s > "$3/$1.started"
  unset QWEN3TTS_STACK_SAMPLES_DIR
}

diagnose() {  # name url label out
  local stacks="$4/$1_stacks" monitor
  python3 benchmarks/proc_monitor.py --pid "$(cat "$4/$1.pid")" --out "$4/$1_diag_monitor.jsonl" --interval 1 &
  monitor=$!
  [ -d "$stacks" ] && { sleep 6; cp -r "$stacks" "$4/$1_stacks_before"; rm -f "$stacks/PAUSED"; }
  # shellcheck disable=SC2086
  python3 benchmarks/http_load.py --url "$2" --client-procs "${CLIENT_PROCS:-8}" --label "$3, diagnosed" --frames "$frames" --timeout 120 $DIAG \
    --out "$4/$1_diag.json" 2>&1 | grep -v '^{' | tail -8
  kill $monitor
  python3 benchmarks/proc_monitor.py --summary "$4/$1_diag_monitor.jsonl" | tee "$4/$1_diag_cpu.txt"
  if [ -d "$stacks" ]; then
    touch "$stacks/PAUSED"; sleep 6  # the samplers write their counts every 5 s
    python3 benchmarks/fold_stacks.py "$stacks" --since "$4/$1_stacks_before" --top 12 \
      --out "$4/$1_stacks.json" > "$4/$1_stacks.txt"
  fi
}

case $cmd in
start)
  ck06=$1; ck17=$2; out=$3; mkdir -p "$out/omni"
  t0=$(date +%s)
  if [ "${OMNI:-1}" = 1 ]; then
    OMNI_FIXED_FRAMES=$frames OMNI_SMOKE=0 OMNI_READY_TIMEOUT=1500 OMNI_GPU_MEM0=${OMNI_GPU_MEM0:-0.18} \
      OMNI_GPU_MEM1=${OMNI_GPU_MEM1:-0.18} bash benchmarks/omni/serve_omni.sh "$ck06" "${PORT[omni]}" "$out/omni" \
      > "$out/omni/serve_omni.log" 2>&1 &
    sleep 25  # each vLLM sizes its cache from the memory free when it profiles: one at a time
  fi
  start_ours ours06 "$ck06" "$out"
  # fixed KV caches: no need to start one after the other
  [ "${OURS17:-1}" = 1 ] && start_ours ours17 "$ck17" "$out"
  [ "${MPS06:-0}" = 1 ] && start_ours ours06mps "$ck06" "$out" --mps
  [ "${FM17:-0}" = 1 ] && start_ours ours17fm "$ck17" "$out" --mps --compilation-config '{"cudagraph_mode": "FULL"}'
  for name in "${ours[@]}"; do
    if wait_for "http://127.0.0.1:${PORT[$name]}/ready" $(( ${START_WAIT_S:-480} - ($(date +%s) - t0) )); then
      echo "$name ready after $(( $(date +%s) - $(cat "$out/$name.started") )) s from its start"
    else
      echo "$name not ready after $(( $(date +%s) - t0 )) s"; tail -5 "$out/${name}_server.log"
    fi
  done
  ;;
measure)
  out=$1; levels=$2; shift 2
  tag=${TAG:+_$TAG}  # TAG=x: reports named NAME_x.json, so a second measure of a server keeps the first's
  systems=("$@"); [ ${#systems[@]} = 0 ] && systems=(ours06 ours17 omni)
  for name in "${systems[@]}"; do
    if [ "$name" = omni ]; then
      wait_for "http://127.0.0.1:${PORT[omni]}/health" 240 || { echo "omni not ready"; tail -5 "$out/omni/omni_server.log"; continue; }
      dialect=(--system omni --extra-body '{"task_type":"CustomVoice","language":"Auto"}' --timeout 120)
      label="vllm-omni 0.26.0 (0.6B)"
    else
      curl -sf "http://127.0.0.1:${PORT[$name]}/ready" >/dev/null || { echo "$name not ready"; continue; }
      dialect=(--timeout 120)
      case $name in ours06) label="ours 0.6B" ;; ours17) label="ours 1.7B" ;; ours06mps) label="ours 0.6B, MPS" ;;
        ours17fm) label="ours 1.7B, MPS + FULL graphs" ;; esac
    fi
    url="http://127.0.0.1:${PORT[$name]}"
    # shellcheck disable=SC2086
    python3 benchmarks/http_load.py --url "$url" --client-procs "${CLIENT_PROCS:-8}" --label "$label" --frames "$frames" "${dialect[@]}" $levels \
      --out "$out/$name$tag.json" 2>&1 | grep -v '^{' | tail -14
    if [ "${RAMP_S:-2}" != 0 ]; then
      # the concurrency levels above 1 again, clients started over the ramp
      ramped=$(python3 -c "import sys; a = sys.argv[1].split(); c = a[a.index('--concurrency') + 1].split(',') if '--concurrency' in a else []; print(','.join(x for x in c if int(x) > 1))" "$levels")
      [ -n "$ramped" ] && python3 benchmarks/http_load.py --url "$url" --client-procs "${CLIENT_PROCS:-8}" --label "$label, ramped" --frames "$frames" \
        "${dialect[@]}" --concurrency "$ramped" --rounds 4 --ramp-s "${RAMP_S:-2}" --out "$out/${name}_ramped$tag.json" \
        2>&1 | grep -v '^{' | tail -16
    fi
    if [ -n "${FIRST1:-}" ] && [ "$name" != omni ]; then
      # shellcheck disable=SC2086
      python3 benchmarks/http_load.py --url "$url" --client-procs "${CLIENT_PROCS:-8}" --label "$label, first chunk 1 frame" --frames "$frames" \
        "${dialect[@]}" --extra-body '{"initial_codec_chunk_frames": 1}' $FIRST1 --out "$out/${name}_first1$tag.json" \
        2>&1 | grep -v '^{' | tail -14
    fi
    [ -n "${DIAG:-}" ] && [ "$name" != omni ] && diagnose "$name" "$url" "$label" "$out"
  done
  reports=$(ls "$out"/*.json 2>/dev/null | grep -v '_stacks\.json$')  # load reports only
  # shellcheck disable=SC2086
  [ -n "$reports" ] && python3 benchmarks/http_load.py --plot-only $reports --plot "$out/all.png" >/dev/null
  for name in "${ours[@]}"; do grep -E "codec worker: " "$out/${name}_server.log" 2>/dev/null | tail -3; done
  ;;
stop)
  out=$1
  kill -- -"$(cat "$out/omni/omni.pgid" 2>/dev/null)" 2>/dev/null
  for name in ours06 ours17 ours06mps ours17fm; do kill -- -"$(cat "$out/$name.pid" 2>/dev/null)" 2>/dev/null; done
  ;;  # --mps: the daemon's watcher quits it once that server's process is gone
esac
true
