#!/usr/bin/env bash
# The device calls of the third 2026-12-04 session (one H200), in order, each after the GPU kit's
# parts were sent (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as
# one tarball per call.
#   a: install; the predictor's kernels against PyTorch on the GPU (tests/test_predictor_kernels.py);
#      the small-batch projections alone (predictor_linear.py); the talker alone in-process with
#      the small-batch kernels (steps at batch 1..128, one request's prefill, a torch profile at
#      batch 1) and without them (QWEN3TTS_PREDICTOR_KERNELS=attention,sampler: cuBLAS projections)
#   b: ours 0.6B, ours 1.7B, and ours 1.7B with --mps and cudagraph_mode FULL started together;
#      the two 1.7B servers measured (c=1, 1 and 20 req/s, c=128 bursts and ramped)
#   c: ours 0.6B measured the same way; the servers stopped; greedy parity against the reference
#      with the fused path at every batch (QWEN3TTS_SMALL_BATCH_ROWS=64), then in FULL mode
#      (both stalled in the forked engine's start-up; see stalled/)
# Phases b and c ran with QWEN3TTS_SMALL_BATCH_ROWS=0 exported (phase a had found the kernels slower).
#   d (one command on a fresh machine, after 2f98192 made the check spawn its engine):
#      timeout 240 python3 benchmarks/talker_gpu_check.py --runs float32:64 --copies 2 --out $OUT/talker_check_spawn.json
set -uo pipefail
phase=$1
R=/tmp/r; mkdir -p $R
LEVELS="--concurrency 1,128 --rounds 2 --rates 1,20 --duration 15 --voice vivian"
pack() { tar czf "$OUT/$phase.tgz" -C $R . 2>/dev/null; }
left() { echo $(( $1 - SECONDS )); }  # seconds until $1 s into this call
case $phase in
a)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    git log --oneline -1; git status --short | head -20; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  # checkpoints on the CPU meanwhile (the 1.7B one is for phase b)
  ( python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt06.log 2>&1
    python3 -m vllm_qwen3tts.cli make-checkpoint --variant 1.7b-custom_voice --scale full --out /tmp/ck1.7b > $R/ckpt17.log 2>&1 ) &
  timeout 150 python3 tests/test_predictor_kernels.py cuda all > $R/kernels_check.txt 2>&1; echo "kernels check rc=$?"
  cat $R/kernels_check.txt | tail -8
  timeout 200 python3 benchmarks/predictor_linear.py --out $R/predictor_linear.json > $R/predictor_linear.log 2>&1
  echo "linear rc=$? after ${SECONDS} s"; grep -A60 '^| batch | projection | small' $R/predictor_linear.log | head -80
  pack
  wait  # the checkpoints
  timeout $(left 470) python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker_fused.json \
    talker --batches 1,8,16,32,64,128 --profile-batch 1 --profile-steps 20 --prefill-iters 10 > $R/talker_fused.log 2>&1
  grep -E '^\{"batch"|one_frame|two_frames|profiled_wall|gpu_kernel_ms|"wall_ms"' $R/talker_fused.log | head -20
  pack
  timeout $(left 590) env QWEN3TTS_PREDICTOR_KERNELS=attention,sampler python3 benchmarks/profile_pipeline.py \
    --model /tmp/ck0.6b --out $R/talker_cublas.json talker --batches 1,8,16 --profile-batch 0 --prefill-iters 10 \
    > $R/talker_cublas.log 2>&1
  grep -E '^\{"batch"|one_frame|two_frames' $R/talker_cublas.log | head -10
  echo "phase a done after ${SECONDS} s"
  ;;
b)
  OMNI=0 OURS17=1 FM17=1 START_WAIT_S=$(left 400) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  for name in ours06 ours17 ours17fm; do
    grep -E "MPS|^starting:|Model loading took|torch.compile took|Available KV|init engine|codec decoder compiled|CUDA graphs captured|speech service ready" \
      $R/m/${name}_server.log > $R/m/${name}_startup_lines.txt 2>/dev/null
  done
  pack
  timeout $(left 470) bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours17
  pack
  timeout $(left 590) bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours17fm
  echo "phase b done after ${SECONDS} s"
  ;;
c)
  [ -f $R/m/ours17fm.json ] || timeout 200 bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours17fm
  timeout $(left 330) bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours06
  bash benchmarks/gpu_matrix.sh stop $R/m; sleep 8
  pack
  timeout $(left 470) env QWEN3TTS_SMALL_BATCH_ROWS=64 python3 benchmarks/talker_gpu_check.py \
    --runs float32:64,bfloat16:64 --out $R/talker_check_fused.json > $R/talker_check_fused.log 2>&1
  grep -E "chunk" $R/talker_check_fused.log | tail -4
  pack
  timeout $(left 590) env STACK_DUMP_S=60 python3 benchmarks/talker_gpu_check.py --runs float32:64:full,bfloat16:64:full \
    --out $R/talker_check_full.json > $R/talker_check_full.log 2>&1
  grep -E "chunk" $R/talker_check_full.log | tail -4
  echo "phase c done after ${SECONDS} s"
  ;;
esac
pack
