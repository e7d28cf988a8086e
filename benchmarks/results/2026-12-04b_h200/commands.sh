#!/usr/bin/env bash
# The device calls of the second 2026-12-04 session (one H200), in order, each after the GPU kit's
# parts were sent (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as
# one tarball per call.
#   a: install, a full-size 0.6B checkpoint, then vllm-omni 0.26.0, ours and ours with `--mps` (a
#      private CUDA MPS daemon) started together (gpu_matrix.sh); then ours measured while the call lasts
#   b: ours with --mps measured the same way, plus a 1-frame first chunk at 64 and 128 ramped streams
#      and a diagnosed ramped c=128 (per-process CPU, GPU utilisation); then the same extras for ours
#   c: vllm-omni measured the same way; the servers stopped; the talker alone (in-process vLLM):
#      one request's prefill timed and profiled, steps at batch 1 and 128, a torch profile at 128
#   d (one command on the same machine after c; not a phase of this file):
#      make-checkpoint 1.7b to /tmp/ck1.7b; OMNI=0 OURS17=1 gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b /tmp/r2/m;
#      RAMP_S=0 gpu_matrix.sh measure /tmp/r2/m "--concurrency 1 --rounds 4 --rates 1,20 --duration 15 --voice vivian" ours17
#   e (a fresh machine, after the profile of c): ours 0.6B with vLLM's cudagraph_mode FULL (CUDA
#      graphs for steps that prefill too; the server's default in that commit, bae9be3, reverted after): greedy codes against the reference on
#      the GPU in that mode (talker_gpu_check.py), the server started, its first-audio levels, then
#      128 ramped streams (after bae9be3 the server needs --compilation-config {"cudagraph_mode": "FULL"}
#      for this; gpu_matrix.sh does not pass it)
set -uo pipefail
phase=$1
R=/tmp/r; mkdir -p $R
LEVELS="--concurrency 1,64,128 --rounds 2 --rates 1,20 --duration 15 --voice vivian"
EXTRA_FIRST1="--concurrency 64,128 --rounds 4 --ramp-s 2 --voice vivian"
EXTRA_DIAG="--concurrency 128 --rounds 3 --ramp-s 2 --voice vivian"
pack() { tar czf "$OUT/$phase.tgz" -C $R . 2>/dev/null; }
left() { echo $(( $1 - SECONDS )); }  # seconds until $1 s into this call
startup_lines() {
  for name in ours06 ours06mps; do
    grep -E "started codec worker|MPS|^starting:|Model loading took|torch.compile took|Available KV|init engine|codec decoder compiled|CUDA graphs captured|provisioned|speech service ready|codec worker serving" \
      $R/m/${name}_server.log > $R/m/${name}_startup_lines.txt 2>/dev/null
  done
}
case $phase in
a)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    git log --oneline -1; git status --short | head -20; which nvidia-cuda-mps-control; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt.log 2>&1
  echo "checkpoint after ${SECONDS} s"
  OMNI=1 OURS17=0 MPS06=1 START_WAIT_S=$(left 420) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b none $R/m
  startup_lines; pack
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > $R/m/gpu_apps.txt 2>&1
  timeout $(left 570) bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours06
  echo "phase a done after ${SECONDS} s"
  ;;
b)
  timeout $(left 330) env FIRST1="$EXTRA_FIRST1" DIAG="$EXTRA_DIAG" \
    bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours06mps
  echo "ours06mps measured after ${SECONDS} s"; pack
  # ours (no MPS): the extras only, if phase a measured its levels
  [ -f $R/m/ours06.json ] && timeout $(left 570) env RAMP_S=0 FIRST1="$EXTRA_FIRST1" DIAG="$EXTRA_DIAG" \
    bash benchmarks/gpu_matrix.sh measure $R/m "--concurrency 1 --rounds 2 --voice vivian" ours06
  startup_lines
  echo "phase b done after ${SECONDS} s"
  ;;
c)
  timeout $(left 330) bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" omni
  echo "omni measured after ${SECONDS} s"
  bash benchmarks/gpu_matrix.sh stop $R/m; sleep 8
  pack  # what came so far, in case the profile below runs out of time
  timeout $(left 580) python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker_profile.json \
    talker --batches 1,128 --profile-batch 128 --prefill-iters 20 > $R/talker_profile.log 2>&1
  grep -E '^\{"batch"|one_frame|two_frames|profiled_wall|gpu_kernel_ms' $R/talker_profile.log | head -20
  echo "phase c done after ${SECONDS} s"
  ;;
e)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git log --oneline -1; } > $R/machine.txt 2>&1
  timeout 420 python3 benchmarks/talker_gpu_check.py --runs float32:64:full,bfloat16:64:full --out $R/talker_check_full.json \
    > $R/talker_check_full.log 2>&1 &
  python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt.log 2>&1
  echo "checkpoint after ${SECONDS} s"
  OMNI=0 OURS17=0 START_WAIT_S=$(left 330) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b none $R/m
  grep -E "cudagraph|CUDA graph|init engine|speech service ready" $R/m/ours06_server.log | tail -6; pack
  timeout $(left 480) env RAMP_S=0 bash benchmarks/gpu_matrix.sh measure $R/m \
    "--concurrency 1 --rounds 2 --rates 1,20 --duration 10 --voice vivian" ours06
  pack
  timeout $(left 560) python3 benchmarks/http_load.py --url http://127.0.0.1:8765 --label "ours 0.6B, FULL graphs, ramped" \
    --frames 125 --timeout 120 --concurrency 128 --rounds 3 --ramp-s 2 --voice vivian --out $R/m/ours06_ramped.json \
    2>&1 | grep -v '^{' | tail -14
  wait; cat $R/talker_check_full.json
  echo "phase e done after ${SECONDS} s"
  ;;
esac
pack
