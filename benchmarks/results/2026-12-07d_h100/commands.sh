#!/usr/bin/env bash
# The device calls of the fourth 2026-12-07 session (one H100, vLLM 0.26.0 from the kit), in order,
# each after the kit's parts were sent and `source .gpukit/setup.sh`; results land in $OUT.
#   ckpt:    the full-size random 0.6B CustomVoice checkpoint, made on the CPU in the background
#   compare: issue 21's "within noise" check on one warm machine: the tree before the refactor
#            (f3b56cd, unpacked into _oldtree/, not committed) and this tree, each in a fresh server
#            with the same flags (benchmarks/gpu_soak.sh start: --max-num-seqs 128,
#            --gpu-memory-utilization 0.5), measured by this tree's benchmarks/http_load.py:
#            4 streams of warm-up, one stream for 8 requests, then 128 streams ramped over 2 s for
#            8 rounds from 8 client processes; 125 forced frames, streaming PCM
#   lite:    only the engine-API tests of the GPU suite (greedy fp32 codes against the official
#            ones; text in pieces on Model Runner V2) and the vLLM-internals checks
#   suite:   scripts/gpu_tests.sh run, two tests deselected whose code is unchanged since they passed
#            on 2a1c869 (NOTES §22): the codec's CUDA graphs (274 s) and the vocabulary check (178 s)
set -uo pipefail
phase=$1
export STATE=/tmp/gpu_soak CKPT=/tmp/gpu_soak/ckpt-0.6b-cv
url=http://127.0.0.1:8770
root=$PWD
load() {  # tree, name, http_load.py level arguments...
  local tree=$1 name=$2; shift 2
  timeout 240 python3 "$root/benchmarks/http_load.py" --url $url --api-key soak-key \
    --label "$tree 0.6B, $name" --frames 125 --timeout 120 "$@" \
    --out "$OUT/$tree/$name.json" > "$OUT/$tree/$name.log" 2>&1
  echo "$tree $name rc=$? after ${SECONDS} s"; tail -4 "$OUT/$tree/$name.log"
}
measure_tree() {  # tree name, its directory
  local tree=$1 dir=$2
  mkdir -p "$OUT/$tree"
  (cd "$dir" && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1)
  (cd "$dir" && PYTHONPATH="/tmp/site:$dir" STATE=$STATE/$tree bash "$root/benchmarks/gpu_soak.sh" start) || return 1
  load "$tree" warmup --concurrency 4 --rounds 1
  load "$tree" c1 --concurrency 1 --rounds 8
  load "$tree" c128_ramped --concurrency 128 --rounds 8 --ramp-s 2 --client-procs 8
  cp "$STATE/$tree/server.log" "$OUT/$tree/server.log"
  (STATE=$STATE/$tree bash "$root/benchmarks/gpu_soak.sh" stop)
  sleep 3
}
case $phase in
debug)  # issue 22: text in pieces on MRv2 with the gate lifted and every session event logged
  # (a temporary test and instrumentation, not committed; NOTES §27 says what they showed)
  mkdir -p $STATE
  [ -f $CKPT/config.json ] || setsid python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice \
    --scale full --out $CKPT > $STATE/ckpt.log 2>&1 < /dev/null &
  QWEN3TTS_DEBUG_LOG=$OUT/debug.jsonl timeout "${DEBUG_S:-420}" python3 -m pytest -v -rs -p no:cacheprovider \
    tests/test_zz_debug_pieces.py > $OUT/debug_pytest.log 2>&1; tail -30 $OUT/debug_pytest.log
  echo "debug rc=$? after ${SECONDS} s"
  ;;
ckpt)
  mkdir -p $STATE
  [ -f $CKPT/config.json ] || setsid python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice \
    --scale full --out $CKPT > $STATE/ckpt.log 2>&1 < /dev/null &
  ;;
compare_old|compare_head)
  while [ ! -f $CKPT/config.json ] || pgrep -f make-checkpoint >/dev/null; do sleep 2; done
  [ $phase = compare_old ] && measure_tree before_f3b56cd "$root/_oldtree"
  [ $phase = compare_head ] && measure_tree head "$root"
  ;;
compare)
  while [ ! -f $CKPT/config.json ] || pgrep -f make-checkpoint >/dev/null; do sleep 2; done
  echo "checkpoint there after ${SECONDS} s"
  measure_tree before_f3b56cd "$root/_oldtree"
  measure_tree head "$root"
  ;;
suite)
  timeout 570 scripts/gpu_tests.sh run --durations=0 \
    --deselect tests/test_gpu.py::test_codec_graphs_give_each_stream_the_eager_audio \
    --deselect tests/test_talker_vocab.py::test_prompt_ids_outside_the_talker_vocabulary_are_refused_on_the_gpu "$@"
  echo "suite rc=$? after ${SECONDS} s"
  ;;
lite)  # what device time allowed: the engine-API tests on the GPU, and the vLLM-internals checks
  timeout "${LITE_S:-420}" scripts/gpu_tests.sh run --durations=0 \
    -k "greedy_fp32_codes_through_the_engine or text_in_pieces_on_model_runner_v2"
  echo "lite rc=$? after ${SECONDS} s"
  ;;
esac
