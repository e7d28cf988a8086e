"""Prometheus metrics of the speech server, in the default registry that vLLM's
`/metrics` already exposes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


@dataclass(frozen=True)
class SpeechMetrics:
    time_to_first_audio: Histogram
    real_time_factor: Histogram
    audio_seconds: Counter
    requests: Counter
    in_flight: Gauge
    waiting_first_audio: Gauge


@lru_cache(maxsize=1)
def speech_metrics() -> SpeechMetrics:
    """One set per process (Prometheus forbids registering a name twice)."""
    return SpeechMetrics(
        time_to_first_audio=Histogram("qwen3tts_time_to_first_audio_seconds",
                                      "From request arrival to the first audio bytes", buckets=LATENCY_BUCKETS),
        real_time_factor=Histogram("qwen3tts_real_time_factor", "Synthesis wall time / audio duration",
                                   buckets=RTF_BUCKETS),
        audio_seconds=Counter("qwen3tts_audio_seconds", "Seconds of audio produced", ["tenant"]),
        requests=Counter("qwen3tts_requests", "Speech requests by outcome", ["tenant", "endpoint", "status"]),
        in_flight=Gauge("qwen3tts_requests_in_flight", "Admitted speech requests not yet finished"),
        waiting_first_audio=Gauge("qwen3tts_queue_depth", "Admitted requests still waiting for their first audio"),
    )


class CodecStatsCollector:
    """The codec worker's counters as last polled (it is another process, and a Prometheus
    collector cannot wait for a reply): decoder calls, chunks, frames, busy time, streams."""

    def __init__(self) -> None:
        self.latest = None  # protocol.CodecWorkerStats

    def collect(self):
        s = self.latest
        if s is None:
            return
        for name, doc, value in (
            ("qwen3tts_codec_decode_seconds", "Time the codec worker spent in decoder calls", s.decode_seconds),
            ("qwen3tts_codec_batches", "Decoder calls of the codec worker", s.batches_run),
            ("qwen3tts_codec_chunks", "Stream chunks decoded (a call decodes a batch of them)", s.chunks_decoded),
            ("qwen3tts_codec_frames", "Frames decoded (12.5 per audio second)", s.frames_decoded),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("qwen3tts_codec_active_streams", "Streams open in the codec worker",
                                value=s.active_streams)


@lru_cache(maxsize=1)
def codec_stats_collector() -> CodecStatsCollector:
    collector = CodecStatsCollector()
    REGISTRY.register(collector)
    return collector
