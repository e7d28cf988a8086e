"""Server-sent events with the OpenAI SDK: the audio arrives as base64 `speech.audio.delta` events,
then `speech.audio.done` carries the usage (a failure after the first audio: `speech.audio.error`).

    python examples/speech_sse.py --text "Streamed as events." --out sse.pcm
    ffplay -f s16le -ar 24000 -ac 1 sse.pcm   # raw 16-bit mono PCM at 24 kHz
"""

import argparse
import base64
import json

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://localhost:8000/v1")
ap.add_argument("--api-key", default="none")
ap.add_argument("--text", default="Each piece of audio comes as an event. The last one says how much was spoken.")
ap.add_argument("--voice", default="vivian")
ap.add_argument("--format", default="pcm", choices=["pcm", "wav", "mp3", "opus", "aac", "flac"])
ap.add_argument("--out", default="sse.pcm")
args = ap.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
with client.audio.speech.with_streaming_response.create(
    model="tts-1", voice=args.voice, input=args.text, response_format=args.format, stream_format="sse",
) as response, open(args.out, "wb") as out:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue  # the `event:` lines and the blank lines between events
        event = json.loads(line[len("data: "):])
        if event["type"] == "speech.audio.delta":
            out.write(base64.b64decode(event["audio"]))
        elif event["type"] == "speech.audio.done":
            print(f"done: {event['usage']}")
        elif event["type"] == "speech.audio.error":
            raise SystemExit(f"the stream failed: {event['error']}")
print(f"wrote {args.out}")
