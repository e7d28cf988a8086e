"""Completing sampled frames (the code predictor's 15 sub-steps) under CUDA graphs.

Run eagerly, the predictor is a few thousand small kernel launches per talker step
(15 sub-steps x 5 layers, plus sampling) and the step becomes host-bound at any batch size.
`TalkerState.after_sample` is pure tensor code with no host synchronisation, so it
is captured once per batch-size bucket and replayed: rows beyond the real batch
are padding that reads and writes only the null slot.

A graph of the eager code still replays ~7,000 tiny kernels per step (RMSNorms, RoPE, the
sampler's hash noise and sorts, 16 times over), whatever the batch. So before capture the
predictor's steps and its sampler are compiled with torch.compile (Inductor fuses the
elementwise chains into a few Triton kernels; both are independent of the sub-step, so each
compiles once), and the compiled kernels are what the graphs hold. `QWEN3TTS_COMPILE=0` turns
compilation off.
"""

from __future__ import annotations

import logging
import time

import torch

from ..base.settings import process_settings
from ..model.code_predictor import CodePredictor
from ..model.talker_io import TalkerEmbeddings
from .state import TalkerState

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


class FrameCompleter:
    def __init__(self, state: TalkerState, embeddings: TalkerEmbeddings, predictor: CodePredictor, hidden_size: int,
                 max_batch: int, dtype: torch.dtype, use_graphs: bool):
        self.state = state
        self.embeddings = embeddings
        self.predictor = predictor
        self.use_graphs = use_graphs and state.device.type == "cuda"
        self.buckets = batch_buckets(max_batch)
        dev = state.device
        n = self.buckets[-1]
        self.slots = torch.full((n,), state.null_slot, dtype=torch.int64, device=dev)
        self.last_positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.code0 = torch.zeros(n, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=dev)
        self.sampled = torch.zeros(n, dtype=torch.bool, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.compile = self.use_graphs and process_settings().tuning.compile
        self.compiled = False

    def _complete(self, slots, last_positions, code0, hidden, sampled) -> torch.Tensor:
        return self.state.after_sample(self.embeddings, self.predictor, slots, last_positions, code0, hidden, sampled)

    def __call__(self, slots: torch.Tensor, last_positions: torch.Tensor, code0: torch.Tensor, hidden: torch.Tensor,
                 sampled: torch.Tensor) -> torch.Tensor:
        b = code0.shape[0]
        if not self.use_graphs or b > self.buckets[-1]:
            return self._complete(slots, last_positions, code0, hidden, sampled)
        bucket = next(s for s in self.buckets if s >= b)
        # inputs into the static buffers; padding rows are not sampled and use the null slot
        self.slots[:b].copy_(slots)
        self.slots[b:bucket].fill_(self.state.null_slot)
        self.last_positions[:b].copy_(last_positions)
        self.code0[:b].copy_(code0)
        self.hidden[:b].copy_(hidden)
        self.sampled[:b].copy_(sampled)
        self.sampled[b:bucket].fill_(False)
        if not self.graphs:
            self._capture_all()
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]

    def _capture_all(self) -> None:
        """Capture every bucket at the first call (vLLM's start-up profiling run), largest first
        so the smaller graphs reuse its memory pool. The inputs of the step in progress are
        kept aside: capture runs with every row unsampled on the null slot, so it changes no
        request's state."""
        kept = [t.clone() for t in (self.slots, self.last_positions, self.code0, self.hidden, self.sampled)]
        self.slots.fill_(self.state.null_slot)
        self.sampled.fill_(False)
        if self.compile:
            self._compile_predictor()
        self.pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            args = (self.slots[:bucket], self.last_positions[:bucket], self.code0[:bucket], self.hidden[:bucket],
                    self.sampled[:bucket])
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._complete(*args)  # warm-up: compilation and lazy initialisation stay out of the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._complete(*args)
            self.graphs[bucket] = (graph, out)
        for buf, value in zip((self.slots, self.last_positions, self.code0, self.hidden, self.sampled), kept):
            buf.copy_(value)
        logger.info("captured frame-completion CUDA graphs for batch sizes %s (%s)", self.buckets,
                    "compiled" if self.compiled else "eager kernels")

    def _compile_predictor(self) -> None:
        """Compile the predictor's step and sampler (by one run on the null slot); keep the eager
        ones if compilation fails (graphs of eager kernels are slower, not wrong)."""
        steps = self.predictor.first_step, self.predictor.token_step, self.predictor.sample
        t0 = time.perf_counter()
        try:
            self.predictor.compile_steps()
            n = self.buckets[-1]
            self._complete(self.slots[:n], self.last_positions[:n], self.code0[:n], self.hidden[:n], self.sampled[:n])
        except Exception as e:  # noqa: BLE001 - any compiler failure: keep serving without it
            logger.warning("torch.compile of the code predictor failed, using eager kernels: %s", e)
            self.predictor.first_step, self.predictor.token_step, self.predictor.sample = steps
            return
        self.compiled = True
        logger.info("code predictor compiled in %.1f s", time.perf_counter() - t0)
