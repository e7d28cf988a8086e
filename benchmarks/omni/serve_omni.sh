#!/usr/bin/env bash
# Starts vllm-omni 0.26.0 (Qwen3-TTS: talker -> code2wav, both stages on GPU 0) on the GPU machine
# and returns once it answers /health. The server keeps running in the background.
#
#   benchmarks/omni/serve_omni.sh CKPT_DIR PORT [LOG_DIR]
#
# Needs: the GPU kit unpacked (`source .gpukit/setup.sh` -> /tmp/site/.ready) and the tar from
# benchmarks/omni/build-omni-wheels.sh carried in this call or an earlier one on the same warm
# machine (first run installs it into $OMNI_SITE). Stop with:  kill -- -$(cat LOG_DIR/omni.pgid)
#
# Environment knobs (defaults = vllm-omni's deploy/qwen3_tts.yaml):
#   OMNI_WHEELS=.gpukit/omni-wheels.tar   OMNI_SITE=/tmp/omni-site   KIT_SITE=/tmp/site
#   OMNI_GPU_MEM0=0.3 OMNI_GPU_MEM1=0.3   gpu_memory_utilization of talker / code2wav
#   OMNI_MAX_NUM_SEQS0=64 OMNI_MAX_NUM_SEQS1=64
#   OMNI_FIXED_FRAMES=N                   talker min_tokens=max_tokens=N (EOS masked until N,
#                                         like our --frames); unset = stop at EOS (min_tokens 2)
#   OMNI_READY_TIMEOUT=600                seconds to wait for /health
#   OMNI_SMOKE=1                          after start-up, one streaming PCM request (prints TTFB)
set -uo pipefail
ckpt=$(cd "${1:?usage: serve_omni.sh CKPT_DIR PORT [LOG_DIR]}" && pwd)
port=${2:?usage: serve_omni.sh CKPT_DIR PORT [LOG_DIR]}
logdir=${3:-${OUT:-/tmp}/omni}
root=$(pwd)
mkdir -p "$logdir" && logdir=$(cd "$logdir" && pwd)
wheels=${OMNI_WHEELS:-$root/.gpukit/omni-wheels.tar}
osite=${OMNI_SITE:-/tmp/omni-site}
ksite=${KIT_SITE:-/tmp/site}

[ -f "$ksite/.ready" ] || { echo "serve_omni: GPU kit not unpacked ($ksite/.ready missing): source .gpukit/setup.sh first" >&2; exit 1; }
if [ ! -f "$osite/.ready" ]; then
  [ -f "$wheels" ] || { echo "serve_omni: $wheels not here: carry it (benchmarks/omni/build-omni-wheels.sh)" >&2; exit 1; }
  t=$(mktemp -d) && tar xf "$wheels" -C "$t"
  # Keep the machine's own torchaudio if it has one (it must match its torch build).
  if python3 -c "import torchaudio" 2>/dev/null; then rm -f "$t"/wheels/torchaudio-*.whl; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$osite" "$t"/wheels/*.whl \
    && touch "$osite/.ready" && echo "serve_omni: vllm-omni installed into $osite"
  rm -rf "$t"
  [ -f "$osite/.ready" ] || exit 1
fi

# Only vllm-omni + the kit on the path (not the project root, so our package is not importable),
# and only vllm-omni's plugin: our `qwen3_tts`/`qwen3_tts_speech` entry points are skipped even if
# `pip install -e .` ran earlier on this machine.
export PYTHONPATH="$osite:$ksite"
export VLLM_PLUGINS=vllm_omni_register_models
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_SKIP_MODEL_NAME_VALIDATION=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

deploy="$logdir/qwen3_tts_deploy.yaml"
python3 - "$deploy" <<'PY' || exit 1
import os, sys, yaml, vllm_omni
src = os.path.join(os.path.dirname(vllm_omni.__file__), "deploy", "qwen3_tts.yaml")
d = yaml.safe_load(open(src))
s0, s1 = sorted(d["stages"], key=lambda s: s["stage_id"])
e = os.environ.get
s0["gpu_memory_utilization"] = float(e("OMNI_GPU_MEM0", s0["gpu_memory_utilization"]))
s1["gpu_memory_utilization"] = float(e("OMNI_GPU_MEM1", s1["gpu_memory_utilization"]))
s0["max_num_seqs"] = int(e("OMNI_MAX_NUM_SEQS0", s0["max_num_seqs"]))
s1["max_num_seqs"] = int(e("OMNI_MAX_NUM_SEQS1", s1["max_num_seqs"]))
if e("OMNI_FIXED_FRAMES"):
    n = int(e("OMNI_FIXED_FRAMES"))
    s0["default_sampling_params"].update(min_tokens=n, max_tokens=n)
yaml.safe_dump(d, open(sys.argv[1], "w"), sort_keys=False)
print("serve_omni: deploy", {k: (s0[k], s1[k]) for k in ("gpu_memory_utilization", "max_num_seqs")},
      "talker sampling", s0["default_sampling_params"])
PY

cd /tmp  # `python -m` puts the cwd on sys.path: keep the project tree off it
setsid python3 -m vllm.entrypoints.cli.main serve "$ckpt" --omni --host 127.0.0.1 --port "$port" \
  --deploy-config "$deploy" --stage-init-timeout 540 > "$logdir/omni_server.log" 2>&1 &
pid=$!
sleep 1
pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
[ "$pgid" = "$pid" ] || echo "serve_omni: warning: server is not its own process group ($pgid)" >&2
echo "$pid" > "$logdir/omni.pgid"
cd "$root"
start=$(date +%s)
until curl -sf --max-time 2 "http://127.0.0.1:$port/health" >/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "serve_omni: server exited during start-up" >&2; tail -40 "$logdir/omni_server.log" >&2; exit 1
  fi
  if [ $(( $(date +%s) - start )) -gt "${OMNI_READY_TIMEOUT:-600}" ]; then
    echo "serve_omni: not ready after ${OMNI_READY_TIMEOUT:-600}s" >&2; tail -40 "$logdir/omni_server.log" >&2
    kill -- -"$(cat "$logdir/omni.pgid")" 2>/dev/null; exit 1
  fi
  sleep 2
done
echo "serve_omni: ready on port $port after $(( $(date +%s) - start )) s (pgid $(cat "$logdir/omni.pgid"), log $logdir/omni_server.log)"

if [ "${OMNI_SMOKE:-1}" = 1 ]; then
  frames=${OMNI_FIXED_FRAMES:-100}
  curl -s -o "$logdir/smoke.pcm" -w "serve_omni: smoke http=%{http_code} ttfb=%{time_starttransfer}s total=%{time_total}s bytes=%{size_download}\n" \
    -H 'Content-Type: application/json' "http://127.0.0.1:$port/v1/audio/speech" \
    -d '{"input":"Hello from vllm-omni, streaming raw PCM.","voice":"vivian","language":"English","task_type":"CustomVoice","response_format":"pcm","stream":true,"stream_format":"audio","max_new_tokens":'"$frames"'}'
  echo "serve_omni: smoke audio $(python3 -c "import os;print(os.path.getsize('$logdir/smoke.pcm')/48000)") s (int16 mono 24 kHz)"
fi
