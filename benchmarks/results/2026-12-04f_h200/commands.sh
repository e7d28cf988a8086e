#!/usr/bin/env bash
# The device calls of the sixth 2026-12-04 session (one H200), in order, each after the GPU kit's
# parts were sent (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as
# one tarball per call.
#   a: install; the sampler against PyTorch on the GPU and timed with its searches as they are and
#      as they were; the talker in-process (batches 1-128, a torch profile at batch 1); then ours
#      0.6B (defaults) and ours 1.7B with --mps and FULL graphs started together
#   b: ours 0.6B at c=1 (8 requests), 128 at once (8 client processes) and ramped; ours 1.7B
#      --mps + FULL at c=1, Poisson 20 req/s for 15 s, then 1 req/s for 120 s
#   c: servers stopped; greedy parity against the official codes in fp32 with FULL graphs (2- and
#      64-token steps); the talker in-process with a torch profile at batch 128
#   d (a fresh machine, after the token attention issued all its loads first): install; the
#      attention and the fused layer against PyTorch on the GPU; the attention timed with L2 warm
#      and cold; the talker in-process (a torch profile at batch 1); then ours 0.6B (defaults) and
#      ours 1.7B with --mps and FULL graphs started together
#   e: as run (the device time left allowed no more): wait for both servers (phase d's start ran
#      out of time seconds before they were ready); ours 0.6B at c=1 (16 requests); ours 1.7B
#      --mps + FULL at 1 req/s for 90 s
# Machine 1 also ran, right after b and in the same call as c, before it:
#   OURS17=0 FM17=1 RAMP_S=0 TAG=c1x16 bash benchmarks/gpu_matrix.sh measure /tmp/r/m "--concurrency 1 --rounds 16" ours06
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
  timeout 120 python3 tests/test_predictor_kernels.py cuda sampler > $R/kernels_check.txt 2>&1; echo "sampler check rc=$?"
  tail -2 $R/kernels_check.txt
  timeout 120 python3 benchmarks/predictor_sampler.py --batches 1,2,16,128 --warps 4,8 \
    --out $R/predictor_sampler.json > $R/predictor_sampler.log 2>&1; echo "sampler timing rc=$?"
  grep -E '^\| [0-9]+ \| triton' $R/predictor_sampler.log; grep -o '"searches_draw_alike": [a-z]*' $R/predictor_sampler.json | sort | uniq -c
  pack
  wait  # the checkpoints
  echo "checkpoints after ${SECONDS} s"
  timeout 200 python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker.json talker --batches 1,2,4,16,128 \
    --profile-batch 1 --prefill-iters 5 > $R/talker.log 2>&1
  echo "talker rc=$? after ${SECONDS} s"; grep -E '^\{"batch"|one_frame_ms_median|two_frames_ms_median' $R/talker.log | head -8
  pack
  OMNI=0 FM17=1 OURS17=0 START_WAIT_S=$(left 585) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  echo "phase a done after ${SECONDS} s"
  ;;
b)
  OURS17=0 FM17=1 RAMP_S=0 TAG=c1x8 timeout 60 bash benchmarks/gpu_matrix.sh measure $R/m "--concurrency 1 --rounds 8" ours06
  pack
  OURS17=0 FM17=1 timeout $(left 300) bash benchmarks/gpu_matrix.sh measure $R/m "--concurrency 128 --rounds 2" ours06
  pack
  OURS17=0 FM17=1 RAMP_S=0 timeout $(left 380) bash benchmarks/gpu_matrix.sh measure $R/m \
    "--concurrency 1 --rounds 3 --rates 20 --duration 15" ours17fm
  pack
  OURS17=0 FM17=1 RAMP_S=0 TAG=1rps120 timeout $(left 590) bash benchmarks/gpu_matrix.sh measure $R/m \
    "--rates 1 --duration 120" ours17fm
  echo "phase b done after ${SECONDS} s"
  ;;
c)
  OURS17=0 FM17=1 bash benchmarks/gpu_matrix.sh stop $R/m; sleep 8
  timeout 300 python3 benchmarks/talker_gpu_check.py --runs float32:2:full,float32:64:full --copies 4 \
    --out $R/talker_check.json > $R/talker_check.log 2>&1
  echo "parity rc=$?"; grep -E "^float32|identical|Error" $R/talker_check.log | tail -8
  pack
  timeout $(left 590) python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker128.json talker \
    --batches 1,128 --profile-batch 128 --prefill-iters 3 > $R/talker128.log 2>&1
  echo "talker128 rc=$? after ${SECONDS} s"; grep -E '^\{"batch"' $R/talker128.log | head -4
  echo "phase c done after ${SECONDS} s"
  ;;
d)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip_d.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git log --oneline -1; } > $R/machine_d.txt 2>&1
  { python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt06_d.log 2>&1
    python3 -m vllm_qwen3tts.cli make-checkpoint --variant 1.7b-custom_voice --scale full --out /tmp/ck1.7b > $R/ckpt17_d.log 2>&1; } &
  timeout 120 python3 tests/test_predictor_kernels.py cuda attention > $R/kernels_check_d.txt 2>&1; echo "attention check rc=$?"
  timeout 120 python3 tests/test_predictor_kernels.py cuda layer >> $R/kernels_check_d.txt 2>&1; echo "layer check rc=$?"
  grep -E "max diff|Error" $R/kernels_check_d.txt | tail -6
  for mb in 0 256; do
    timeout 60 python3 benchmarks/predictor_attention.py --batches 1,128 --warps 1,2,4 --flush-mb $mb \
      --out $R/predictor_attention_flush$mb.json > $R/predictor_attention_flush$mb.log 2>&1; echo "attention timing (flush $mb MB) rc=$?"
    grep -E '^\| [0-9]+ \|' $R/predictor_attention_flush$mb.log
  done
  pack
  wait  # the checkpoints
  echo "checkpoints after ${SECONDS} s"
  timeout 170 python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b --out $R/talker_d.json talker --batches 1,2,128 \
    --profile-batch 1 --prefill-iters 3 > $R/talker_d.log 2>&1
  echo "talker rc=$? after ${SECONDS} s"; grep -E '^\{"batch"|one_frame_ms_median' $R/talker_d.log | head -5
  grep -E "_token_attention_kernel|_small_linear_kernel|_sample_kernel" $R/talker_d.tables.txt | head -3
  pack
  OMNI=0 FM17=1 OURS17=0 START_WAIT_S=$(left 470) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/md
  echo "phase d done after ${SECONDS} s"
  ;;
e)
  for i in $(seq 1 30); do
    curl -sf --max-time 2 http://127.0.0.1:8765/health >/dev/null && curl -sf --max-time 2 http://127.0.0.1:8768/health >/dev/null && break
    sleep 2
  done
  OURS17=0 FM17=1 RAMP_S=0 TAG=c1x16 timeout 50 bash benchmarks/gpu_matrix.sh measure $R/md "--concurrency 1 --rounds 16" ours06
  OURS17=0 FM17=1 RAMP_S=0 TAG=1rps90 timeout 115 bash benchmarks/gpu_matrix.sh measure $R/md "--rates 1 --duration 90" ours17fm
  ;;
esac
pack
