"""Speech speed control (OpenAI's `speed`, 0.25-4.0): a pitch-preserving time stretch.

Resampling would change the pitch with the tempo (chipmunk voices), so the tempo is changed
by FFmpeg's `atempo` filter through PyAV (already here for the encoders): WSOLA, overlapping
Hann windows of the input each moved to where it best continues the previous one. It replaced
a hand-written WSOLA that kept the pitch less well (benchmarks/NOTES.md §24).

`TimeStretcher` works chunk by chunk and gives exactly the samples that stretching the whole
signal at once gives (`time_stretch` is that same object fed one chunk): atempo's output
depends only on the frames it is handed, so it is handed the input in fixed blocks whatever
the chunks. Small blocks also keep the latency down, since atempo passes output on only in
buffers as long as the stretched frame they came from; what is held back is at most about one atempo
window (a power of two near sample_rate / 24: 1024 samples at 24 kHz), a block, and half a
window per unit of speed. The end of the input is followed by silence so that atempo's last
windows come out, and the output is cut to round(len(input) / speed) samples.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from ..base.params import SPEED

MIN_SPEED = SPEED.lo  # OpenAI's range, the request parameter's bounds
MAX_SPEED = SPEED.hi
ATEMPO_MIN = 0.5  # one atempo's lowest tempo; its highest is 100 (2 on FFmpeg builds older than PyAV's)
BLOCK_SECONDS = 0.020  # input per frame handed to atempo


def check_speed(speed: float) -> float:
    """`speed` as a float; `ValueError` outside OpenAI's range [0.25, 4.0]."""
    speed = float(speed)
    if not MIN_SPEED <= speed <= MAX_SPEED:  # also rejects NaN
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    return speed


def stretched_length(num_samples: int, speed: float) -> int:
    """Number of output samples for `num_samples` of input at `speed`."""
    return int(round(num_samples / speed))


class TimeStretcher:
    """Streaming time stretch of mono float PCM by FFmpeg's atempo; `speed` > 1 is faster (shorter)."""

    def __init__(self, speed: float, sample_rate: int = 24_000) -> None:
        self.speed = check_speed(speed)
        self.sample_rate = int(sample_rate)
        self._block = max(1, round(self.sample_rate * BLOCK_SECONDS))
        window = 1 << max(0, (self.sample_rate // 24 - 1).bit_length())  # atempo's, as af_atempo.c picks it
        # Silence after the end that brings out every window holding input, whatever the speed.
        self._end_padding = int(2 * window * max(1.0, self.speed))
        self._graph = _atempo_graph(self.speed, self.sample_rate) if self.speed != 1.0 else None
        self._pending = np.zeros(0, dtype=np.float32)  # input short of a block
        self._signal_length = 0  # input samples received
        self._pts = 0  # input samples handed to atempo
        self._emitted = 0  # output samples returned so far
        self._flushed = False

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed the next input samples; returns the output samples that are now final."""
        if self._flushed:
            raise RuntimeError("process() after flush()")
        chunk = _as_mono_float32(chunk)
        if self._graph is None:
            return chunk.copy()
        self._signal_length += chunk.size
        pending = np.concatenate([self._pending, chunk])
        whole_blocks = pending.size - pending.size % self._block
        out = [self._filter(pending[begin : begin + self._block]) for begin in range(0, whole_blocks, self._block)]
        self._pending = pending[whole_blocks:].copy()
        return self._count(np.concatenate(out) if out else np.zeros(0, dtype=np.float32))

    def flush(self) -> np.ndarray:
        """End of input: the remaining output, up to round(total input / speed) samples."""
        if self._flushed:
            raise RuntimeError("flush() called twice")
        self._flushed = True
        if self._graph is None:
            return np.zeros(0, dtype=np.float32)
        out = self._filter(np.concatenate([self._pending, np.zeros(self._end_padding, dtype=np.float32)]), end=True)
        missing = max(0, stretched_length(self._signal_length, self.speed) - self._emitted)
        out = out[:missing]
        if out.size < missing:  # not expected with the padding above; the length is a promise
            out = np.concatenate([out, np.zeros(missing - out.size, dtype=np.float32)])
        return self._count(out)

    def _filter(self, block: np.ndarray, end: bool = False) -> np.ndarray:
        """Hand `block` to atempo (then the end of input, if `end`); returns what atempo gave back."""
        frame = av.AudioFrame.from_ndarray(block[np.newaxis, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.time_base = Fraction(1, self.sample_rate)
        frame.pts = self._pts
        self._pts += block.size
        self._graph.push(frame)
        if end:
            self._graph.push(None)
        out = []
        while True:
            try:
                out.append(self._graph.pull().to_ndarray()[0])
            except (av.error.BlockingIOError, av.error.EOFError):  # wants more input / has ended
                break
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, dtype=np.float32)

    def _count(self, out: np.ndarray) -> np.ndarray:
        self._emitted += out.size
        return out


def _atempo_graph(speed: float, sample_rate: int) -> av.filter.Graph:
    """abuffer -> atempo x n -> abuffersink for float mono PCM: n = 1, or for speeds below one
    atempo's range, the fewest instances whose equal tempos multiply to `speed`."""
    stages = 1
    while speed ** (1 / stages) < ATEMPO_MIN:
        stages += 1
    graph = av.filter.Graph()
    source = graph.add_abuffer(sample_rate=sample_rate, format="flt", layout="mono",
                               time_base=Fraction(1, sample_rate))
    tempos = [graph.add("atempo", f"tempo={speed ** (1 / stages)!r}") for _ in range(stages)]
    graph.link_nodes(source, *tempos, graph.add("abuffersink")).configure()
    return graph


def time_stretch(pcm: np.ndarray, speed: float, sample_rate: int = 24_000) -> np.ndarray:
    """Whole-signal time stretch: `round(len(pcm) / speed)` samples, pitch unchanged."""
    stretcher = TimeStretcher(speed, sample_rate)
    return np.concatenate([stretcher.process(pcm), stretcher.flush()])


def _as_mono_float32(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono PCM of shape [samples], got shape {pcm.shape}")
    return pcm
