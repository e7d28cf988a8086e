"""WebSocket streaming: send text as it is produced (an LLM's tokens), get audio back while it is written.

    python examples/websocket_client.py --out ws.pcm                       # token mode (the default)
    python examples/websocket_client.py --min-text-tokens 8 --out ws.pcm   # a lead of 8 text tokens
    python examples/websocket_client.py --text-mode sentence --out ws.pcm  # a request per sentence

The text is fed as an LLM would write it: pieces of a few characters (cut inside words too) at
--pieces-per-second. In token mode each utterance is one request that starts speaking at its
first words (or once --min-text-tokens of them are final) and takes the rest as it comes; in
sentence mode each complete sentence is a request of its own.

Messages (JSON text frames, audio as binary frames):
  client -> server  {"type": "session.config", "text_mode": "token", "voice": "vivian", "response_format": "pcm", ...}
                    {"type": "input.text", "text": "partial text"}   (repeat)
                    {"type": "input.flush"}   (token mode: this utterance's text is complete)
                    {"type": "input.clear"}   (token mode: stop speaking, drop the queued text)
                    {"type": "input.done"}
  server -> client  {"type": "session.created", "sample_rate": 24000, "response_format": "pcm", "text_mode": ...}
                    {"type": "audio.start", "sentence_index": i, ...}
                    <binary audio>...
                    {"type": "audio.done", "sentence_index": i, "audio_seconds": 1.23, ...}
                    {"type": "session.done", "usage": {...}}
                    {"type": "error", "error": {...}}   (a bad message or an utterance that failed)
"""

import argparse
import asyncio
import json
import random
import time

import websockets


def llm_pieces(text: str, seed: int = 0):
    """`text` in pieces of 1-6 characters, as a tokenizer-less stand-in for an LLM's output."""
    rng, i = random.Random(seed), 0
    while i < len(text):
        n = rng.randint(1, 6)
        yield text[i:i + n]
        i += n


async def main(args) -> None:
    url = args.url + (f"?api_key={args.api_key}" if args.api_key else "")
    async with websockets.connect(url, max_size=None) as ws, asyncio.TaskGroup() as tg:
        lead = {"min_text_tokens": args.min_text_tokens} if args.text_mode == "token" else {}
        await ws.send(json.dumps({"type": "session.config", "text_mode": args.text_mode, "voice": args.voice,
                                  "response_format": "pcm", **lead}))
        started = time.perf_counter()

        async def send_text():
            for piece in llm_pieces(args.text):
                await ws.send(json.dumps({"type": "input.text", "text": piece}))
                await asyncio.sleep(1 / args.pieces_per_second)
            await ws.send(json.dumps({"type": "input.done"}))
            print(f"text complete after {time.perf_counter() - started:.2f} s")

        tg.create_task(send_text())
        first_audio = None
        with open(args.out, "wb") as out:
            async for message in ws:
                if isinstance(message, bytes):
                    if first_audio is None:
                        first_audio = time.perf_counter() - started
                        print(f"first audio after {first_audio:.2f} s")
                    out.write(message)
                    continue
                event = json.loads(message)
                print(event)
                if event["type"] in ("session.done", "error"):
                    break


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="ws://localhost:8000/v1/audio/speech/stream")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--voice", default="vivian")
    ap.add_argument("--text-mode", choices=["token", "sentence"], default="token")
    ap.add_argument("--min-text-tokens", type=int, default=0, help="token mode: text tokens buffered first")
    ap.add_argument("--pieces-per-second", type=float, default=30.0)
    ap.add_argument("--text", default="Text arrives a few characters at a time, as an LLM writes it. "
                                      "The voice starts speaking before the sentence is finished.")
    ap.add_argument("--out", default="ws.pcm")
    asyncio.run(main(ap.parse_args()))
