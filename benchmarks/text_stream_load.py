"""Issue 22's benchmark: text fed into the WebSocket as an LLM writes it (token mode), against
one-shot streams of the same lengths.

Each session opens `/v1/audio/speech/stream` in token mode, sends a bundled prompt cut where a
real tokenizer cuts it (the checkpoint's own, `--tokenizer`), one token's text per piece at
`--rates` tokens per second, then `input.done`, and records when every audio frame arrived.
Every utterance is forced to `--frames` frames (random weights never stop by themselves).
Per level (rate x sessions) it reports:
- first audio: from the first piece's sending to the first audio bytes (p50/p95);
- playback gaps after the first audio (`http_load.play`: a player that starts at the first
  chunk and waits when it runs dry): sessions with a gap, total seconds stalled;
- audio-seconds per second of all sessions together.
`--oneshot N` adds N one-shot streams (`POST /v1/audio/speech`, streaming PCM, the whole text
at once, same frames) for the throughput comparison.

    python benchmarks/text_stream_load.py --url http://127.0.0.1:8000 --tokenizer CKPT \\
        --rates 5,15,50 --sessions 1,32 --throughput-sessions 64 --frames 300 --out results/ts.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_load import BYTES_PER_SECOND, PROMPTS, load_prompts, play  # noqa: E402


@dataclass
class Session:
    rate: float
    tokens: int
    first_piece_s: float | None = None
    ttfa_s: float | None = None  # from the first piece's sending
    audio_s: float = 0.0
    underruns: int = 0
    stall_s: float = 0.0
    error: str | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list, repr=False)


def token_pieces(tokenizer, text: str) -> list[str]:
    """`text` cut at its token boundaries (each piece one token's text, as an LLM streams it)."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    cuts = [start for start, _ in enc["offset_mapping"]][1:] + [len(text)]
    pieces, last = [], 0
    for cut in cuts:
        if cut > last:
            pieces.append(text[last:cut])
            last = cut
    return pieces


def texts_of(prompts: list[str], tokenizer, min_tokens: int) -> list[str]:
    """The bundled prompts joined in order into texts of at least `min_tokens` tokens each (an
    LLM's answer is longer than one sentence)."""
    texts, text = [], ""
    for p in prompts:
        text = f"{text} {p}" if text else p
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= min_tokens:
            texts.append(text)
            text = ""
    return texts or [text]


async def one_session(url: str, api_key: str | None, voice: str, pieces: list[str], rate: float, frames: int,
                      t0: float) -> Session:
    import websockets

    s = Session(rate=rate, tokens=len(pieces))
    try:
        async with websockets.connect(url + (f"?api_key={api_key}" if api_key else ""), max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.config", "text_mode": "token", "voice": voice,
                                      "response_format": "pcm", "max_new_tokens": frames, "min_new_tokens": frames}))

            async def send_text():
                start = time.perf_counter()
                s.first_piece_s = start - t0
                for i, piece in enumerate(pieces):
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send(json.dumps({"type": "input.text", "text": piece}))
                await ws.send(json.dumps({"type": "input.done"}))

            sender = asyncio.create_task(send_text())
            async for message in ws:
                now = time.perf_counter() - t0
                if isinstance(message, bytes):
                    s.arrivals.append((now, len(message)))
                    continue
                event = json.loads(message)
                if event["type"] == "error":
                    s.error = json.dumps(event)[:300]
                    break
                if event["type"] == "session.done":
                    break
            await sender
    except Exception as e:  # noqa: BLE001  a failed session is counted, not fatal
        s.error = repr(e)[:300]
    if s.arrivals and s.first_piece_s is not None:
        s.ttfa_s = s.arrivals[0][0] - s.first_piece_s
        s.audio_s = sum(n for _, n in s.arrivals) / BYTES_PER_SECOND
        s.underruns, s.stall_s = play(s.arrivals)
    return s


async def one_shot(base: str, api_key: str | None, voice: str, text: str, frames: int, t0: float) -> Session:
    import httpx

    s = Session(rate=0.0, tokens=0)
    body = {"input": text, "voice": voice, "response_format": "pcm", "stream_format": "audio",
            "max_new_tokens": frames, "min_new_tokens": frames}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            s.first_piece_s = time.perf_counter() - t0
            async with client.stream("POST", f"{base}/v1/audio/speech", json=body, headers=headers) as r:
                r.raise_for_status()
                async for data in r.aiter_bytes():
                    s.arrivals.append((time.perf_counter() - t0, len(data)))
    except Exception as e:  # noqa: BLE001
        s.error = repr(e)[:300]
    if s.arrivals:
        s.ttfa_s = s.arrivals[0][0] - s.first_piece_s
        s.audio_s = sum(n for _, n in s.arrivals) / BYTES_PER_SECOND
        s.underruns, s.stall_s = play(s.arrivals)
    return s


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(name: str, sessions: list[Session], wall_s: float) -> dict:
    ok = [s for s in sessions if s.error is None and s.ttfa_s is not None]
    ttfa = [1000 * s.ttfa_s for s in ok]
    return {
        "level": name, "sessions": len(sessions), "errors": len(sessions) - len(ok),
        "ttfa_ms_p50": pct(ttfa, 50), "ttfa_ms_p95": pct(ttfa, 95), "ttfa_ms_max": max(ttfa, default=None),
        "with_gap": sum(s.underruns > 0 for s in ok), "stall_s_total": round(sum(s.stall_s for s in ok), 3),
        "stall_s_mean": round(statistics.fmean([s.stall_s for s in ok]), 3) if ok else None,
        "audio_s": round(sum(s.audio_s for s in ok), 2), "wall_s": round(wall_s, 2),
        "audio_s_per_s": round(sum(s.audio_s for s in ok) / wall_s, 2) if wall_s > 0 else None,
        "first_errors": [s.error for s in sessions if s.error][:3],
    }


async def level(args, name: str, n: int, make) -> dict:
    t0 = time.perf_counter()
    sessions = await asyncio.gather(*(make(i, t0) for i in range(n)))
    out = summarize(name, list(sessions), time.perf_counter() - t0)
    print(json.dumps(out), flush=True)
    return out


async def main(args) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = texts_of(load_prompts(args.prompts), tokenizer, args.min_tokens)
    cut = [token_pieces(tokenizer, p) for p in prompts]
    ws_url = args.url.replace("http", "ws", 1) + "/v1/audio/speech/stream"
    results = []

    def stream_maker(rate: float):
        return lambda i, t0: one_session(ws_url, args.api_key, args.voice, cut[i % len(cut)], rate, args.frames, t0)

    await level(args, "warm-up", 2, stream_maker(50.0))
    for rate in args.rates:
        for n in args.sessions:
            results.append(await level(args, f"token mode, {rate:g} tokens/s, {n} sessions", n, stream_maker(rate)))
    if args.throughput_sessions:
        n = args.throughput_sessions
        results.append(await level(args, f"token mode, {args.throughput_rate:g} tokens/s, {n} sessions", n,
                                   stream_maker(args.throughput_rate)))
        results.append(await level(args, f"one-shot streams, {n}", n, lambda i, t0: one_shot(
            args.url, args.api_key, args.voice, prompts[i % len(prompts)], args.frames, t0)))
    print("\n| level | sessions | first audio p50 / p95 ms | sessions with a gap | stalled s | audio-s/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        p50, p95 = (f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("ttfa_ms_p50", "ttfa_ms_p95"))
        print(f"| {r['level']} | {r['sessions']} | {p50} / {p95} | {r['with_gap']} | {r['stall_s_total']} | "
              f"{r['audio_s_per_s']} | {r['errors']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"label": args.label, "frames": args.frames, "command": sys.argv,
                                              "levels": results}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tokenizer", required=True, help="the checkpoint directory (its text tokenizer cuts the text)")
    ap.add_argument("--voice", default="vivian")
    ap.add_argument("--prompts", type=Path, default=PROMPTS)
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[5.0, 15.0, 50.0])
    ap.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--throughput-sessions", type=int, default=64)
    ap.add_argument("--throughput-rate", type=float, default=50.0)
    ap.add_argument("--frames", type=int, default=300,
                    help="frames per request, forced (a long utterance continues in a new request once its text nears a fifth of them)")
    ap.add_argument("--min-tokens", type=int, default=40, help="text tokens per session at least")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    asyncio.run(main(ap.parse_args()))
