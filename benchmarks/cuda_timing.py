"""GPU time per call of a function, by CUDA events (the micro-benchmarks' one timer)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_ms_per_call(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean milliseconds per call over `iters` calls queued back to back, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
