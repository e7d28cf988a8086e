"""In-process engine benchmark: audio-seconds per second and time to first audio at
fixed concurrency, through TTSEngine (vLLM talker + codec worker), no HTTP.

Random weights never say when to stop, so every request is forced to the same
length (EOS masked until `--frames`). Prints a table and writes JSON.

    python benchmarks/engine_throughput.py --model DIR --concurrency 1,16,64 --frames 250 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the band plays on.",
    "Please remember to bring your umbrella, the forecast says rain this afternoon.",
    "今天的会议改到下午三点，请大家准时参加。",
    "We measured the latency of every request and plotted it against the load.",
]


async def run_level(tts, concurrency: int, frames: int, requests_per_level: int, speaker: str | None, seed0: int) -> dict:
    from vllm_qwen3tts.engine import SynthesisParams, SynthesisRequest

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests_per_level):
        queue.put_nowait(i)
    ttfa, e2e, audio_s = [], [], []

    async def client():
        while not queue.empty():
            i = queue.get_nowait()
            req = SynthesisRequest(text=TEXTS[i % len(TEXTS)], speaker=speaker,
                                   params=SynthesisParams(max_frames=frames, min_frames=frames, seed=seed0 + i))
            t0 = time.perf_counter()
            first = None
            samples = 0
            async for chunk in tts.stream(req):
                if first is None and chunk.audio.size:
                    first = time.perf_counter() - t0
                samples += chunk.audio.size
            e2e.append(time.perf_counter() - t0)
            ttfa.append(first)
            audio_s.append(samples / 24000)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    return dict(
        concurrency=concurrency,
        requests=len(e2e),
        frames_per_request=frames,
        audio_seconds=round(sum(audio_s), 2),
        wall_s=round(wall, 3),
        audio_seconds_per_second=round(sum(audio_s) / wall, 2),
        rtf_mean=round(statistics.mean(e / a for e, a in zip(e2e, audio_s)), 4),
        ttfa_p50_ms=round(1000 * pct(ttfa, 50), 1),
        ttfa_p95_ms=round(1000 * pct(ttfa, 95), 1),
        ttfa_p99_ms=round(1000 * pct(ttfa, 99), 1),
        e2e_p50_s=round(pct(e2e, 50), 3),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--frames", type=int, default=250, help="frames per request (12.5 per audio second)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    ap.add_argument("--speaker", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--out", default="engine_throughput.json")
    args = ap.parse_args()

    from vllm_qwen3tts.config import load_tts_config
    from vllm_qwen3tts.engine import Qwen3TTS

    cfg = load_tts_config(args.model)
    speaker = args.speaker or (cfg.speakers[0] if cfg.speakers else None)
    levels = [int(c) for c in args.concurrency.split(",")]
    t0 = time.time()
    tts = Qwen3TTS(args.model, device=args.device, max_num_seqs=max(args.max_num_seqs, max(levels)),
                   gpu_memory_utilization=args.gpu_memory_utilization)
    startup = time.time() - t0
    results = []
    try:
        for c in levels:
            # warm-up at this concurrency: first batches of a new size pay one-time costs
            tts._run(run_level(tts.engine, c, 8, c, speaker, 10_000 + c))
            r = tts._run(run_level(tts.engine, c, args.frames, args.rounds * c, speaker, 1000 * c))
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        tts.close()
    header = ["concurrency", "audio_seconds_per_second", "rtf_mean", "ttfa_p50_ms", "ttfa_p95_ms", "ttfa_p99_ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    Path(args.out).write_text(json.dumps(dict(model=args.model, tts_model_type=cfg.tts_model_type,
                                              startup_s=round(startup, 1), levels=results), indent=2))


if __name__ == "__main__":
    main()
