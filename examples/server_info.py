"""What a running server says about itself: /health, /ready, the models it serves (/v1/models,
through the OpenAI SDK) and its speech metrics (/metrics; both take a key when the server has keys).

    python examples/server_info.py --base-url http://localhost:8000/v1
"""

import argparse

import httpx
from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://localhost:8000/v1")
ap.add_argument("--api-key", default="none")
args = ap.parse_args()

root = args.base_url.removesuffix("/").removesuffix("/v1")
for probe in ("health", "ready"):  # 503 with the reason when not (e.g. warming up, draining for a shutdown)
    r = httpx.get(f"{root}/{probe}", timeout=10)
    print(f"{probe}: {r.status_code} {r.text}")

for model in OpenAI(base_url=args.base_url, api_key=args.api_key).models.list():
    print(f"model: {model.id}")

metrics = httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {args.api_key}"}, timeout=10)
metrics.raise_for_status()
for line in metrics.text.splitlines():
    if line.startswith(("qwen3tts_requests_total", "qwen3tts_requests_in_flight", "qwen3tts_audio_seconds_total")):
        print(line)
