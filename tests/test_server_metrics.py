"""The server's own latency gauges that need no engine: the event loop's lateness."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

from vllm_qwen3tts.server.metrics import LOOP_LAG_BUCKETS, watch_event_loop

TICK_S = 0.01
HOLD_S = 0.2


def test_event_loop_lag_records_a_blocked_loop():
    """A callback that holds the loop for 0.2 s makes the pending tick at least 0.2 s less one tick
    late (in the buckets above 0.1 s), and every tick's lateness is counted once: the ticks' own
    sleeps plus their lateness never add up to more than the time watched. Both hold however slow
    or busy the machine is (a busy machine only makes ticks later and fewer)."""
    lag = Histogram("lag_seconds", "test", buckets=LOOP_LAG_BUCKETS, registry=CollectorRegistry())

    async def serve_a_while() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        watcher = asyncio.create_task(watch_event_loop(lag, tick_s=TICK_S))
        await asyncio.sleep(0.05)
        time.sleep(HOLD_S)  # what a saturated API process does to every timer and socket
        await asyncio.sleep(0.05)
        watcher.cancel()
        return loop.time() - started

    watched_s = asyncio.run(serve_a_while())
    samples = {s.name: s.value for s in lag.collect()[0].samples if not s.labels}
    count, total = samples["lag_seconds_count"], samples["lag_seconds_sum"]
    on_time_or_nearly = next(s.value for s in lag.collect()[0].samples if s.labels.get("le") == "0.1")
    assert count - on_time_or_nearly >= 1  # the held tick is in the buckets above 0.1 s
    assert total >= HOLD_S - TICK_S
    # A timer fires no earlier than due (to the clock's resolution), so this bound is exact; a
    # watcher that counted lateness twice, or kept it from one tick to the next, breaks it.
    assert total + count * TICK_S <= watched_s + count * 1e-6
