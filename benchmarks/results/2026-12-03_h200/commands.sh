#!/usr/bin/env bash
# The device calls of 2026-12-03 (one H200), in order, after the kit's parts were sent
# (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as one tarball.
#   a: install, full-size checkpoints, the predictor kernels' GPU checks and the sampler's
#      micro-benchmark, then ours (0.6B, 1.7B) and vllm-omni (0.6B) started together (gpu_matrix.sh)
#   b: the HTTP loads of all three (burst and ramped closed loops, Poisson rates)
#   c: the servers stopped; the talker alone (in-process engine, no codec) with the fused sampler
#      and without it (QWEN3TTS_PREDICTOR_KERNELS=attention)
set -uo pipefail
phase=$1
R=/tmp/r; mkdir -p $R
LEVELS="--concurrency 1,64,128 --rounds 2 --rates 1,20 --duration 15 --voice vivian"
pack() { tar czf "$OUT/$phase.tgz" -C $R . 2>/dev/null; }
case $phase in
a)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    git log --oneline -1; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  for v in 0.6b 1.7b; do
    (python3 -m vllm_qwen3tts.cli make-checkpoint --variant $v-custom_voice --scale full --out /tmp/ck$v > $R/ckpt_$v.log 2>&1
     touch /tmp/ck$v.done) &
  done
  python3 -m pytest -q -p no:cacheprovider tests/test_predictor_kernels.py > $R/kernel_tests.log 2>&1; tail -2 $R/kernel_tests.log
  (cd benchmarks && python3 predictor_sampler.py --out $R/predictor_sampler.json > $R/predictor_sampler.log 2>&1)
  grep '^|' $R/predictor_sampler.log
  while [ ! -f /tmp/ck0.6b.done ] || [ ! -f /tmp/ck1.7b.done ]; do sleep 2; done
  echo "checkpoints after ${SECONDS} s"
  START_WAIT_S=$((570 - SECONDS)) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  ;;
b)
  bash benchmarks/gpu_matrix.sh measure $R/m "$LEVELS" ours06 ours17 omni
  ;;
c)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  python3 -m pytest -q -p no:cacheprovider -k gpu tests/test_predictor_kernels.py > $R/kernel_tests_c.log 2>&1
  tail -1 $R/kernel_tests_c.log
  [ -f /tmp/r/m/ours06.pid ] && { bash benchmarks/gpu_matrix.sh stop $R/m; sleep 5; }
  [ -f /tmp/ck0.6b/config.json ] || python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice \
    --scale full --out /tmp/ck0.6b > $R/ckpt_0.6b.log 2>&1
  for k in 1 attention; do
    QWEN3TTS_PREDICTOR_KERNELS=$k python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker_kernels_$k.json \
      talker --batches 1,128 --profile-batch 0 > $R/talker_kernels_$k.log 2>&1
    echo "QWEN3TTS_PREDICTOR_KERNELS=$k"; grep -E '^\{"batch"' $R/talker_kernels_$k.log
  done
  ;;
esac
pack
