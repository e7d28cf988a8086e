"""Speech PCM -> the response formats of OpenAI's `/v1/audio/speech`, whole or streamed.

The engine yields mono float32 PCM at 24 kHz. Every format starts from the same 16-bit
samples (`to_int16`: clipped to [-1, 1], scaled by 32767, rounded), then:

- `pcm`: the raw samples, 16-bit little-endian signed, mono, no header (OpenAI's definition).
- `wav`: RIFF/WAVE PCM 16-bit. Whole: written by soundfile, sizes exact. Streamed: a header
  whose RIFF and data sizes are 0xFFFFFFFF ("unknown, read to the end", as streaming servers
  send; soundfile and FFmpeg accept it), then the samples as they come.
- `flac`: PyAV's `flac` encoder and muxer. Whole, the muxer fills in the length and MD5
  of STREAMINFO at the end; streamed, it cannot go back, so STREAMINFO says "length
  unknown" (valid FLAC: FFmpeg and players read it; python-soundfile's `read()` fails on it
  because it seeks after reading; FFmpeg logs "unable to rewrite FLAC header" at WARNING).
- `mp3`: PyAV `libmp3lame` in the `mp3` muxer. The whole file gets a Xing/LAME frame so
  decoders drop the encoder delay and padding (exact length); a stream cannot (the muxer
  fills that frame in at the end, by seeking), so decoded streams carry ~1.1k extra samples.
- `opus`: PyAV `libopus` in the `ogg` muxer, encoded at 24 kHz (a native Opus rate), so the
  header's input rate is 24000: libsndfile decodes at 24 kHz; FFmpeg always decodes Opus at
  48 kHz. Ogg pre-skip and end trimming make the decoded length exact.
- `aac`: PyAV's native `aac` encoder in the `adts` muxer (raw ADTS frames, audio/aac).
  ADTS has no field for encoder delay, so decoders give 1024 priming samples first and
  pad the end to a whole 1024-sample frame.

Lossy codecs get a rate the codec supports; 24 kHz is one for all three. For other rates
that a codec does not support, PyAV's resampler (libswresample) converts to the nearest
supported rate above before encoding.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import soundfile as sf

logger = logging.getLogger("vllm.qwen3tts.server")
SAMPLE_RATE = 24_000

FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")  # OpenAI's response_format values

_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


@dataclass(frozen=True)
class PyAVFormat:
    """An encoder and a muxer of FFmpeg, as PyAV names them."""

    codec: str
    container: str
    bit_rate: int | None = None  # None: the codec's own choice (lossless FLAC)
    container_options: dict[str, str] = field(default_factory=dict)


PYAV_FORMATS: dict[str, PyAVFormat] = {
    # 64 kb/s at 24 kHz mono is well above what speech needs from MPEG-2 Layer III and AAC-LC.
    "mp3": PyAVFormat("libmp3lame", "mp3", 64_000),
    "aac": PyAVFormat("aac", "adts", 64_000),
    # Opus is transparent for speech well below 48 kb/s. The Ogg muxer holds packets until a
    # page spans `page_duration` (default 1 s, far too long to stream); 60 ms pages keep
    # the audio held back under ~0.1 s for ~4 kb/s of page headers.
    "opus": PyAVFormat("libopus", "ogg", 48_000, {"page_duration": "60000"}),
    "flac": PyAVFormat("flac", "flac"),
}


def check_format(fmt: str) -> str:
    """`fmt` if it is one of `FORMATS`, else `ValueError` naming the supported ones."""
    if fmt not in FORMATS:
        raise ValueError(f"unsupported audio format {fmt!r}; supported formats: {', '.join(FORMATS)}")
    return fmt


def content_type(fmt: str) -> str:
    """The HTTP Content-Type of a response in `fmt`."""
    return _CONTENT_TYPES[check_format(fmt)]


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """Float PCM in [-1, 1] -> int16. Out-of-range samples clip (a cast would wrap them into
    loud clicks); NaN becomes silence. The scale is 32767 so that +1 and -1 stay symmetric."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono PCM of shape [samples], got shape {pcm.shape}")
    # In place on one scaled copy, NaN fixed only when present: several times cheaper than
    # nan_to_num, clip, round, a cost the API process pays per chunk.
    scaled = np.multiply(pcm, np.float32(32767.0))
    np.clip(scaled, -32767.0, 32767.0, out=scaled)
    np.rint(scaled, out=scaled)
    nan = np.isnan(scaled)
    if nan.any():
        scaled[nan] = 0.0
    return scaled.astype("<i2")


def encode_audio(pcm: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A whole utterance of mono float PCM as a complete file in `fmt`."""
    samples = to_int16(pcm)
    if check_format(fmt) == "pcm":
        return samples.tobytes()
    if fmt == "wav":
        buffer = io.BytesIO()
        sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()
    # A seekable output lets muxers finish their headers at the end (mp3: the Xing/LAME
    # frame; flac: length and MD5 in STREAMINFO).
    output = io.BytesIO()
    encoder = _PyAVEncoder(PYAV_FORMATS[fmt], sample_rate, output)
    try:
        encoder.encode(samples)
        encoder.finish()
    finally:
        encoder.close()
    return output.getvalue()


class StreamingEncoder:
    """Encodes an utterance chunk by chunk; the concatenation of everything `write` and
    `finish` return is one complete stream in `fmt`.

    `write` returns the bytes that can be sent now; it may return b"" while a codec buffers
    (lossy codecs hold back up to one frame plus lookahead; Ogg up to a page).

    `close()` frees the codec and muxer of a stream that ends early (a client that went
    away); use it as a context manager. An encoder must not be left to the garbage collector:
    PyAV 16 frees an unclosed output container with a custom writer wrongly (`free(): invalid
    pointer`), which aborts the whole server process."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
        self.format = check_format(fmt)
        self.sample_rate = int(sample_rate)
        self._header = wav_header(self.sample_rate, num_samples=None) if fmt == "wav" else b""
        self._output = _ByteQueue()
        self._encoder = _PyAVEncoder(PYAV_FORMATS[fmt], self.sample_rate, self._output) if fmt in PYAV_FORMATS else None
        self._finished = False

    def write(self, pcm: np.ndarray) -> bytes:
        """Encode the next chunk of mono float PCM; returns the bytes ready to send."""
        if self._finished:
            raise RuntimeError("write() after finish()")
        samples = to_int16(pcm)
        if self._encoder is None:
            return self._take_header() + samples.tobytes()
        self._encoder.encode(samples)
        return self._output.take()

    def finish(self) -> bytes:
        """End of the utterance: whatever the codec and muxer still hold, and trailers."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._encoder is None:
            return self._take_header()  # an utterance with no samples is still a valid WAV
        self._encoder.finish()
        self.close()
        return self._output.take()

    def close(self) -> None:
        """Free the codec and muxer (what `finish` has not flushed is dropped). Idempotent."""
        if self._encoder is not None:
            self._encoder.close()

    def __enter__(self) -> "StreamingEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_header(self) -> bytes:
        header, self._header = self._header, b""
        return header


def wav_header(sample_rate: int, num_samples: int | None) -> bytes:
    """The 44-byte RIFF/WAVE header of mono 16-bit PCM. `num_samples=None` (a stream of
    unknown length) sets the RIFF and data sizes to 0xFFFFFFFF, which readers take as
    "until the end of the file"."""
    if num_samples is None:
        riff_size = data_size = 0xFFFFFFFF
    else:
        data_size = 2 * num_samples
        riff_size = 36 + data_size
    byte_rate, block_align, bits = 2 * sample_rate, 2, 16
    return b"".join([
        b"RIFF", riff_size.to_bytes(4, "little"), b"WAVE",
        b"fmt ", (16).to_bytes(4, "little"),
        (1).to_bytes(2, "little"),  # WAVE_FORMAT_PCM
        (1).to_bytes(2, "little"),  # channels
        sample_rate.to_bytes(4, "little"), byte_rate.to_bytes(4, "little"),
        block_align.to_bytes(2, "little"), bits.to_bytes(2, "little"),
        b"data", data_size.to_bytes(4, "little"),
    ])


class _ByteQueue:
    """A write-only, non-seekable file for PyAV: muxers then write as they go (and flush
    after every packet) instead of waiting to patch headers at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _PyAVEncoder:
    """Mono int16 PCM -> encoded packets -> a container written to `output`."""

    def __init__(self, spec: PyAVFormat, sample_rate: int, output) -> None:
        self._container = av.open(output, mode="w", format=spec.container, container_options=spec.container_options)
        self._stream = self._container.add_stream(spec.codec, rate=_supported_rate(spec.codec, sample_rate), layout="mono")
        if spec.bit_rate is not None:
            self._stream.bit_rate = spec.bit_rate
        self._sample_rate = sample_rate
        self._next_pts = 0
        self._closed = False
        # Open the codec and write the container header now, so that even an utterance
        # with no samples ends as a valid (empty) file.
        self._container.start_encoding()
        # PyAV converts each frame to the codec's sample format and rate and re-cuts it into
        # the codec's frame size (AudioCodecContext._prepare_frames_for_encode), so chunks of
        # any length can be given.

    def encode(self, samples: np.ndarray) -> None:
        if samples.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(samples[np.newaxis, :], format="s16", layout="mono")
        frame.sample_rate = self._sample_rate
        frame.time_base = Fraction(1, self._sample_rate)
        frame.pts = self._next_pts
        self._next_pts += samples.size
        self._container.mux(self._stream.encode(frame))

    def finish(self) -> None:
        """Drain the codec's lookahead and write the trailer (and, on seekable output, header fix-ups)."""
        self._container.mux(self._stream.encode(None))
        self._closed = True
        self._container.close()

    def __del__(self) -> None:
        # The last line of defence: a container PyAV's garbage collection would free wrongly.
        if not getattr(self, "_closed", True):
            logger.warning("a %s encoder was left unclosed; closing it", self._stream.codec_context.name)
            self.close()

    def close(self) -> None:
        """Close the container if `finish` has not (idempotent; a failure here only loses output)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - the stream was abandoned: its output goes nowhere
            pass


def _supported_rate(codec_name: str, sample_rate: int) -> int:
    """`sample_rate` if the codec takes it, else its nearest supported rate above (or its highest)."""
    rates = av.codec.Codec(codec_name, "w").audio_rates
    if not rates or sample_rate in rates:
        return sample_rate
    above = [rate for rate in rates if rate > sample_rate]
    return min(above) if above else max(rates)
