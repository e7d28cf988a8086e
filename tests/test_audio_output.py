"""The response audio: every OpenAI format, whole and streamed, decodes back to the PCM it
was given (exactly for wav/pcm/flac, closely for mp3/opus/aac); speed stretches time, not pitch."""

from __future__ import annotations

import gc
import io

import av
import numpy as np
import pytest
import soundfile as sf

from vllm_qwen3tts.server.audio_output import (
    FORMATS,
    StreamingEncoder,
    content_type,
    encode_audio,
    to_int16,
)
from vllm_qwen3tts.server.speed import TimeStretcher, time_stretch

RATE = 24_000
LOSSY = ("mp3", "opus", "aac")
# Chunk sizes like the engine's (2 frames, 4 frames, 25 frames) plus odd ones.
ENGINE_LIKE_CHUNKS = (3840, 7680, 48000, 1000, 17, 5000)
# What FFmpeg decodes each format at: Opus decoders run at 48 kHz whatever the input rate.
DECODED_RATE = {"mp3": 24_000, "opus": 48_000, "aac": 24_000, "flac": 24_000, "wav": 24_000}
# Samples a decoder may add beyond the input (at the decoded rate): encoder delay and the
# last frame's padding where the container cannot say how much to drop.
STREAMED_EXTRA_SAMPLES = {"mp3": 2 * 1152, "opus": 0, "aac": 2 * 1024, "flac": 0, "wav": 0}
WHOLE_EXTRA_SAMPLES = {**STREAMED_EXTRA_SAMPLES, "mp3": 0}  # whole mp3 has a LAME tag


# ---------------------------------------------------------------------------- helpers


def mixed_signal(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A mix of sines (220 Hz strongest) and a little noise, peaking below full scale."""
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    mix = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 440 * t)
           + 0.1 * np.sin(2 * np.pi * 1000 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t) + 0.01 * noise)
    return mix.astype(np.float32)




def decode_with_pyav(data: bytes) -> tuple[np.ndarray, int, int]:
    """-> (mono float32 samples, sample rate, channel count) as FFmpeg decodes `data`."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        to_float = av.AudioResampler(format="flt", layout="mono", rate=rate)
        planes = [f.to_ndarray()[0] for frame in container.decode(stream) for f in to_float.resample(frame)]
        planes += [f.to_ndarray()[0] for f in to_float.resample(None)]
    return (np.concatenate(planes) if planes else np.zeros(0, np.float32)), rate, channels


def stream_encode(fmt: str, pcm: np.ndarray, chunk_sizes=ENGINE_LIKE_CHUNKS) -> list[bytes]:
    """Everything a StreamingEncoder returns for `pcm` cut into `chunk_sizes` (then the rest)."""
    encoder = StreamingEncoder(fmt)
    parts, position = [], 0
    for size in chunk_sizes:
        parts.append(encoder.write(pcm[position : position + size]))
        position += size
    parts.append(encoder.write(pcm[position:]))
    parts.append(encoder.finish())
    return parts


def aligned_snr_db(reference: np.ndarray, decoded: np.ndarray, max_delay: int = 3000) -> tuple[int, float]:
    """(delay, SNR in dB) of `decoded` against `reference` at the delay that correlates best."""
    padded = np.concatenate([decoded, np.zeros(len(reference) + max_delay, np.float32)])
    common = len(reference) - max_delay
    scores = np.correlate(padded[: common + max_delay], reference[:common], mode="valid")
    delay = int(np.argmax(scores))
    error_energy = np.sum((reference - padded[delay : delay + len(reference)]) ** 2)
    return delay, np.inf if error_energy == 0 else 10 * np.log10(np.sum(reference**2) / error_energy)


def dominant_frequency(pcm: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm)), n=8 * len(pcm)))
    return float(np.fft.rfftfreq(8 * len(pcm), 1 / rate)[np.argmax(spectrum)])


# ---------------------------------------------------------------------------- formats


def test_formats_are_openais_with_their_content_types():
    assert set(FORMATS) == {"mp3", "opus", "aac", "flac", "wav", "pcm"}
    assert {fmt: content_type(fmt) for fmt in FORMATS} == {
        "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
        "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm",
    }


@pytest.mark.parametrize("use", [
    lambda fmt: content_type(fmt),
    lambda fmt: encode_audio(mixed_signal(0.1), fmt),
    lambda fmt: StreamingEncoder(fmt),
])
def test_unknown_format_is_refused_naming_the_supported_ones(use):
    with pytest.raises(ValueError) as error:
        use("ogg")
    assert all(fmt in str(error.value) for fmt in FORMATS)


def test_pcm_is_raw_16_bit_little_endian_samples():
    pcm = mixed_signal(0.5)
    data = encode_audio(pcm, "pcm")
    assert len(data) == 2 * len(pcm)
    decoded = np.frombuffer(data, dtype="<i2")
    np.testing.assert_allclose(decoded / 32767, pcm, atol=1 / 32767)
    assert b"".join(stream_encode("pcm", pcm)) == data


def test_whole_wav_has_exact_sizes_and_samples():
    pcm = mixed_signal()
    data = encode_audio(pcm, "wav")
    assert int.from_bytes(data[4:8], "little") == len(data) - 8  # RIFF size
    assert data[36:40] == b"data" and int.from_bytes(data[40:44], "little") == 2 * len(pcm)
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == RATE and samples.ndim == 1
    np.testing.assert_array_equal(samples, to_int16(pcm))


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_formats_decode_to_the_exact_samples(fmt):
    pcm = mixed_signal()
    decoded, rate, channels = decode_with_pyav(encode_audio(pcm, fmt))
    assert (rate, channels) == (RATE, 1)
    np.testing.assert_array_equal(decoded, to_int16(pcm) / np.float32(32768))
    samples, rate = sf.read(io.BytesIO(encode_audio(pcm, fmt)), dtype="int16")
    assert rate == RATE
    np.testing.assert_array_equal(samples, to_int16(pcm))


@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_formats_decode_to_the_right_rate_length_and_content(fmt):
    pcm = mixed_signal()
    decoded, rate, channels = decode_with_pyav(encode_audio(pcm, fmt))
    assert (rate, channels) == (DECODED_RATE[fmt], 1)
    expected_length = len(pcm) * rate // RATE
    assert expected_length <= len(decoded) <= expected_length + WHOLE_EXTRA_SAMPLES[fmt]
    if rate != RATE:  # Opus: compare content at the stream's own 24 kHz (libsndfile decodes at it)
        decoded, rate = sf.read(io.BytesIO(encode_audio(pcm, fmt)), dtype="float32")
        assert (rate, len(decoded)) == (RATE, len(pcm))
    _, snr = aligned_snr_db(pcm, decoded)
    assert snr > 18  # measured: mp3 25.7 dB, opus 30.1 dB, aac 24.7 dB
    assert dominant_frequency(decoded) == pytest.approx(220, abs=1)


def test_opus_header_reports_24_khz():
    info = sf.info(io.BytesIO(encode_audio(mixed_signal(0.5), "opus")))
    assert (info.samplerate, info.channels, info.frames) == (RATE, 1, RATE // 2)


# ---------------------------------------------------------------------------- streaming


def test_streamed_wav_is_the_whole_file_with_unbounded_sizes():
    pcm = mixed_signal()
    streamed, whole = b"".join(stream_encode("wav", pcm)), encode_audio(pcm, "wav")
    assert streamed[4:8] == streamed[40:44] == b"\xff\xff\xff\xff"
    assert streamed[:4] + streamed[8:40] + streamed[44:] == whole[:4] + whole[8:40] + whole[44:]


@pytest.mark.parametrize("reader", ["soundfile", "pyav"])
def test_streamed_wav_header_is_accepted_by_readers(reader):
    pcm = mixed_signal(1.0)
    first_chunk = stream_encode("wav", pcm, chunk_sizes=(3840,))[0]  # what a client has early on
    for data, length in ((first_chunk, 3840), (b"".join(stream_encode("wav", pcm)), len(pcm))):
        if reader == "soundfile":
            samples, rate = sf.read(io.BytesIO(data), dtype="int16")
            np.testing.assert_array_equal(samples, to_int16(pcm[:length]))
        else:
            samples, rate, _ = decode_with_pyav(data)
            assert len(samples) == length
        assert rate == RATE


def test_streamed_flac_decodes_to_the_exact_samples():
    # libsndfile cannot size a FLAC stream of unknown length (python-soundfile's read then
    # fails seeking), so this is decoded with FFmpeg, as players and browsers would.
    pcm = mixed_signal()
    decoded, rate, channels = decode_with_pyav(b"".join(stream_encode("flac", pcm)))
    assert (rate, channels) == (RATE, 1)
    np.testing.assert_array_equal(decoded, to_int16(pcm) / np.float32(32768))


@pytest.mark.parametrize("fmt", LOSSY)
def test_streamed_lossy_audio_matches_the_whole_file_encoding(fmt):
    pcm = mixed_signal()
    streamed, rate, channels = decode_with_pyav(b"".join(stream_encode(fmt, pcm)))
    whole, _, _ = decode_with_pyav(encode_audio(pcm, fmt))
    assert (rate, channels) == (DECODED_RATE[fmt], 1)
    expected_length = len(pcm) * rate // RATE
    assert expected_length <= len(streamed) <= expected_length + STREAMED_EXTRA_SAMPLES[fmt]
    _, snr = aligned_snr_db(whole, streamed)  # mp3: the stream lacks the delay-trimming tag
    assert snr > 40


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_streaming_sends_audio_as_it_comes(fmt):
    """What write() has returned so far decodes to all but a codec frame or an Ogg page."""
    pcm = mixed_signal(2.0)
    parts = stream_encode(fmt, pcm, chunk_sizes=(3840, 7680, 24000))
    written = len(pcm)  # the last write() gave the rest; only finish() is left out
    decoded, rate, _ = decode_with_pyav(b"".join(parts[:-1]))
    assert len(decoded) / rate >= written / RATE - 0.15


def test_an_empty_wav_stream_is_a_valid_file():
    encoder = StreamingEncoder("wav")
    data = encoder.finish()
    samples, rate = sf.read(io.BytesIO(data))
    assert (len(samples), rate) == (0, RATE)
    with pytest.raises(RuntimeError):
        encoder.write(mixed_signal(0.1))


# ---------------------------------------------------------------------------- clipping


def test_out_of_range_samples_clip_instead_of_wrapping():
    pcm = np.array([0.0, 0.5, 1.0, 1.5, -1.0, -3.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    expected = [0, 16384, 32767, 32767, -32767, -32767, 0, 32767, -32767]
    before = pcm.copy()
    assert to_int16(pcm).tolist() == expected
    np.testing.assert_array_equal(pcm, before)  # the caller's samples are left as they were
    samples, _ = sf.read(io.BytesIO(encode_audio(pcm, "wav")), dtype="int16")
    assert samples.tolist() == expected


@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_encoders_get_clipped_audio(fmt):
    too_loud = 3 * mixed_signal(1.0)  # peaks near 2
    decoded, rate, _ = decode_with_pyav(encode_audio(too_loud, fmt))
    if rate != RATE:
        decoded, _ = sf.read(io.BytesIO(encode_audio(too_loud, fmt)), dtype="float32")
    _, snr = aligned_snr_db(np.clip(too_loud, -1, 1), decoded)
    assert snr > 15  # measured 19-30 dB; a wrapping int16 cast gives about -1.5 dB


def test_non_mono_input_is_refused():
    with pytest.raises(ValueError):
        encode_audio(np.zeros((100, 2), np.float32), "wav")


# ---------------------------------------------------------------------------- speed


def tone(frequency: float, seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def stretch_in_chunks(pcm: np.ndarray, speed: float, chunk_sizes) -> np.ndarray:
    stretcher, parts, position = TimeStretcher(speed), [], 0
    for size in chunk_sizes:
        parts.append(stretcher.process(pcm[position : position + size]))
        position += size
    parts += [stretcher.process(pcm[position:]), stretcher.flush()]
    return np.concatenate(parts)


def test_speed_one_is_an_exact_passthrough():
    pcm = mixed_signal(1.0)
    np.testing.assert_array_equal(time_stretch(pcm, 1.0), pcm)
    np.testing.assert_array_equal(stretch_in_chunks(pcm, 1.0, (1, 3840, 100)), pcm)


@pytest.mark.parametrize("speed", [0.0, 0.2, 4.5, -1.0, float("nan")])
def test_speed_outside_openais_range_is_refused(speed):
    with pytest.raises(ValueError):
        TimeStretcher(speed)
    with pytest.raises(ValueError):
        time_stretch(tone(440, 0.1), speed)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.25, 2.0, 4.0])
def test_output_length_is_input_length_over_speed(speed):
    pcm = mixed_signal(1.0)[:23_999]
    assert len(time_stretch(pcm, speed)) == round(23_999 / speed)


@pytest.mark.parametrize("speed", [0.5, 1.5, 2.0])
def test_a_tone_burst_lasts_and_sits_where_the_speed_says(speed):
    burst = np.concatenate([np.zeros(RATE // 2), tone(440, 1.0) * 2, np.zeros(RATE // 2)]).astype(np.float32)
    loud = np.flatnonzero(np.abs(time_stretch(burst, speed)) > 0.5)  # sample peaks of the 1.0-amplitude burst
    duration, centre = (loud[-1] - loud[0]) / RATE, (loud[-1] + loud[0]) / 2 / RATE
    assert duration == pytest.approx(1.0 / speed, rel=0.03)
    assert centre == pytest.approx(1.0 / speed, rel=0.02)


@pytest.mark.parametrize("speed", [0.5, 1.5, 2.0])
def test_the_pitch_of_a_440_hz_sine_is_kept(speed):
    assert dominant_frequency(time_stretch(tone(440, 3.0), speed)) == pytest.approx(440, abs=2)


def test_a_gliding_voice_keeps_its_pitch_at_every_moment():
    """A harmonic-rich tone gliding 100 -> 200 Hz: at matching moments, same fundamental."""
    seconds = 3.0
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(100 + 100 * t / seconds) / RATE
    voice = (0.2 * sum(np.sin(h * phase) / h for h in range(1, 15))).astype(np.float32)

    def fundamental(segment: np.ndarray) -> float:
        autocorrelation = np.correlate(segment, segment, "full")[len(segment) - 1 :]
        shortest, longest = RATE // 400, RATE // 60
        return RATE / (shortest + np.argmax(autocorrelation[shortest:longest]))

    for speed in (0.5, 2.0):
        stretched = time_stretch(voice, speed)
        for moment in (0.25, 0.5, 0.75):
            original_at = int(moment * len(voice))
            stretched_at = int(moment * len(stretched))
            assert fundamental(stretched[stretched_at : stretched_at + 1200]) == pytest.approx(
                fundamental(voice[original_at : original_at + 1200]), rel=0.02)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.75, 1.5, 2.0, 4.0])
def test_streamed_stretch_equals_the_whole_signal_stretch(speed):
    pcm = mixed_signal(3.0)
    np.testing.assert_array_equal(stretch_in_chunks(pcm, speed, (1, 17, 3840, 7680, 1000, 48000)), time_stretch(pcm, speed))


@pytest.mark.parametrize("chunk", [1920, 48000], ids=["codec frames", "2 s chunks"])
@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_the_stretcher_holds_back_under_two_codec_frames_of_input_whatever_the_chunks(speed, chunk):
    pcm, stretcher, out = mixed_signal(4.0), TimeStretcher(speed), 0
    for fed in range(chunk, pcm.size + 1, chunk):
        out += len(stretcher.process(pcm[fed - chunk : fed]))
        assert out >= (fed - 2 * 1920) / speed  # under 160 ms of input not yet turned into output


def test_a_stretcher_abandoned_mid_stream_is_freed_without_harm():
    """A client that goes away drops its request's stretcher unflushed; collecting it must not
    take the process down (PyAV frees FFmpeg objects when they are collected)."""
    for speed in (0.25, 2.0, 4.0):
        stretcher = TimeStretcher(speed)
        stretcher.process(mixed_signal(0.5))
        del stretcher
        gc.collect()
    assert len(time_stretch(mixed_signal(0.5), 2.0)) == RATE // 4


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_an_encoder_ended_early_is_closed_by_its_owner_and_one_left_open_is_closed_when_collected(fmt, caplog):
    """A stream abandoned mid-utterance must close its encoder (PyAV 16 aborts the process when
    the garbage collector frees an unclosed container with a custom writer); as a last resort,
    collecting an unclosed one closes it first and says so."""
    import gc
    import logging

    signal = mixed_signal(0.5)
    with caplog.at_level(logging.WARNING, logger="vllm.qwen3tts.server"):
        with StreamingEncoder(fmt, RATE) as encoder:
            encoder.write(signal)
        encoder.close()  # closing again is harmless
        del encoder
        gc.collect()
        assert "left unclosed" not in caplog.text
        leaked = StreamingEncoder(fmt, RATE)
        leaked.write(signal)
        del leaked
        gc.collect()
    assert "left unclosed" in caplog.text
