"""The server's own latency gauges that need no engine: the event loop's lateness."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

from vllm_qwen3tts.server.metrics import LOOP_LAG_BUCKETS, watch_event_loop


def test_event_loop_lag_records_a_blocked_loop():
    """A callback that holds the loop for 0.2 s is one late tick of ~0.2 s; the others are on time."""
    lag = Histogram("lag_seconds", "test", buckets=LOOP_LAG_BUCKETS, registry=CollectorRegistry())

    async def serve_a_while():
        watcher = asyncio.create_task(watch_event_loop(lag, tick_s=0.01))
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # what a saturated API process does to every timer and socket
        await asyncio.sleep(0.05)
        watcher.cancel()

    asyncio.run(serve_a_while())
    samples = {s.name: s.value for s in lag.collect()[0].samples if not s.labels}
    late = next(s.value for s in lag.collect()[0].samples if s.labels.get("le") == "0.1")
    assert samples["lag_seconds_count"] >= 5
    assert samples["lag_seconds_sum"] >= 0.15
    assert samples["lag_seconds_count"] - late == 1  # exactly one tick was later than 0.1 s
