#!/usr/bin/env bash
# The device calls of the fourth 2026-12-04 session (one H200), in order, each after the GPU kit's
# parts were sent (`source .gpukit/setup.sh` in each). Everything lands in /tmp/r and comes back as
# one tarball per call.
#   a: install; the predictor's kernels against PyTorch on the GPU; the rewritten small-batch
#      projections against cuBLAS from HBM (predictor_linear.py, with a launch-shape sweep and one
#      whole token step); the token attention at small batches by warps; then ours 0.6B started
#      alone, with the stack sampler (paused)
#   b: ours 0.6B measured alone (c=1, 64, 128 at once, then ramped; then 128 ramped again with the
#      stack sampler and the process monitor: where 128 streams lose their first audio); stopped;
#      if phase a found the small-batch kernels faster at batch 1, the talker in-process with them
#      up to the rows where they won, and without; greedy parity against the reference in FULL
#      mode and bf16 (with those rows)
#   c (a fresh machine, after the small-batch kernels became the default up to 2 rows, the CPU
#      generator fix and the load generator's connection columns): ours 0.6B (defaults) and ours
#      1.7B with --mps and FULL graphs started together; 0.6B at c=1 and 128 (at once, then
#      ramped); 1.7B at c=1, 1 and 20 req/s
set -uo pipefail
phase=$1
R=/tmp/r; mkdir -p $R
pack() { tar czf "$OUT/$phase.tgz" -C $R . 2>/dev/null; }
left() { echo $(( $1 - SECONDS )); }  # seconds until $1 s into this call
case $phase in
a)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm, uvloop; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__, 'uvloop', uvloop.__version__)"
    nproc; git log --oneline -1; git status --short | head -20; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt06.log 2>&1 &
  timeout 150 python3 tests/test_predictor_kernels.py cuda all > $R/kernels_check.txt 2>&1; echo "kernels check rc=$?"
  tail -6 $R/kernels_check.txt
  timeout 240 env QWEN3TTS_SMALL_BATCH_ROWS=64 python3 benchmarks/predictor_linear.py --batches 1,2,4,8,16,32,64 \
    --sweep-batches 1,16 --out $R/predictor_linear.json > $R/predictor_linear.log 2>&1
  echo "linear rc=$? after ${SECONDS} s"; grep -A80 '^| batch | projection | small' $R/predictor_linear.log | head -70
  grep -A12 '^| batch | token step' $R/predictor_linear.log
  pack
  timeout 90 python3 benchmarks/predictor_attention.py --batches 1,2,4,8,16,32,128 --warps 1,2,4,8 --bandwidth-gbs 4800 \
    --out $R/predictor_attention.json > $R/predictor_attention.log 2>&1
  grep -A40 '^| batch | impl' $R/predictor_attention.log | head -40
  wait  # the checkpoint
  pack
  OMNI=0 OURS17=0 STACKS=1 START_WAIT_S=$(left 580) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck0.6b $R/m
  grep -E "^starting:|Model loading took|torch.compile took|Available KV|init engine|CUDA graphs captured|speech service ready" \
    $R/m/ours06_server.log > $R/m/ours06_startup_lines.txt 2>/dev/null
  echo "phase a done after ${SECONDS} s"
  ;;
b)
  curl -sf http://127.0.0.1:8765/ready >/dev/null || for _ in $(seq 60); do sleep 3; curl -sf http://127.0.0.1:8765/ready >/dev/null && break; done
  OURS17=0 DIAG="--concurrency 128 --rounds 3 --ramp-s 2" timeout $(left 240) bash benchmarks/gpu_matrix.sh measure $R/m \
    "--concurrency 1,64,128 --rounds 2" ours06
  OURS17=0 bash benchmarks/gpu_matrix.sh stop $R/m; sleep 6
  pack
  ROWS=$(python3 -c "
import json
steps = json.load(open('$R/predictor_linear.json'))['token_step']
rows = 0
for s in steps:
    if s['fused_us'] >= s['compiled_pytorch_us']: break
    rows = s['batch']
print(rows)" 2>/dev/null || echo 0)
  echo "small-batch kernels win up to $ROWS rows" | tee $R/rows.txt
  if [ "$ROWS" != 0 ]; then
    for rows in $ROWS 0; do
      timeout $(left 420) env QWEN3TTS_SMALL_BATCH_ROWS=$rows python3 benchmarks/profile_pipeline.py --model /tmp/ck0.6b \
        --out $R/talker_rows$rows.json talker --batches 1,4,16 --profile-batch 0 --prefill-iters 5 > $R/talker_rows$rows.log 2>&1
      grep -E '^\{"batch"|one_frame|two_frames' $R/talker_rows$rows.log | head -6
    done
  fi
  pack
  timeout $(left 590) env QWEN3TTS_SMALL_BATCH_ROWS=$ROWS python3 benchmarks/talker_gpu_check.py \
    --runs float32:64:full,bfloat16:64 --copies 4 --out $R/talker_check.json > $R/talker_check.log 2>&1
  echo "parity rc=$?"; grep -E "chunk|identical|match" $R/talker_check.log | tail -6
  echo "phase b done after ${SECONDS} s"
  ;;
c)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
    echo "somaxconn $(cat /proc/sys/net/core/somaxconn) syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
    git log --oneline -1; git status --short | head -20; } > $R/machine.txt 2>&1
  cat $R/machine.txt
  python3 -m vllm_qwen3tts.cli make-checkpoint --variant 0.6b-custom_voice --scale full --out /tmp/ck0.6b > $R/ckpt06.log 2>&1 &
  python3 -m vllm_qwen3tts.cli make-checkpoint --variant 1.7b-custom_voice --scale full --out /tmp/ck1.7b > $R/ckpt17.log 2>&1
  wait
  echo "checkpoints after ${SECONDS} s"
  OMNI=0 FM17=1 OURS17=0 START_WAIT_S=$(left 330) bash benchmarks/gpu_matrix.sh start /tmp/ck0.6b /tmp/ck1.7b $R/m
  pack
  OURS17=0 FM17=1 timeout $(left 450) bash benchmarks/gpu_matrix.sh measure $R/m "--concurrency 1,128 --rounds 2" ours06
  pack
  OURS17=0 FM17=1 RAMP_S=0 timeout $(left 585) bash benchmarks/gpu_matrix.sh measure $R/m \
    "--concurrency 1 --rounds 3 --rates 1,20 --duration 15" ours17fm
  echo "phase c done after ${SECONDS} s"
  ;;
esac
pack
