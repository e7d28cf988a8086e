"""Prometheus metrics of the speech server, in the default registry that vLLM's
`/metrics` already exposes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
PREPARE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_TICK_S = 0.05


@dataclass(frozen=True)
class SpeechMetrics:
    time_to_first_audio: Histogram
    prepare: Histogram
    real_time_factor: Histogram
    audio_seconds: Counter
    requests: Counter
    in_flight: Gauge
    waiting_first_audio: Gauge
    event_loop_lag: Histogram


@lru_cache(maxsize=1)
def speech_metrics() -> SpeechMetrics:
    """One set per process (Prometheus forbids registering a name twice)."""
    return SpeechMetrics(
        time_to_first_audio=Histogram("qwen3tts_time_to_first_audio_seconds",
                                      "From request arrival to the first audio bytes", buckets=LATENCY_BUCKETS),
        prepare=Histogram("qwen3tts_request_prepare_seconds", "From request arrival to the start of synthesis "
                          "(admission, validation, voice, prompts)", buckets=PREPARE_BUCKETS),
        real_time_factor=Histogram("qwen3tts_real_time_factor", "Synthesis wall time / audio duration",
                                   buckets=RTF_BUCKETS),
        audio_seconds=Counter("qwen3tts_audio_seconds", "Seconds of audio produced", ["tenant"]),
        requests=Counter("qwen3tts_requests", "Speech requests by outcome", ["tenant", "endpoint", "status"]),
        in_flight=Gauge("qwen3tts_requests_in_flight", "Admitted speech requests not yet finished"),
        waiting_first_audio=Gauge("qwen3tts_queue_depth", "Admitted requests still waiting for their first audio"),
        event_loop_lag=Histogram("qwen3tts_event_loop_lag_seconds",
                                 f"How late the API process's event loop ran a timer due every {LOOP_TICK_S:g} s: its "
                                 "backlog, which new connections, request bodies and audio writes wait behind too",
                                 buckets=LOOP_LAG_BUCKETS),
    )


async def watch_event_loop(lag: Histogram, tick_s: float = LOOP_TICK_S) -> None:
    """Observe into `lag`, forever, how late a timer due every `tick_s` fires. Under load the route's
    own clock cannot see a busy loop: a request waits to be accepted and parsed before the app
    sees it, and its audio waits to be written after the route yielded it."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        lag.observe(max(0.0, loop.time() - due))


class CodecStatsCollector:
    """The codec workers' counters as last polled (they are other processes, and a Prometheus
    collector cannot wait for a reply), labelled by worker index: decoder calls, chunks,
    frames, busy time, open streams; and when they were polled."""

    def __init__(self) -> None:
        self._latest: list = []  # protocol.CodecWorkerStats per worker
        self.polled_at: float | None = None  # time.time() of the last poll

    @property
    def latest(self) -> list:
        return self._latest

    @latest.setter
    def latest(self, per_worker: list) -> None:
        self._latest = per_worker
        self.polled_at = time.time()

    def collect(self):
        if not self.latest:
            return
        polled = GaugeMetricFamily("qwen3tts_codec_stats_timestamp_seconds",
                                   "When the codec workers' counters below were polled (Unix time)")
        polled.add_metric([], self.polled_at)
        yield polled
        families = [
            (CounterMetricFamily, "qwen3tts_codec_decode_seconds", "Time a codec worker spent in decoder calls",
             "decode_seconds"),
            (CounterMetricFamily, "qwen3tts_codec_batches", "Decoder calls of a codec worker", "batches_run"),
            (CounterMetricFamily, "qwen3tts_codec_chunks", "Stream chunks decoded (a call decodes a batch of them)",
             "chunks_decoded"),
            (CounterMetricFamily, "qwen3tts_codec_frames", "Frames decoded (12.5 per audio second)", "frames_decoded"),
            (GaugeMetricFamily, "qwen3tts_codec_active_streams", "Streams open in a codec worker", "active_streams"),
        ]
        for kind, name, doc, field in families:
            family = kind(name, doc, labels=["worker"])
            for i, stats in enumerate(self.latest):
                family.add_metric([str(i)], getattr(stats, field))
            yield family


@lru_cache(maxsize=1)
def codec_stats_collector() -> CodecStatsCollector:
    collector = CodecStatsCollector()
    REGISTRY.register(collector)
    return collector
