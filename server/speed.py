"""Speech speed control (OpenAI's `speed`, 0.25-4.0): a pitch-preserving time stretch.

Resampling would change the pitch with the tempo (chipmunk voices), so the tempo is changed
with WSOLA (waveform-similarity overlap-add, Verhelst & Roelands 1993): Hann-windowed
segments of the input are overlap-added at a fixed synthesis hop, taken from the input at
`speed` times that hop; each segment's start is moved by up to +-`SEARCH_TOLERANCE_SECONDS`
to where it best continues the previously copied segment, so periodic waveforms (voiced
speech) join in phase and the pitch is kept.

`TimeStretcher` works chunk by chunk and gives exactly the samples that stretching the whole
signal at once gives (`time_stretch` is that same object fed one chunk): every decision
depends only on input that both ways have seen, and the end of the signal is handled only
in `flush()`. It holds back about one window plus the search tolerance (~40 ms of input).

Position convention: the input is preceded by half a window of silence, so that frame k's
window is centred on input sample round(k * hop * speed) and on output sample k * hop; the
first half window of output (which would fade in from that silence) is dropped. The output
has round(len(input) / speed) samples.
"""

from __future__ import annotations

import numpy as np

from ..base.params import SPEED

MIN_SPEED = SPEED.lo  # OpenAI's range, the request parameter's bounds
MAX_SPEED = SPEED.hi
WINDOW_SECONDS = 0.030  # long enough to hold a pitch period of low voices (~12 ms at 80 Hz)
SEARCH_TOLERANCE_SECONDS = 0.010  # +-10 ms covers a full period of any voice above 50 Hz


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
    """Streaming WSOLA time stretch of mono float PCM; `speed` > 1 is faster (shorter)."""

    def __init__(self, speed: float, sample_rate: int = 24_000) -> None:
        self.speed = check_speed(speed)
        self.sample_rate = int(sample_rate)
        half_window = max(1, round(self.sample_rate * WINDOW_SECONDS / 2))
        self._hop = half_window  # synthesis hop: half a window, so Hann windows sum to 1
        self._window_length = 2 * half_window
        self._tolerance = round(self.sample_rate * SEARCH_TOLERANCE_SECONDS)
        # Periodic Hann: shifted by half its length, copies sum to exactly 1 (sin^2 + cos^2).
        n = np.arange(self._window_length)
        self._window = (0.5 - 0.5 * np.cos(2 * np.pi * n / self._window_length)).astype(np.float32)

        # Input in "padded" coordinates: half a window of silence, then the signal.
        self._input = np.zeros(half_window, dtype=np.float32)
        self._input_start = 0  # padded index of self._input[0]
        self._signal_length = 0  # real input samples received
        self._next_frame = 0
        self._previous_segment_start: int | None = None  # padded index of the last copied segment
        self._tail = np.zeros(half_window, dtype=np.float32)  # second half of the last frame
        self._emitted = 0  # output samples returned so far
        self._flushed = False

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed the next input samples; returns the output samples that are now final."""
        if self._flushed:
            raise RuntimeError("process() after flush()")
        chunk = _as_mono_float32(chunk)
        if self.speed == 1.0:
            return chunk.copy()
        self._signal_length += chunk.size
        self._input = np.concatenate([self._input, chunk])
        return self._run_frames(last_frame=None)

    def flush(self) -> np.ndarray:
        """End of input: the remaining output, up to round(total input / speed) samples."""
        if self._flushed:
            raise RuntimeError("flush() called twice")
        self._flushed = True
        if self.speed == 1.0:
            return np.zeros(0, dtype=np.float32)
        target = stretched_length(self._signal_length, self.speed)
        # Frame k > 0 yields output [(k-1) * hop, k * hop); the last one needed covers `target`.
        last_frame = -(-target // self._hop)
        emitted_before = self._emitted
        tail = self._run_frames(last_frame=last_frame)
        return tail[: max(0, target - emitted_before)]

    def _run_frames(self, last_frame: int | None) -> np.ndarray:
        """Overlap-add every frame whose input is available (padding with silence up to
        `last_frame` when the input has ended); returns the output they completed."""
        hop, window_length = self._hop, self._window_length
        completed: list[np.ndarray] = []
        while last_frame is None or self._next_frame <= last_frame:
            k = self._next_frame
            nominal = int(round(k * hop * self.speed))
            if self._previous_segment_start is None:
                search_from, search_to = nominal, nominal  # nothing to continue yet
            else:
                search_from, search_to = max(0, nominal - self._tolerance), nominal + self._tolerance
            continuation_start = None if self._previous_segment_start is None else self._previous_segment_start + hop
            needed_end = search_to + window_length
            if continuation_start is not None:
                needed_end = max(needed_end, continuation_start + window_length)
            available_end = self._input_start + self._input.size
            if needed_end > available_end:
                if last_frame is None:
                    break
                self._input = np.concatenate([self._input, np.zeros(needed_end - available_end, np.float32)])

            start = self._best_segment_start(search_from, search_to, continuation_start, nominal)
            segment = self._input_slice(start, start + window_length) * self._window
            block = self._tail + segment[:hop]  # final now: later frames start at or after (k+1) * hop
            self._tail = segment[hop:]
            if k > 0:  # frame 0's first half is the fade-in over the leading silence, dropped
                completed.append(block)
            self._previous_segment_start = start
            self._next_frame += 1
            self._drop_consumed_input()

        out = np.concatenate(completed) if completed else np.zeros(0, dtype=np.float32)
        self._emitted += out.size
        return out

    def _best_segment_start(self, search_from: int, search_to: int, continuation_start: int | None, nominal: int) -> int:
        if continuation_start is None or search_from == search_to:
            return search_from
        window_length = self._window_length
        natural_continuation = self._input_slice(continuation_start, continuation_start + window_length)
        candidates = self._input_slice(search_from, search_to + window_length)
        similarity = np.correlate(candidates, natural_continuation, mode="valid")
        best = int(np.argmax(similarity))
        if similarity[best] <= 0:  # silence (or nothing alike): stay on the nominal position
            return nominal
        return search_from + best

    def _input_slice(self, begin: int, end: int) -> np.ndarray:
        return self._input[begin - self._input_start : end - self._input_start]

    def _drop_consumed_input(self) -> None:
        """Forget input that no later frame can read (its search range or continuation)."""
        nominal = int(round(self._next_frame * self._hop * self.speed))
        keep_from = min(max(0, nominal - self._tolerance), self._previous_segment_start + self._hop)
        drop = keep_from - self._input_start
        if drop > 0:
            self._input = self._input[drop:]
            self._input_start = keep_from


def time_stretch(pcm: np.ndarray, speed: float, sample_rate: int = 24_000) -> np.ndarray:
    """Whole-signal time stretch: `round(len(pcm) / speed)` samples, pitch unchanged."""
    stretcher = TimeStretcher(speed, sample_rate)
    return np.concatenate([stretcher.process(pcm), stretcher.flush()])


def _as_mono_float32(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono PCM of shape [samples], got shape {pcm.shape}")
    return pcm
