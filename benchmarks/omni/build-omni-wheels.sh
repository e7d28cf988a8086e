#!/usr/bin/env bash
# Packs vllm-omni 0.26.0 and the few wheels it needs beyond the GPU kit (see README.md) into
# one tar, kept apart from .gpukit/part-* so that our own server runs never see vllm-omni
# (its `vllm.general_plugins` entry point would otherwise load into every vLLM process).
#
#   benchmarks/omni/build-omni-wheels.sh [OUT_TAR]      (default: .gpukit/omni-wheels.tar, ~14 MB)
#
# Run from the project's root on the developer machine (needs PyPI). .gpukit/ is git-excluded,
# so the tar travels only when a device call names it in `carry`.
set -euo pipefail
out=${1:-.gpukit/omni-wheels.tar}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Everything vllm-omni imports on the Qwen3-TTS serving path that the kit/GPU machine lacks.
pins=(vllm-omni==0.26.0 aenum==3.1.16 omegaconf==2.3.0 janus==2.0.0 prettytable==3.18.0
      wcwidth==0.9.4 diffusers==0.38.0 torchaudio==2.11.0)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/wheels"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp/wheels" "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)
# omegaconf needs antlr4-python3-runtime==4.9.*, which PyPI has only as an sdist: build the
# (pure-Python) wheel here.
python3 -m pip wheel -q --no-deps -w "$tmp/wheels" antlr4-python3-runtime==4.9.3 2> >(grep -v "^WARNING: Location" >&2)
mkdir -p "$(dirname "$out")"
tar cf "$out" -C "$tmp" wheels
echo "omni wheels: $(ls "$tmp/wheels" | wc -l) wheels, $(du -h "$out" | cut -f1) in $out" >&2
