#!/usr/bin/env bash
# The device calls of the 2026-12-04 session (one H200), in order, each after the GPU kit's parts
# were sent (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as one
# tarball per call.
#   a: install, full-size checkpoints, then ours (0.6B, 1.7B; codec workers started before vLLM,
#      stack samplers paused) and vllm-omni (0.6B) started together (gpu_matrix.sh): time to ready
#   b: the HTTP loads of ours (burst and ramped closed loops, Poisson rates), the TTFA levels again
#      with a 1-frame first chunk (initial_codec_chunk_frames=1), then per server one ramped c=128
#      load with stacks sampled and per-process CPU logged
#   solo: what ran instead of b and c after phase a's machine was lost (see there)
#   c: the same loads of vllm-omni, then the servers stopped and the talker alone at batch 1 and
#      128 with a torch profile at 128 (where the fused sampler's saving went)
set -uo pipefail
phase=$1
R=/tmp/r; mkdir -p $R
LEVELS="--concurrency 1,64,128 --rounds 2 --rates 1,20 --duration 15 --voice vivian"
pack() { tar czf "$OUT/$phase.tgz" -C $R . 2>/dev/null; }
startup_lines() {  # what each server's start spent its time on
  for name in ours06 ours17; do
    grep -E "started codec worker|^starting:|Model loading took|torch.compile took|Available KV|init engine|codec decoder compiled|CUDA graphs captured|provisioned|speech service ready|codec worker serving" \
      $R/m/${name}_server.log > $R/m/${name}_startup_lines.txt 2>/dev/null
  done
}
case $phase in
solo)
  # After the machine of phase a was lost before phase b: one call, ours only (no vllm-omni),
  # 0.6B measured in full, then 1.7B's first-audio levels while the call's time lasts.
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    git log --oneline -1; git status --short | head -20; } > $R/machine.txt 2>&1
  for v in 0.6b 1.7b; do
    python3 -m vllm_qwen3tts.cli make-checkpoint --variant $v-custom_voice --scale full --out /tmp/ck$v > $R/ckpt_$v.log 2>&1 &
  done
  wait
  echo "checkpoints after ${SECONDS} s"
  OMNI=0 STACKS=1 START_WAIT_S=$((330 - SECONDS)) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  startup_lines; pack
  FIRST1="--concurrency 1 --rounds 4 --rates 1,20 --duration 15 --voice vivian" \
  DIAG="--concurrency 128 --rounds 3 --ramp-s 2 --voice vivian" \
    bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours06
  echo "ours06 measured after ${SECONDS} s"; pack
  if [ $SECONDS -lt 450 ]; then
    RAMP_S=0 FIRST1="--concurrency 1 --rounds 4 --rates 1,20 --duration 15 --voice vivian" \
      bash benchmarks/gpu_matrix.sh measure $R/m "--concurrency 1,128 --rounds 2 --rates 1,20 --duration 15 --voice vivian" ours17
  fi
  startup_lines
  echo "solo done after ${SECONDS} s"
  ;;
a)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    git log --oneline -1; git status --short | head -20; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  for v in 0.6b 1.7b; do
    python3 -m vllm_qwen3tts.cli make-checkpoint --variant $v-custom_voice --scale full --out /tmp/ck$v > $R/ckpt_$v.log 2>&1 &
  done
  wait
  echo "checkpoints after ${SECONDS} s"
  STACKS=1 START_WAIT_S=$((560 - SECONDS)) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  startup_lines
  for _ in $(seq 1 $(( (585 - SECONDS) / 2 ))); do
    curl -sf --max-time 2 http://127.0.0.1:8091/health >/dev/null && break; sleep 2
  done
  tail -1 $R/m/omni/serve_omni.log
  echo "phase a done after ${SECONDS} s"
  ;;
b)
  FIRST1="--concurrency 1 --rounds 4 --rates 1,20 --duration 15 --voice vivian" \
  DIAG="--concurrency 128 --rounds 3 --ramp-s 2 --voice vivian" \
    bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours06 ours17
  startup_lines
  ;;
c)
  RAMP_S=2 bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" omni
  bash benchmarks/gpu_matrix.sh stop $R/m; sleep 5
  pack  # what came so far, in case the profile below runs out of time
  timeout $((575 - SECONDS)) python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b \
    --out $R/talker_b128_profile.json talker --batches 1,128 --profile-batch 128 > $R/talker_b128_profile.log 2>&1
  grep -E '^\{"batch"|^\|' $R/talker_b128_profile.log | head -40
  ;;
esac
pack
