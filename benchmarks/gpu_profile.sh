#!/usr/bin/env bash
# Stage profile on a GPU: codec decoder alone, talker + code predictor alone (with a torch
# profile). Usage: benchmarks/gpu_profile.sh CHECKPOINT OUT_DIR
set -uo pipefail
model=$1; out=$2
mkdir -p "$out"
python3 benchmarks/profile_pipeline.py --model "$model" --out "$out/codec.json" codec --batches 1,16,64,128 --chunks 2,25 \
  2>&1 | grep -v "^WARNING" | tail -12
python3 benchmarks/profile_pipeline.py --model "$model" --out "$out/talker.json" talker --batches 1,64,128 \
  > "$out/talker.log" 2>&1
grep -E '^\{"batch"' "$out/talker.log"; grep -A12 '"stages"' "$out/talker.log" | head -30
head -32 "$out/talker.tables.txt"
