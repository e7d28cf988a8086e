"""WebSocket streaming: send text as it is produced (e.g. an LLM's tokens), get audio per sentence.

    python examples/websocket_client.py --out ws.pcm

Messages (JSON text frames, audio as binary frames):
  client -> server  {"type": "session.config", "voice": "vivian", "response_format": "pcm", ...}
                    {"type": "input.text", "text": "partial text"}   (repeat)
                    {"type": "input.done"}
  server -> client  {"type": "session.created", "sample_rate": 24000, "response_format": "pcm"}
                    {"type": "audio.start", "sentence_index": i, "text": "..."}
                    <binary audio>...
                    {"type": "audio.done", "sentence_index": i, "audio_seconds": 1.23}
                    {"type": "session.done", "usage": {...}}
                    {"type": "error", "error": {...}}   (a bad message or a sentence that failed)
"""

import argparse
import asyncio
import json

import websockets


async def main(args) -> None:
    url = args.url + (f"?api_key={args.api_key}" if args.api_key else "")
    words = args.text.split(" ")
    async with websockets.connect(url, max_size=None) as ws, asyncio.TaskGroup() as tg:
        await ws.send(json.dumps({"type": "session.config", "voice": args.voice, "response_format": "pcm"}))

        async def send_text():
            for word in words:  # as an LLM would, a few tokens at a time
                await ws.send(json.dumps({"type": "input.text", "text": word + " "}))
                await asyncio.sleep(0.01)
            await ws.send(json.dumps({"type": "input.done"}))

        tg.create_task(send_text())
        with open(args.out, "wb") as out:
            async for message in ws:
                if isinstance(message, bytes):
                    out.write(message)
                    continue
                event = json.loads(message)
                print(event)
                if event["type"] == "session.done":
                    break


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="ws://localhost:8000/v1/audio/speech/stream")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--voice", default="vivian")
    ap.add_argument("--text", default="Text arrives word by word. Each sentence is spoken as soon as it is complete.")
    ap.add_argument("--out", default="ws.pcm")
    asyncio.run(main(ap.parse_args()))
