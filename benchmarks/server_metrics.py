"""What a server's own `/metrics` say about one load level: scrape before and after, subtract.

The load generator sees a request from outside (time to first audio, end to end); these
counters say where inside the time went, without a profiler attached:
- vLLM's engine: steps per second and tokens per step (`vllm:iteration_tokens_total`, one
  observation per engine step), the step cadence a running request sees (`vllm:inter_token_latency_seconds`,
  engine-core timestamps), and a request's time from arrival to its first frame
  (`vllm:time_to_first_token_seconds`), split into waiting for a slot (`request_queue_time`)
  and its prefill (`request_prefill_time`);
- our server: time to first audio as the server measures it, how late its event loop runs (a
  timer due every 50 ms: what accepting requests and writing audio wait behind, which the
  server's own first-audio clock cannot see), and the codec workers' decoder calls (busy time,
  frames per call; polled by the server every 5 s, so a level's edges blur).

Histograms give means (sum / count); percentiles come from the load generator. Any server
without these metrics (or without `/metrics`) just gets no engine columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

HISTOGRAMS = {  # prefix of the *_sum / *_count series -> field name
    "vllm:inter_token_latency_seconds": "itl",
    "vllm:time_to_first_token_seconds": "engine_ttft",
    "vllm:request_queue_time_seconds": "queue",
    "vllm:request_prefill_time_seconds": "prefill",
    "qwen3tts_time_to_first_audio_seconds": "server_ttfa",
    "qwen3tts_request_prepare_seconds": "server_prepare",
    "qwen3tts_event_loop_lag_seconds": "loop_lag",
}
COUNTERS = ("vllm:iteration_tokens_total_count", "vllm:iteration_tokens_total_sum",
            "qwen3tts_codec_decode_seconds_total", "qwen3tts_codec_batches_total", "qwen3tts_codec_frames_total")


def parse(text: str, names: Iterable[str] | None = None) -> dict[str, float]:
    """Prometheus text format -> {series name: value summed over its labels}, for `names` (default:
    the series above)."""
    wanted = set(names) if names is not None else set(COUNTERS) | {f"{h}_{s}" for h in HISTOGRAMS for s in ("sum", "count")}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


async def scrape(client, base_url: str, headers: dict[str, str] | None = None) -> dict[str, float] | None:
    """The series above from `base_url/metrics`, or None when the server has none. `headers`:
    the load's own (its API key: with keys configured, /metrics takes one)."""
    try:
        response = await client.get(base_url.rstrip("/") + "/metrics", timeout=10.0, headers=headers)
    except Exception:  # noqa: BLE001 - a server without metrics is not an error of the load
        return None
    if response.status_code != 200:
        return None
    return parse(response.text)


@dataclass
class EngineView:
    steps_per_s: float | None = None
    tokens_per_step: float | None = None
    itl_ms: float | None = None
    engine_ttft_ms: float | None = None
    queue_ms: float | None = None
    prefill_ms: float | None = None
    server_ttfa_ms: float | None = None
    server_prepare_ms: float | None = None  # arrival to synthesis start (part of server TTFA)
    loop_lag_ms: float | None = None  # mean lateness of the API process's 50 ms timer
    codec_busy: float | None = None  # share of the level's wall time in decoder calls
    codec_frames_per_call: float | None = None


def engine_view(before: dict[str, float] | None, after: dict[str, float] | None, wall_s: float) -> EngineView | None:
    if before is None or after is None or wall_s <= 0:
        return None

    def delta(name: str) -> float | None:
        if name not in after:
            return None
        return after[name] - before.get(name, 0.0)

    def ratio(num: float | None, den: float | None, scale: float = 1.0, digits: int = 2) -> float | None:
        if num is None or not den:
            return None
        return round(scale * num / den, digits)

    view = EngineView()
    steps = delta("vllm:iteration_tokens_total_count")
    view.steps_per_s = ratio(steps, wall_s, digits=1)
    view.tokens_per_step = ratio(delta("vllm:iteration_tokens_total_sum"), steps, digits=1)
    for prefix, field in HISTOGRAMS.items():
        setattr(view, f"{field}_ms", ratio(delta(f"{prefix}_sum"), delta(f"{prefix}_count"), scale=1000.0, digits=1))
    view.codec_busy = ratio(delta("qwen3tts_codec_decode_seconds_total"), wall_s)
    view.codec_frames_per_call = ratio(delta("qwen3tts_codec_frames_total"), delta("qwen3tts_codec_batches_total"),
                                       digits=1)
    return view
