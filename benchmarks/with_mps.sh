#!/usr/bin/env bash
# Run a command with CUDA MPS on: an MPS control daemon private to this run (its pipe and log
# directories under /tmp), started before and told to quit after. Under MPS the kernels of the
# engine process and the codec worker process share the GPU's SMs at the same time instead of
# taking turns in time slices (benchmarks/NOTES.md §9). Changes no GPU setting.
#   benchmarks/with_mps.sh benchmarks/gpu_load.sh CKPT OUT LABEL "<levels>" [serve args...]
set -uo pipefail
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/qwen3tts-mps/pipe}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/qwen3tts-mps/log}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || { echo "could not start the MPS control daemon"; exit 1; }
echo "MPS control daemon started"
"$@"
rc=$?
echo quit | nvidia-cuda-mps-control
exit $rc
