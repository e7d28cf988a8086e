"""Reference-audio loading for voice cloning: any common container -> mono float32 at 24 kHz.

Mirrors the official front end where it matters for parity: soundfile decodes to float32,
channels are averaged, and other rates are converted with `librosa.resample` at its
default quality (soxr_hq). Containers libsndfile cannot read (AAC/M4A, WebM, ...) go
through PyAV instead.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf

TARGET_SAMPLE_RATE = 24_000
DEFAULT_MAX_REFERENCE_SECONDS = 60.0

AudioSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


def load_audio(source: AudioSource, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode encoded audio (bytes or a file path) to a mono float32 waveform at its own rate.

    Raises `ValueError` when the data cannot be decoded, holds no samples, holds
    non-finite samples, or lasts longer than `max_seconds`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError("reference audio is empty (0 bytes)")
        what = f"{len(data)} bytes of audio"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"reference audio file {path} does not exist")
        what = str(path)
    else:
        raise TypeError(f"expected audio bytes or a file path, got {type(source).__name__}")

    def fresh_input():  # each decoder attempt needs its own stream position
        return io.BytesIO(data) if isinstance(source, (bytes, bytearray, memoryview)) else str(path)

    try:
        audio, sample_rate = _decode_with_soundfile(fresh_input(), max_seconds)
    except sf.SoundFileError as soundfile_error:
        try:
            audio, sample_rate = _decode_with_pyav(fresh_input(), max_seconds)
        except _AudioTooLong:
            raise
        except Exception as pyav_error:
            raise ValueError(
                f"could not decode {what} (soundfile: {soundfile_error}; PyAV: {pyav_error})"
            ) from pyav_error
    return check_waveform(audio, sample_rate, max_seconds=max_seconds), sample_rate


def to_mono(audio: np.ndarray) -> np.ndarray:
    """`[n]` or soundfile-layout `[n, channels]` -> `[n]` float32, channels averaged."""
    audio = np.asarray(audio)
    if audio.ndim == 2:
        audio = audio.astype(np.float32, copy=False).mean(axis=-1)
    elif audio.ndim != 1:
        raise ValueError(f"expected a waveform of shape [samples] or [samples, channels], got {audio.shape}")
    return audio.astype(np.float32, copy=False)


def check_waveform(audio: np.ndarray, sample_rate: int, *, max_seconds: float | None = None) -> np.ndarray:
    """Validate a mono waveform; returns it as float32."""
    if sample_rate <= 0:
        raise ValueError(f"invalid sample rate {sample_rate}")
    if audio.size == 0:
        raise ValueError("reference audio holds no samples")
    if max_seconds is not None and audio.shape[0] > max_seconds * sample_rate:
        raise _AudioTooLong(_too_long_message(audio.shape[0] / sample_rate, max_seconds))
    if not np.isfinite(audio).all():
        raise ValueError("reference audio holds NaN or infinite samples")
    return audio.astype(np.float32, copy=False)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Sample-rate conversion exactly as the official front end does it (librosa defaults, soxr_hq)."""
    audio = audio.astype(np.float32, copy=False)
    if int(orig_sr) == int(target_sr):
        return audio
    import librosa  # imported here: only voice cloning needs it, and the GPU image lacks it

    return librosa.resample(y=audio, orig_sr=int(orig_sr), target_sr=int(target_sr)).astype(np.float32, copy=False)


def load_reference_audio(
    source: AudioSource | tuple[np.ndarray, int],
    *,
    max_seconds: float | None = DEFAULT_MAX_REFERENCE_SECONDS,
    target_sr: int = TARGET_SAMPLE_RATE,
) -> np.ndarray:
    """Encoded audio (bytes / path) or `(waveform, sample_rate)` -> mono float32 at `target_sr`."""
    if isinstance(source, tuple):
        waveform, sample_rate = source
        audio = check_waveform(to_mono(waveform), int(sample_rate), max_seconds=max_seconds)
    else:
        audio, sample_rate = load_audio(source, max_seconds=max_seconds)
    return resample(audio, sample_rate, target_sr)


class _AudioTooLong(ValueError):
    pass


def _too_long_message(seconds: float, max_seconds: float) -> str:
    return f"reference audio lasts {seconds:.1f} s; at most {max_seconds:g} s is accepted"


def _decode_with_soundfile(source, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(source) as f:
        # Refuse before decoding: a long upload should cost nothing.
        if max_seconds is not None and f.frames > max_seconds * f.samplerate > 0:
            raise _AudioTooLong(_too_long_message(f.frames / f.samplerate, max_seconds))
        audio = f.read(dtype="float32", always_2d=True)
        return to_mono(audio), int(f.samplerate)


def _decode_with_pyav(source, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av  # only needed for containers libsndfile cannot read

    with av.open(source, mode="r") as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise ValueError("no audio stream found")
        sample_rate = int(stream.codec_context.sample_rate or stream.sample_rate or 0)
        if sample_rate <= 0:
            raise ValueError("audio stream has no sample rate")
        limit = None if max_seconds is None else int(max_seconds * sample_rate)
        # Only the sample format changes here (to planar float); the rate is kept so that
        # rate conversion happens in one place, with the same resampler as every other input.
        to_float = av.AudioResampler(format="fltp", rate=sample_rate)
        chunks: list[np.ndarray] = []
        total = 0

        def take(frames) -> None:
            nonlocal total
            for frame in frames:
                planes = frame.to_ndarray()  # [channels, samples]
                chunks.append(planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0])
                total += planes.shape[1]
            if limit is not None and total > limit:
                raise _AudioTooLong(_too_long_message(total / sample_rate, max_seconds))

        for frame in container.decode(stream):
            take(to_float.resample(frame))
        take(to_float.resample(None))
    if not chunks:
        raise ValueError("audio stream decoded to no samples")
    return np.concatenate(chunks).astype(np.float32, copy=False), sample_rate
