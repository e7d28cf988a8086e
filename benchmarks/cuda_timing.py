"""GPU time per call of a function, by CUDA events (the micro-benchmarks' timers)."""

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


def cuda_graph_ms_per_call(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Mean milliseconds per call with `calls` calls captured in one CUDA graph and replayed, as
    the engine runs them: for kernels shorter than their Python launch, where
    `cuda_ms_per_call` would time the launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms_per_call(graph.replay, replays, warmup=2) / calls
