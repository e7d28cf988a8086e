#!/usr/bin/env bash
# The speech server on a GPU (vLLM 0.26, Model Runner V2): start it, call it with the OpenAI
# SDK examples, check the audio. Usage: benchmarks/gpu_server_smoke.sh CHECKPOINT_DIR OUT_DIR
set -uo pipefail
model=$1; out=$2; port=8765
python3 -m vllm_qwen3tts.cli serve --model "$model" --port $port --host 127.0.0.1 --gpu-memory-utilization 0.5 \
  > "$out/server.log" 2>&1 &
pid=$!
for i in $(seq 1 150); do
  sleep 2
  curl -sf localhost:$port/ready >/dev/null && break
  kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 "$out/server.log"; exit 1; }
done
curl -s localhost:$port/ready; echo
python3 examples/speech.py --base-url http://127.0.0.1:$port/v1 --out "$out/hello.wav"
python3 examples/speech_stream.py --base-url http://127.0.0.1:$port/v1 --out "$out/stream.pcm"
python3 examples/websocket_client.py --url ws://127.0.0.1:$port/v1/audio/speech/stream --out "$out/ws.pcm" | tail -2
python3 - "$out" <<'PY'
import sys, soundfile as sf, os
out = sys.argv[1]
a, sr = sf.read(f"{out}/hello.wav"); print("hello.wav", sr, len(a) / sr, "s")
for f in ("stream.pcm", "ws.pcm"):
    print(f, os.path.getsize(f"{out}/{f}") / 2 / 24000, "s")
PY
grep -E "Route|speech endpoints|Loaded endpoint plugin|Using V2|frame-completion" "$out/server.log" | head -8
kill $pid; wait $pid 2>/dev/null
