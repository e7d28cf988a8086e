#!/usr/bin/env bash
# The device calls of the fifth 2026-12-04 session (one H200), in order, each after the GPU kit's
# parts were sent (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as
# one tarball per call.
#   a: install; the predictor's kernels and the talker's small-batch projections against PyTorch
#      on the GPU; the talker in-process (no codec, no HTTP) with everything on and with the
#      talker's projections in cuBLAS (QWEN3TTS_PREDICTOR_KERNELS without talker_linear); then
#      ours 0.6B (defaults) and ours 1.7B with --mps and FULL graphs started together
#   b: ours 0.6B at c=1 and 128 (at once, with the connections opened before the level; then
#      ramped); ours 1.7B --mps + FULL at c=1, Poisson 1 and 20 req/s for 15 s, then 1 req/s for 60 s
#   c: servers stopped; greedy parity against the official codes in fp32 with FULL graphs: 64-token
#      steps as before, and 2-token steps (at most 2 requests: every step takes the small-batch paths)
#   d (a fresh machine, after the SiLU gate moved into the talker's down projection and the sampler's
#      searches became 16-ary): install; kernel checks; the sampler by fan-out; greedy parity with
#      2-token steps; the talker in-process; ours 0.6B (defaults) started alone
#   e: ours 0.6B at c=1 (8 requests one after another), then 128 at once and ramped
set -uo pipefail
phase=$1
R=/tmp/r; mkdir -p $R
pack() { tar czf "$OUT/$phase.tgz" -C $R . 2>/dev/null; }
left() { echo $(( $1 - SECONDS )); }  # seconds until $1 s into this call
case $phase in
a)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    nproc; git log --oneline -1; git status --short | head -20; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  { python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt06.log 2>&1
    python3 -m vllm_qwen3tts.cli make-checkpoint --variant 1.7b-custom_voice --scale full --out /tmp/ck1.7b > $R/ckpt17.log 2>&1; } &
  timeout 150 python3 tests/test_predictor_kernels.py cuda all > $R/kernels_check.txt 2>&1; echo "kernels check rc=$?"
  timeout 120 python3 tests/test_talker_projections.py cuda >> $R/kernels_check.txt 2>&1; echo "projections check rc=$?"
  grep -E "max diff|identical|Error" $R/kernels_check.txt | tail -8
  wait  # the checkpoints
  echo "checkpoints after ${SECONDS} s"
  pack
  for kernels in 1 attention,sampler,linear; do
    name=talker_$( [ $kernels = 1 ] && echo all || echo no_talker_linear )
    batches=$( [ $kernels = 1 ] && echo 1,2,4,16,128 || echo 1,2 )
    timeout 200 env QWEN3TTS_PREDICTOR_KERNELS=$kernels python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b \
      --out $R/$name.json talker --batches $batches --profile-batch 0 --prefill-iters 5 > $R/$name.log 2>&1
    echo "$name rc=$? after ${SECONDS} s"; grep -E '^\{"batch"|one_frame_ms_median|two_frames_ms_median' $R/$name.log | head -8
  done
  pack
  OMNI=0 FM17=1 OURS17=0 START_WAIT_S=$(left 585) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  echo "phase a done after ${SECONDS} s"
  ;;
b)
  OURS17=0 FM17=1 timeout $(left 330) bash benchmarks/gpu_matrix.sh measure $R/m "--concurrency 1,128 --rounds 2" ours06
  pack
  OURS17=0 FM17=1 RAMP_S=0 timeout $(left 450) bash benchmarks/gpu_matrix.sh measure $R/m \
    "--concurrency 1 --rounds 3 --rates 1,20 --duration 15" ours17fm
  pack
  OURS17=0 FM17=1 RAMP_S=0 TAG=1rps60 timeout $(left 590) bash benchmarks/gpu_matrix.sh measure $R/m \
    "--rates 1 --duration 60" ours17fm
  echo "phase b done after ${SECONDS} s"
  ;;
c)
  OURS17=0 FM17=1 bash benchmarks/gpu_matrix.sh stop $R/m; sleep 8
  timeout $(left 590) python3 benchmarks/talker_gpu_check.py --runs float32:64:full,float32:2:full --copies 4 \
    --out $R/talker_check.json > $R/talker_check.log 2>&1
  echo "parity rc=$?"; grep -E "chunk|identical|match|Error" $R/talker_check.log | tail -8
  echo "phase c done after ${SECONDS} s"
  ;;
d)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    nproc; git log --oneline -1; git status --short | head -20; } > $R/machine_d.txt 2>&1
  cat $R/machine_d.txt
  python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt06.log 2>&1 &
  timeout 150 python3 tests/test_predictor_kernels.py cuda all > $R/kernels_check_d.txt 2>&1; echo "kernels check rc=$?"
  timeout 120 python3 tests/test_talker_projections.py cuda >> $R/kernels_check_d.txt 2>&1; echo "projections check rc=$?"
  grep -E "max diff|identical|Error" $R/kernels_check_d.txt | tail -8
  timeout 90 python3 benchmarks/predictor_sampler.py --batches 1,16,128 --warps 8 --fanouts 2,4,8,16,32 \
    --out $R/predictor_sampler.json > $R/predictor_sampler.log 2>&1; echo "sampler rc=$?"
  grep -E '^\| [0-9]+ \| triton' $R/predictor_sampler.log; grep -o '"fanouts_draw_alike": [a-z]*' $R/predictor_sampler.json | sort | uniq -c
  pack
  timeout 150 python3 benchmarks/talker_gpu_check.py --runs float32:2:full --copies 4 --out $R/talker_check_d.json \
    > $R/talker_check_d.log 2>&1; echo "parity rc=$?"; grep -E "^float32" $R/talker_check_d.log
  wait  # the checkpoint
  timeout 150 python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker_d.json talker --batches 1,2,4,16,128 \
    --profile-batch 0 --prefill-iters 5 > $R/talker_d.log 2>&1
  echo "talker rc=$? after ${SECONDS} s"; grep -E '^\{"batch"|one_frame_ms_median|two_frames_ms_median' $R/talker_d.log | head -8
  pack
  OMNI=0 OURS17=0 START_WAIT_S=$(left 585) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck0.6b $R/md
  echo "phase d done after ${SECONDS} s"
  ;;
e)
  OURS17=0 RAMP_S=0 TAG=c1x8 timeout 60 bash benchmarks/gpu_matrix.sh measure $R/md "--concurrency 1 --rounds 8" ours06
  OURS17=0 timeout $(left 400) bash benchmarks/gpu_matrix.sh measure $R/md "--concurrency 128 --rounds 2" ours06
  OURS17=0 bash benchmarks/gpu_matrix.sh stop $R/md
  echo "phase e done after ${SECONDS} s"
  ;;
esac
pack
