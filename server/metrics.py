"""Prometheus metrics of the speech server, in the default registry that vLLM's
`/metrics` already exposes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

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
