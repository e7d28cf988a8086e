"""Time stretch for OpenAI's `speed`: the server's stretcher (`server/speed.py`, FFmpeg's atempo
through PyAV) against the hand-written WSOLA it replaced (kept below as the comparison), on
synthetic, deterministic signals at 24 kHz.

    python benchmarks/speed_stretch.py --out speed.json [--speeds 0.25,0.5,...] [--cpu-seconds 60]

Per implementation and speed:
- quality: output length against round(len / speed); pitch kept (f0 by YIN on the voiced parts
  of a speech-like signal, output at t / speed against input at t, in cents); spectral distance
  of a stretched log sweep's short-time spectra to the ideal stretched sweep, and of the speech
  signal's long-term spectrum to the input's; clicks (jumps in value or slope far above the
  local level) per second, against the input's own;
- chunk-exactness: the output fed in random chunk sizes (1 sample .. 2 s), in the codec's
  1920-sample frames and in groups of them, against the output fed whole (max abs difference);
  the input held back while streaming 1920-sample chunks (ms of input, and of output), and the
  chunks that go in before the first output comes out;
- CPU: process CPU seconds (`time.process_time`, not wall time: the machine is shared) per
  second of input audio, streamed in 1920-sample chunks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from scipy.signal import lfilter

RATE = 24_000
FRAME = 1920  # one codec frame (12.5 Hz)
SPEEDS = (0.25, 0.5, 0.8, 1.25, 1.5, 2.0, 4.0)


class Stretcher(Protocol):
    def process(self, chunk: np.ndarray) -> np.ndarray: ...
    def flush(self) -> np.ndarray: ...


# ---------------------------------------------------------------------------- signals


@dataclass
class Signal:
    name: str
    pcm: np.ndarray
    voiced: list[tuple[int, int]] = field(default_factory=list)  # [start, end) sample ranges of vowels


VOWELS = {  # formant frequencies (Hz) of five vowels, adult average
    "a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240),
    "e": (530, 1840, 2480), "o": (570, 840, 2410),
}


def resonator(x: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """Two-pole resonance at `frequency` with `bandwidth` (Hz); callers normalise the level."""
    r = np.exp(-np.pi * bandwidth / RATE)
    a = [1.0, -2 * r * np.cos(2 * np.pi * frequency / RATE), r * r]
    return lfilter([1 - r], a, x)


def ramp(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    if attack:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release:
        env[n - release:] = 0.5 + 0.5 * np.cos(np.pi * np.arange(release) / release)
    return env


def vowel(f0_from: float, f0_to: float, seconds: float, formants: tuple[int, int, int]) -> np.ndarray:
    """A glottal-like source (band-limited sawtooth, -6 dB/octave, f0 gliding linearly) through
    three formant resonators, with 15 ms fades."""
    n = int(seconds * RATE)
    f0 = np.linspace(f0_from, f0_to, n)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    source = np.zeros(n)
    for h in range(1, int(10_000 / max(f0_from, f0_to)) + 1):
        source += np.sin(h * phase) / h
    out = source
    for formant, bandwidth in zip(formants, (80, 100, 120)):
        out = resonator(out, formant, bandwidth)
    out /= np.abs(out).max()
    return out * ramp(n, int(0.015 * RATE), int(0.015 * RATE))


def speech_like(seed: int = 0) -> Signal:
    """~9 s: three phrases (low, middle, high voice: f0 80-130, 120-200, 190-300 Hz) of vowels
    with gliding f0, fricatives (high-band noise), plosive bursts and silences."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    voiced: list[tuple[int, int]] = []
    position = 0

    def add(x: np.ndarray, is_vowel: bool = False) -> None:
        nonlocal position
        if is_vowel:
            voiced.append((position, position + x.size))
        parts.append(x)
        position += x.size

    for f0_lo, f0_hi in ((80, 130), (120, 200), (190, 300)):
        add(np.zeros(int(rng.uniform(0.15, 0.3) * RATE)))
        for _ in range(5):
            kind = rng.choice(["fricative", "plosive", "none"])
            if kind == "fricative":
                n = int(rng.uniform(0.06, 0.15) * RATE)
                noise = resonator(rng.standard_normal(n), rng.uniform(3500, 6000), 2500)
                add(0.15 * noise / np.abs(noise).max() * ramp(n, int(0.01 * RATE), int(0.01 * RATE)))
            elif kind == "plosive":
                add(np.zeros(int(0.04 * RATE)))
                n = int(0.008 * RATE)
                add(0.3 * rng.standard_normal(n) * ramp(n, int(0.001 * RATE), int(0.004 * RATE)))
            add(0.5 * vowel(rng.uniform(f0_lo, f0_hi), rng.uniform(f0_lo, f0_hi), rng.uniform(0.25, 0.45),
                            VOWELS[rng.choice(list(VOWELS))]), is_vowel=True)
            if rng.random() < 0.4:
                add(np.zeros(int(rng.uniform(0.05, 0.2) * RATE)))
    add(np.zeros(int(0.2 * RATE)))
    return Signal("speech", np.concatenate(parts).astype(np.float32), voiced)


SWEEP_FROM, SWEEP_TO, SWEEP_SECONDS = 100.0, 4000.0, 4.0


def log_sweep(seconds: float) -> np.ndarray:
    """A 0.5-amplitude sine gliding exponentially from 100 Hz to 4 kHz over `seconds`."""
    t = np.arange(int(round(seconds * RATE))) / RATE
    k = np.log(SWEEP_TO / SWEEP_FROM) / seconds
    return (0.5 * np.sin(2 * np.pi * SWEEP_FROM * (np.exp(k * t) - 1) / k)).astype(np.float32)


# ---------------------------------------------------------------------------- measures


def yin_f0(frame: np.ndarray, fmin: float = 70.0, fmax: float = 400.0, threshold: float = 0.15) -> float:
    """f0 (Hz) of `frame` by YIN (cumulative mean normalised difference), NaN if unvoiced."""
    max_lag, min_lag = int(RATE / fmin), int(RATE / fmax)
    w = frame.size - max_lag
    x = frame.astype(np.float64)
    energy = np.cumsum(np.concatenate([[0.0], x * x]))
    spectrum = np.fft.rfft(x, 2 * frame.size)
    correlation = np.fft.irfft(spectrum * np.conj(np.fft.rfft(x[:w], 2 * frame.size)))[: max_lag + 1]
    lags = np.arange(max_lag + 1)
    difference = energy[w] + (energy[lags + w] - energy[lags]) - 2 * correlation
    cmnd = np.ones_like(difference)
    cumulative = np.cumsum(difference[1:])
    cmnd[1:] = difference[1:] * np.arange(1, max_lag + 1) / np.maximum(cumulative, 1e-12)
    below = np.flatnonzero(cmnd[min_lag:] < threshold)
    if below.size == 0:
        return float("nan")
    tau = min_lag + below[0]
    while tau + 1 <= max_lag and cmnd[tau + 1] < cmnd[tau]:
        tau += 1
    if 1 <= tau < max_lag:  # parabolic interpolation
        a, b, c = cmnd[tau - 1], cmnd[tau], cmnd[tau + 1]
        denominator = a - 2 * b + c
        tau = tau + (0.5 * (a - c) / denominator if denominator > 0 else 0.0)
    return RATE / tau


def pitch_errors_cents(signal: Signal, out: np.ndarray, speed: float) -> np.ndarray:
    """f0 of the output at t / speed against the input's at t, every 10 ms of each vowel where
    both 40 ms frames lie inside the vowel (10 ms margins); cents."""
    half = int(0.02 * RATE)
    margin = int(0.01 * RATE)
    errors = []
    for start, end in signal.voiced:
        for centre in range(start + margin + half, end - margin - half, int(0.01 * RATE)):
            centre_out = int(round(centre / speed))
            if not (start / speed + margin + half <= centre_out <= end / speed - margin - half):
                continue
            f_in = yin_f0(signal.pcm[centre - half: centre + half])
            f_out = yin_f0(out[centre_out - half: centre_out + half]) if centre_out + half <= out.size else np.nan
            if np.isnan(f_in):
                continue
            errors.append(1200 * np.log2(f_out / f_in) if not np.isnan(f_out) else np.inf)
    return np.asarray(errors)


def stft_db(x: np.ndarray, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    window = np.hanning(n_fft)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * window
    return 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)) + 1e-9)


def log_spectral_distance(out_db: np.ndarray, ref_db: np.ndarray, floor_db: float = 80.0) -> float:
    """Mean over frames of the RMS (over bins) dB difference, both floored at the reference's
    peak minus `floor_db` so that silence-level bins do not dominate."""
    n = min(len(out_db), len(ref_db))
    floor = ref_db.max() - floor_db
    a, b = np.maximum(out_db[:n], floor), np.maximum(ref_db[:n], floor)
    return float(np.mean(np.sqrt(np.mean((a - b) ** 2, axis=1))))


def long_term_spectrum_db(x: np.ndarray) -> np.ndarray:
    power = np.mean(10 ** (stft_db(x) / 10), axis=0)
    return 10 * np.log10(power / power.sum() + 1e-12)


def long_term_spectral_distance(out: np.ndarray, ref: np.ndarray) -> float:
    """RMS dB difference of the (power-normalised) long-term spectra between 60 Hz and 8 kHz."""
    bins = slice(int(60 / RATE * 1024), int(8000 / RATE * 1024))
    return float(np.sqrt(np.mean((long_term_spectrum_db(out)[bins] - long_term_spectrum_db(ref)[bins]) ** 2)))


def clicks_per_second(x: np.ndarray, ratio: float = 6.0, floor: float = 0.002) -> float:
    """Discontinuities per second: second differences (jumps in value or slope) larger than
    `ratio` x the RMS second difference of the surrounding 10 ms, and than `floor`. A sweep or
    the speech signal with one sample dropped every 100 ms reads 8-15 per second; both clean read 0."""
    if x.size < 3:
        return 0.0
    jumps = np.abs(np.diff(x.astype(np.float64), n=2))
    width = int(0.01 * RATE)
    local = np.sqrt(np.convolve(jumps ** 2, np.ones(width) / width, mode="same"))
    return float(np.count_nonzero((jumps > ratio * local) & (jumps > floor)) / (x.size / RATE))


# ---------------------------------------------------------------------------- runs


def run_chunked(make: Callable[[], Stretcher], pcm: np.ndarray, sizes) -> np.ndarray:
    stretcher, parts, position = make(), [], 0
    for size in sizes:
        if position >= pcm.size:
            break
        parts.append(stretcher.process(pcm[position: position + size]))
        position += size
    parts.append(stretcher.process(pcm[position:]))
    parts.append(stretcher.flush())
    return np.concatenate(parts)


def chunkings(n: int, seed: int = 1) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    random_sizes = np.exp(rng.uniform(0, np.log(2 * RATE), 4000)).astype(int).clip(1, 2 * RATE)
    return {
        "random 1..48000": list(random_sizes),
        "1920 frames": [FRAME] * (n // FRAME + 1),
        "frame groups 1,2,4,25": [FRAME * g for g in rng.choice([1, 2, 4, 25], 2000)],
        "first 1 sample, then 17, then frames": [1, 17] + [FRAME] * (n // FRAME + 1),
    }


def held_back(make: Callable[[], Stretcher], pcm: np.ndarray, speed: float) -> tuple[float, float, int]:
    """(max, mean) input held back (ms) after each 1920-sample chunk past the first 0.5 s, and
    how many 1920-sample chunks go in before the first output comes out."""
    stretcher, fed, emitted, lags, first_after = make(), 0, 0, [], 0
    for start in range(0, pcm.size - FRAME + 1, FRAME):
        emitted += stretcher.process(pcm[start: start + FRAME]).size
        fed += FRAME
        if not first_after and emitted:
            first_after = fed // FRAME
        if fed >= RATE // 2:
            lags.append((fed - emitted * speed) / RATE * 1000)
    return float(max(lags)), float(np.mean(lags)), first_after


def cpu_per_audio_second(make: Callable[[], Stretcher], pcm: np.ndarray, seconds: float) -> float:
    """Process CPU seconds per second of input audio, streamed in 1920-sample chunks (best of 3)."""
    reps = int(np.ceil(seconds * RATE / pcm.size))
    long = np.tile(pcm, reps)[: int(seconds * RATE)]
    best = np.inf
    for _ in range(3):
        stretcher = make()
        begin = time.process_time()
        for start in range(0, long.size, FRAME):
            stretcher.process(long[start: start + FRAME])
        stretcher.flush()
        best = min(best, time.process_time() - begin)
    return float(best / seconds)


@dataclass
class Row:
    implementation: str
    speed: float
    length_error_samples: int  # len(out) - round(len(in) / speed), speech signal, fed whole
    pitch_error_cents_median: float  # |cents|, output f0 at t / speed against input f0 at t
    pitch_error_cents_p95: float
    pitch_frames_over_50_cents: float  # fraction (unvoiced-in-output counts as over)
    pitch_frames: int
    sweep_lsd_db: float  # stretched sweep's short-time spectra against the ideal stretched sweep
    speech_ltas_db: float  # long-term spectrum distance, output against input
    clicks_per_s_speech: float
    clicks_per_s_sweep: float
    chunked_max_abs_diff: dict[str, float]  # per chunking, against fed whole
    chunked_length_equal: bool
    held_back_ms_max: float  # input not yet turned into output, 1920-sample chunks
    held_back_ms_mean: float
    held_back_output_ms_max: float  # the same in output time (input ms / speed)
    first_output_after_frames: int  # 1920-sample chunks fed before the first output sample
    cpu_s_per_audio_s: float  # per second of input, 1920-sample chunks


def measure(name: str, factory: Callable[[float, int], Stretcher], speed: float, speech: Signal,
            cpu_seconds: float) -> Row:
    def make() -> Stretcher:
        return factory(speed, RATE)

    whole = run_chunked(make, speech.pcm, [])
    errors = np.abs(pitch_errors_cents(speech, whole, speed))
    sweep = log_sweep(SWEEP_SECONDS)
    stretched_sweep = run_chunked(make, sweep, [FRAME] * (sweep.size // FRAME + 1))
    ideal = log_sweep(round(sweep.size / speed) / RATE)
    diffs, lengths_equal = {}, True
    for label, sizes in chunkings(speech.pcm.size).items():
        chunked = run_chunked(make, speech.pcm, sizes)
        lengths_equal &= chunked.size == whole.size
        n = min(chunked.size, whole.size)
        diffs[label] = float(np.abs(chunked[:n] - whole[:n]).max()) if n else 0.0
    hold_max, hold_mean, first_after = held_back(make, speech.pcm, speed)
    return Row(
        implementation=name, speed=speed,
        length_error_samples=int(whole.size - round(speech.pcm.size / speed)),
        pitch_error_cents_median=float(np.median(errors)),
        pitch_error_cents_p95=float(np.percentile(errors, 95, method="nearest")),
        pitch_frames_over_50_cents=float(np.mean(errors > 50)),
        pitch_frames=int(errors.size),
        sweep_lsd_db=log_spectral_distance(stft_db(stretched_sweep), stft_db(ideal)),
        speech_ltas_db=long_term_spectral_distance(whole, speech.pcm),
        clicks_per_s_speech=clicks_per_second(whole),
        clicks_per_s_sweep=clicks_per_second(stretched_sweep),
        chunked_max_abs_diff=diffs, chunked_length_equal=bool(lengths_equal),
        held_back_ms_max=hold_max, held_back_ms_mean=hold_mean, held_back_output_ms_max=hold_max / speed,
        first_output_after_frames=first_after,
        cpu_s_per_audio_s=cpu_per_audio_second(make, speech.pcm, cpu_seconds),
    )


# ---------------------------------------------------------------------------- WSOLA (before issue 23)


class WsolaStretcher:
    """The hand-written streaming WSOLA that `server/speed.py` held before issue 23, kept here as
    the comparison: Hann windows of 30 ms overlap-added at a 15 ms synthesis hop, each taken from
    the input at `speed` x that hop, moved by up to +-10 ms to where it best continues the
    previous segment (cross-correlation). Chunk-exact by construction; half a window of leading
    silence so that output sample k * hop sits on input round(k * hop * speed)."""

    def __init__(self, speed: float, sample_rate: int = RATE) -> None:
        self.speed = float(speed)
        half_window = max(1, round(sample_rate * 0.030 / 2))
        self._hop, self._window_length = half_window, 2 * half_window
        self._tolerance = round(sample_rate * 0.010)
        n = np.arange(self._window_length)
        self._window = (0.5 - 0.5 * np.cos(2 * np.pi * n / self._window_length)).astype(np.float32)
        self._input = np.zeros(half_window, dtype=np.float32)
        self._input_start = 0
        self._signal_length = 0
        self._next_frame = 0
        self._previous_segment_start: int | None = None
        self._tail = np.zeros(half_window, dtype=np.float32)
        self._emitted = 0

    def process(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32)
        if self.speed == 1.0:
            return chunk.copy()
        self._signal_length += chunk.size
        self._input = np.concatenate([self._input, chunk])
        return self._run_frames(last_frame=None)

    def flush(self) -> np.ndarray:
        if self.speed == 1.0:
            return np.zeros(0, dtype=np.float32)
        target = int(round(self._signal_length / self.speed))
        last_frame = -(-target // self._hop)
        emitted_before = self._emitted
        return self._run_frames(last_frame=last_frame)[: max(0, target - emitted_before)]

    def _run_frames(self, last_frame: int | None) -> np.ndarray:
        hop, window_length = self._hop, self._window_length
        completed: list[np.ndarray] = []
        while last_frame is None or self._next_frame <= last_frame:
            k = self._next_frame
            nominal = int(round(k * hop * self.speed))
            if self._previous_segment_start is None:
                search_from, search_to = nominal, nominal
                continuation_start = None
            else:
                search_from, search_to = max(0, nominal - self._tolerance), nominal + self._tolerance
                continuation_start = self._previous_segment_start + hop
            needed_end = search_to + window_length
            if continuation_start is not None:
                needed_end = max(needed_end, continuation_start + window_length)
            available_end = self._input_start + self._input.size
            if needed_end > available_end:
                if last_frame is None:
                    break
                self._input = np.concatenate([self._input, np.zeros(needed_end - available_end, np.float32)])
            start = self._best_segment_start(search_from, search_to, continuation_start, nominal)
            segment = self._slice(start, start + window_length) * self._window
            block = self._tail + segment[:hop]
            self._tail = segment[hop:]
            if k > 0:
                completed.append(block)
            self._previous_segment_start = start
            self._next_frame += 1
            nominal_next = int(round(self._next_frame * hop * self.speed))
            keep_from = min(max(0, nominal_next - self._tolerance), start + hop)
            if keep_from > self._input_start:
                self._input = self._input[keep_from - self._input_start:]
                self._input_start = keep_from
        out = np.concatenate(completed) if completed else np.zeros(0, dtype=np.float32)
        self._emitted += out.size
        return out

    def _best_segment_start(self, search_from: int, search_to: int, continuation_start: int | None,
                            nominal: int) -> int:
        if continuation_start is None or search_from == search_to:
            return search_from
        natural = self._slice(continuation_start, continuation_start + self._window_length)
        candidates = self._slice(search_from, search_to + self._window_length)
        similarity = np.correlate(candidates, natural, mode="valid")
        best = int(np.argmax(similarity))
        return nominal if similarity[best] <= 0 else search_from + best

    def _slice(self, begin: int, end: int) -> np.ndarray:
        return self._input[begin - self._input_start: end - self._input_start]


# ---------------------------------------------------------------------------- main


def implementations() -> dict[str, Callable[[float, int], Stretcher]]:
    from vllm_qwen3tts.server.speed import TimeStretcher

    return {"atempo": TimeStretcher, "wsola": WsolaStretcher}


def print_table(rows: list[Row]) -> None:
    header = ("impl", "speed", "len err", "f0 |c| med", "f0 |c| p95", ">50c", "sweep LSD dB", "LTAS dB",
              "clicks/s sp", "clicks/s sw", "chunked max|d|", "held ms in", "held ms out", "1st out", "CPU ms/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (r.implementation, f"{r.speed:g}", str(r.length_error_samples), f"{r.pitch_error_cents_median:.1f}",
                 f"{r.pitch_error_cents_p95:.1f}", f"{100 * r.pitch_frames_over_50_cents:.1f}%",
                 f"{r.sweep_lsd_db:.2f}", f"{r.speech_ltas_db:.2f}", f"{r.clicks_per_s_speech:.1f}",
                 f"{r.clicks_per_s_sweep:.1f}", f"{max(r.chunked_max_abs_diff.values()):.2g}"
                 + ("" if r.chunked_length_equal else " (len!)"),
                 f"{r.held_back_ms_max:.0f}", f"{r.held_back_output_ms_max:.0f}", str(r.first_output_after_frames), f"{1000 * r.cpu_s_per_audio_s:.2f}")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the rows (and the inputs' own measures) as JSON here")
    ap.add_argument("--speeds", default=",".join(f"{s:g}" for s in SPEEDS))
    ap.add_argument("--cpu-seconds", type=float, default=60.0, help="audio streamed per CPU measurement")
    ap.add_argument("--only", help="comma list of implementations to run: atempo (the server's), wsola")
    args = ap.parse_args()
    speech = speech_like()
    sweep = log_sweep(SWEEP_SECONDS)
    impls = implementations()
    if args.only:
        impls = {k: v for k, v in impls.items() if k in args.only.split(",")}
    rows = []
    for name, factory in impls.items():
        for speed in (float(s) for s in args.speeds.split(",")):
            rows.append(measure(name, factory, speed, speech, args.cpu_seconds))
            print(f"  {name} {speed:g} done", file=sys.stderr, flush=True)
    inputs = {"speech_seconds": speech.pcm.size / RATE, "speech_vowels": len(speech.voiced),
              "clicks_per_s_speech": clicks_per_second(speech.pcm), "clicks_per_s_sweep": clicks_per_second(sweep)}
    print(f"inputs: {inputs}")
    print_table(rows)
    if args.out:
        import av
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "inputs": inputs, "rows": [asdict(r) for r in rows],
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "av": av.__version__,
                         "libavfilter": ".".join(map(str, av.library_versions["libavfilter"]))},
            "machine": platform.processor() or platform.machine(),
        }, indent=1))


if __name__ == "__main__":
    main()
