"""Streaming with the OpenAI SDK: audio bytes are written to a file as they are generated.

    python examples/speech_stream.py --text "A longer text. It streams sentence by sentence." --out stream.pcm
    ffplay -f s16le -ar 24000 -ac 1 stream.pcm   # raw 16-bit mono PCM at 24 kHz
"""

import argparse
import time

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://localhost:8000/v1")
ap.add_argument("--api-key", default="none")
ap.add_argument("--text", default="Streaming starts as soon as the first frames are decoded. The rest follows.")
ap.add_argument("--voice", default="vivian")
ap.add_argument("--format", default="pcm", choices=["pcm", "wav", "mp3", "opus", "aac", "flac"])
ap.add_argument("--out", default="stream.pcm")
args = ap.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
start = time.perf_counter()
first = None
with client.audio.speech.with_streaming_response.create(
    model="tts-1", voice=args.voice, input=args.text, response_format=args.format, stream_format="audio",
) as response, open(args.out, "wb") as out:
    for chunk in response.iter_bytes():
        if first is None:
            first = time.perf_counter() - start
        out.write(chunk)
print(f"first audio after {first * 1000:.0f} ms; wrote {args.out}")
