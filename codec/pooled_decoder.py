"""Decoding one chunk of each of many streams in a single call, from a pool of stream states.

The codec worker keeps the decoder state of every open stream as one row of a pool. A batch
of chunks (one per stream) is decoded by gathering those rows, decoding, and scattering the
advanced rows back. Eagerly that is about a thousand kernel launches whatever the batch (a
launch-bound call at small batches), so on a GPU the whole gather-decode-scatter is
captured as a CUDA graph once per shape of a fixed grid (batch size x chunk length) and
replayed. A batch is padded up to the next captured size with a scratch row that no stream
owns.

Chunks of different lengths share a call: each is padded to the call's length and the decoder
advances each stream by its real frames only (`decode_chunk(..., lengths)`). Under load the
chunks ready at one moment have many lengths (the growing schedule: 2, 4, 8, 16, 25 frames),
so grouping by exact length made several small calls where one larger call is cheaper.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .decoder import CodecDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeGrid:
    """The shapes a batch is padded to (and, on a GPU, that get a CUDA graph each)."""

    batch_sizes: tuple[int, ...]  # ascending
    chunk_lengths: tuple[int, ...]  # ascending; the chunk sizes clients send (the server's schedule)

    @classmethod
    def up_to(cls, max_batch: int, chunk_lengths: tuple[int, ...], min_batch: int = 1) -> "DecodeGrid":
        """Powers of two from `min_batch` below `max_batch`, and `max_batch` itself."""
        sizes = [min(min_batch, max_batch)]
        while sizes[-1] * 2 < max_batch:
            sizes.append(sizes[-1] * 2)
        sizes = sorted(set(sizes) | {max_batch})
        return cls(tuple(sizes), tuple(sorted(set(chunk_lengths))))

    def batch_bucket(self, batch: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= batch), None)

    def length_bucket(self, frames: int) -> int | None:
        return next((n for n in self.chunk_lengths if n >= frames), None)


# What a decoder call costs beyond its frames, in frames: a graph replay's fixed cost over the cost
# of one more frame in a large batch (on an H100, bf16). A group of shorter chunks joins a longer
# call when padding them costs less than a call of their own.
CALL_COST_FRAMES = 45


class PooledDecoder:
    """The decoder, the state pool of `streams` rows (plus a scratch row) and, on a GPU, the
    captured graphs. Rows are handed out by the caller (the worker's slot table)."""

    def __init__(self, decoder: CodecDecoder, streams: int, grid: DecodeGrid | None = None):
        self.decoder = decoder
        self.grid = grid
        self.scratch_row = streams  # padding rows of a batch all point here
        self.pool = decoder.new_stream_state(streams + 1)
        self.device = decoder.pre_conv.weight.device
        self.num_quantizers = decoder.config.num_quantizers
        self.samples_per_frame = decoder.config.samples_per_frame
        self._graphs: dict[tuple[int, int], CapturedDecode] = {}

    # -- streams ----------------------------------------------------------------------------------

    def reset(self, rows: int | list[int]) -> None:
        """Rows `rows` become streams that have decoded nothing yet."""
        self.pool.reset(torch.tensor([rows] if isinstance(rows, int) else rows, device=self.device))

    def prime(self, row: int, codes: np.ndarray, piece_frames: int) -> None:
        """Advance row `row` over `codes` [T, Q], discarding the audio (voice-clone reference
        codes: the stream then continues them). Eager: once per request, any length."""
        idx = torch.tensor([row], device=self.device)
        for start in range(0, codes.shape[0], piece_frames):
            piece = torch.from_numpy(np.ascontiguousarray(codes[start : start + piece_frames])).to(self.device)
            self._decode_rows(idx, piece[None])

    # -- decoding ---------------------------------------------------------------------------------

    def run_length(self, frames: int) -> int:
        """Frames the decoder runs for a chunk of `frames`: the next length of the grid."""
        if self.grid is not None:
            bucket = self.grid.length_bucket(frames)
            if bucket is not None:
                return bucket
        return frames

    def plan_calls(self, frames: list[int], max_batch: int) -> list[tuple[int, list[int]]]:
        """Which chunks (indices into `frames`) to decode together, and at what length: grid
        lengths from the longest down, a shorter group joining the call before it while padding
        its chunks costs less than a call (CALL_COST_FRAMES); at most `max_batch` per call.
        Calls holding the shortest chunks (new streams' first chunks) come first."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(frames):
            groups.setdefault(self.run_length(n), []).append(i)
        calls: list[tuple[int, list[int]]] = []
        for length in sorted(groups, reverse=True):
            members = groups[length]
            if calls:
                call_length, call = calls[-1]
                padding = len(members) * (call_length - length)
                if padding < CALL_COST_FRAMES and len(call) + len(members) <= max_batch:
                    call.extend(members)
                    continue
            for start in range(0, len(members), max_batch):
                calls.append((length, members[start : start + max_batch]))
        return sorted(calls, key=lambda c: min(frames[i] for i in c[1]))

    def decode(self, rows: list[int], chunks: list[np.ndarray], run_length: int) -> list[np.ndarray]:
        """Decode chunk i ([frames_i, Q] int, frames_i <= run_length) of the stream in row i, all
        in one call. Returns each stream's float32 PCM, frames_i * samples_per_frame long."""
        batch = len(rows)
        padded = batch
        if self.grid is not None and run_length in self.grid.chunk_lengths:
            padded = self.grid.batch_bucket(batch) or batch
        codes = np.zeros((padded, run_length, self.num_quantizers), dtype=np.int64)
        lengths = np.full(padded, run_length, dtype=np.int64)
        for i, chunk in enumerate(chunks):
            codes[i, : chunk.shape[0]] = chunk
            lengths[i] = chunk.shape[0]
        idx = np.full(padded, self.scratch_row, dtype=np.int64)
        idx[:batch] = rows
        graph = self._graphs.get((padded, run_length))
        if graph is not None:
            audio = graph.replay(codes, idx, lengths)
        else:
            ragged = bool((lengths < run_length).any())
            audio = self._decode_rows(torch.from_numpy(idx).to(self.device), torch.from_numpy(codes).to(self.device),
                                      torch.from_numpy(lengths).to(self.device) if ragged else None)
        samples = audio[:batch].cpu().numpy()
        return [samples[i, : chunk.shape[0] * self.samples_per_frame] for i, chunk in enumerate(chunks)]

    def _decode_rows(self, idx: torch.Tensor, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        state = self.pool.select(idx)
        audio, state = self.decoder.decode_chunk(codes, state, lengths)
        self.pool.update(idx, state)
        return audio.float()

    # -- CUDA graphs ------------------------------------------------------------------------------

    @property
    def captured_shapes(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def capture_graphs(self) -> None:
        """One CUDA graph per shape of the grid, largest first, all in one memory pool (they
        are replayed one at a time, and each result is copied out before the next replay)."""
        if self.device.type != "cuda" or self.grid is None:
            raise RuntimeError("CUDA graphs need a CUDA decoder and a decode grid")
        t0 = time.perf_counter()
        memory_pool = torch.cuda.graph_pool_handle()
        shapes = [(b, n) for n in self.grid.chunk_lengths for b in self.grid.batch_sizes]
        for batch, length in sorted(shapes, key=lambda s: s[0] * s[1], reverse=True):
            self._graphs[(batch, length)] = CapturedDecode(self, batch, length, memory_pool)
        logger.info("codec decoder: %d CUDA graphs captured in %.1f s (batches %s x chunks %s); %.2f GiB of GPU "
                    "memory reserved by this process", len(self._graphs), time.perf_counter() - t0,
                    list(self.grid.batch_sizes), list(self.grid.chunk_lengths), torch.cuda.memory_reserved() / 2**30)


class CapturedDecode:
    """gather rows -> decode_chunk -> scatter rows, for one (batch, chunk length), as a graph
    reading its inputs from static buffers."""

    def __init__(self, owner: PooledDecoder, batch: int, length: int, memory_pool) -> None:
        device = owner.device
        self.codes = torch.zeros(batch, length, owner.num_quantizers, dtype=torch.int64, device=device)
        self.idx = torch.full((batch,), owner.scratch_row, dtype=torch.int64, device=device)
        self.lengths = torch.full((batch,), length, dtype=torch.int64, device=device)
        # Warm up on the scratch row (its state is garbage by design): lazy initialisation and
        # any torch.compile specialisation must not happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                owner._decode_rows(self.idx, self.codes, self.lengths)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=memory_pool):
            self.audio = owner._decode_rows(self.idx, self.codes, self.lengths)

    def replay(self, codes: np.ndarray, idx: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        self.codes.copy_(torch.from_numpy(codes))
        self.idx.copy_(torch.from_numpy(idx))
        self.lengths.copy_(torch.from_numpy(lengths))
        self.graph.replay()
        return self.audio
