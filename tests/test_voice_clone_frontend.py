"""Voice-clone front end: reference-audio loading, codec encoder (audio -> codes) and speaker
encoder (audio -> x-vector), against the official implementation on random checkpoints."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from oracle import load_official

from vllm_qwen3tts.codec.audio import load_audio, load_reference_audio, resample
from vllm_qwen3tts.codec.encoder import CodecEncoder, load_codec_encoder, read_codec_encoder_weights
from vllm_qwen3tts.codec.speaker_encoder import load_speaker_encoder
from vllm_qwen3tts.codec.voice_clone import (
    VoiceCloneEncoders,
    create_voice_clone_profile,
    load_voice_clone_encoders,
)
from vllm_qwen3tts.base.config import CheckpointError

SR = 24000
SAMPLES_PER_FRAME = 1920
XVECTOR_MIN_COSINE = 0.99999  # spec §8.3, speaker embedding, fp32
# The cosine alone is a weak check on random weights: x-vectors of unrelated audio already
# agree to ~0.99 (a large input-independent component), and scaling one conv by 1.01 still
# leaves 0.9999998. Norms are ~10-25 and the fp32 CPU path is exact, so bound the elements too.
XVECTOR_MAX_ABS = 1e-4
# Longer than the encoder transformer's 250-frame (10 s) sliding window.
LONG_SECONDS = 11.5


def speechlike(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated tones with vibrato plus noise: enough structure for varied codes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (1.1 + 0.3 * seed) * t)
    tones = 0.3 * np.sin(2 * np.pi * (140 + 40 * seed) * t) + 0.2 * np.sin(
        2 * np.pi * 1330 * t + 3 * np.sin(2 * np.pi * 5 * t)
    )
    return (envelope * tones + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def wav_bytes(audio: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def assert_varied(codes: torch.Tensor) -> None:
    """Guard against degenerate inputs under which any two encoders would agree."""
    assert len(torch.unique(codes, dim=0)) > codes.shape[0] // 2
    assert len(torch.unique(codes[:, 0])) > 1


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def base_06b(tiny_checkpoint) -> Path:
    """The tiny 0.6B Base checkpoint; its encoder-transformer LayerScales are drawn in
    [0.3, 1], so the transformer (and its sliding window) visibly shapes the codes."""
    return tiny_checkpoint("0.6b-base")


@pytest.fixture(scope="module")
def official_06b(base_06b):
    model = load_official(base_06b)
    rotary = model.model.speech_tokenizer.model.encoder.encoder_transformer.rotary_emb
    # transformers 5 may leave non-persistent RoPE buffers uninitialised (spec §9); make sure
    # the oracle is sound before trusting it
    expected, _ = rotary.compute_default_rope_parameters(rotary.config)
    assert torch.equal(rotary.inv_freq.cpu(), expected)
    return model


@pytest.fixture(scope="module")
def ours_06b(base_06b) -> VoiceCloneEncoders:
    return load_voice_clone_encoders(base_06b)


# ------------------------------------------------------------------------------------------
# audio loading


def test_wav_and_flac_bytes_round_trip():
    audio = speechlike(1.0, 16000)
    wav, sr = load_audio(wav_bytes(audio, 16000, "WAV", "FLOAT"))
    assert sr == 16000 and wav.dtype == np.float32
    np.testing.assert_array_equal(wav, audio)
    flac, sr = load_audio(wav_bytes(audio, 16000, "FLAC", "PCM_16"))
    assert sr == 16000 and flac.dtype == np.float32 and flac.shape == audio.shape
    np.testing.assert_allclose(flac, audio, atol=1.0 / 32768)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = speechlike(0.5, seed=1), speechlike(0.5, seed=2)
    stereo = np.stack([left, right], axis=1)
    wav, sr = load_audio(wav_bytes(stereo, SR, "WAV", "FLOAT"))
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-7)
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, SR, subtype="PCM_24")
    from_path, _ = load_audio(path)
    np.testing.assert_allclose(from_path, (left + right) / 2, atol=1e-6)
    from_array = load_reference_audio((stereo, SR))
    np.testing.assert_allclose(from_array, (left + right) / 2, atol=1e-7)


def test_containers_libsndfile_cannot_read_go_through_pyav():
    audio = speechlike(1.0, 24000)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="adts") as container:  # raw AAC
        stream = container.add_stream("aac", rate=24000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(audio[None], format="fltp", layout="mono")
        frame.sample_rate = 24000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    data = buf.getvalue()
    with pytest.raises(sf.SoundFileError):
        sf.read(io.BytesIO(data))
    wav, sr = load_audio(data)
    assert sr == 24000 and wav.dtype == np.float32
    # AAC adds encoder priming; the decoded signal is lossy but clearly the same tone
    assert abs(wav.size - audio.size) < 4096
    assert 0.5 * np.abs(audio).max() < np.abs(wav).max() < 1.5 * np.abs(audio).max()


def test_undecodable_or_empty_audio_is_refused(tmp_path):
    with pytest.raises(ValueError, match="could not decode"):
        load_audio(b"definitely not an audio file " * 40)
    with pytest.raises(ValueError, match="empty"):
        load_audio(b"")
    with pytest.raises(ValueError, match="no samples"):
        load_audio(wav_bytes(np.zeros(0, np.float32), SR))
    with pytest.raises(ValueError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="no samples"):
        load_reference_audio((np.zeros(0, np.float32), SR))
    with pytest.raises(ValueError, match="NaN"):
        load_reference_audio((np.full(100, np.nan, np.float32), SR))


def test_too_long_audio_is_refused():
    audio = speechlike(2.0, 16000)
    for source in (wav_bytes(audio, 16000), (audio, 16000)):
        with pytest.raises(ValueError, match="at most 1.5 s"):
            load_reference_audio(source, max_seconds=1.5)
        assert load_reference_audio(source, max_seconds=None).shape == (48000,)


def test_resampling_is_librosa_soxr_hq():
    import librosa

    audio = speechlike(0.7, 22050)
    ours = load_reference_audio(wav_bytes(audio, 22050, "WAV", "FLOAT"))
    np.testing.assert_array_equal(ours, librosa.resample(audio, orig_sr=22050, target_sr=SR, res_type="soxr_hq"))
    assert ours.dtype == np.float32 and ours.shape == (int(np.ceil(audio.size * SR / 22050)),)


# ------------------------------------------------------------------------------------------
# codec encoder


@pytest.mark.parity
@pytest.mark.parametrize("sr,seconds", [(24000, LONG_SECONDS), (24000, 3.01), (16000, 3.3)])
def test_codec_encoder_matches_official(sr, seconds, official_06b, ours_06b):
    audio = speechlike(seconds, sr, seed=1)
    expected = official_06b.model.speech_tokenizer.encode(audio, sr=sr).audio_codes[0]
    audio_24k = resample(audio, sr)
    codes = ours_06b.codec.encode([audio_24k])[0]
    assert codes.dtype == torch.long
    assert codes.shape == (-(-audio_24k.size // SAMPLES_PER_FRAME), 16)
    assert_varied(codes)
    assert torch.equal(codes, expected.cpu())


@pytest.mark.parity
def test_batched_encode_matches_official_and_single_items(official_06b, ours_06b):
    # the longest item, one whole number of frames, and ragged lengths (incl. under one frame)
    lengths = [76_801, 1920 * 25, 1920 * 25 + 961, 60_000, 1000]
    wavs = [speechlike(n / SR, seed=i) for i, n in enumerate(lengths)]
    batch = ours_06b.codec.encode(wavs)
    expected = official_06b.model.speech_tokenizer.encode(wavs, sr=SR).audio_codes
    for n, wav, codes, reference in zip(lengths, wavs, batch, expected):
        assert torch.equal(codes, reference.cpu())
        single = ours_06b.codec.encode([wav])[0]
        assert codes.shape == single.shape == (-(-n // SAMPLES_PER_FRAME), 16)
        # causal encoder: padding can reach only the last kept frame (spec §6.6) ...
        assert torch.equal(codes[:-1], single[:-1])
        # ... and cannot when no conv had to pad this item's end
        if n == max(lengths) or n % SAMPLES_PER_FRAME == 0:
            assert torch.equal(codes, single)


def test_encoder_loading_is_strict(base_06b):
    from vllm_qwen3tts.codec.encoder import CodecEncoderConfig
    from vllm_qwen3tts.base.config import read_json

    config = CodecEncoderConfig.from_speech_tokenizer_config(read_json(base_06b / "speech_tokenizer" / "config.json"))
    weights = read_codec_encoder_weights(base_06b)
    missing = dict(weights)
    del missing["encoder.encoder_transformer.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(CheckpointError, match="missing.*q_proj"):
        CodecEncoder(config).load_weights(missing)
    with pytest.raises(CheckpointError, match="unexpected.*surprise"):
        CodecEncoder(config).load_weights({**weights, "encoder.surprise.weight": torch.zeros(1)})
    reshaped = {**weights, "encoder.downsample.conv.weight": torch.zeros(1, 1, 4)}
    with pytest.raises(CheckpointError, match="downsample.conv.weight"):
        CodecEncoder(config).load_weights(reshaped)


@pytest.mark.parity
def test_bf16_matches_official_bf16(base_06b):
    """The documented deployment dtype: the waveform is rounded to bf16 before the encoder,
    codebook entries are formed in bf16, distances taken in fp32 (spec §6.6, §8.3)."""
    reference = load_official(base_06b, dtype=torch.bfloat16).model
    codec = load_codec_encoder(base_06b, dtype=torch.bfloat16)
    speaker = load_speaker_encoder(base_06b, dtype=torch.bfloat16)
    audio = speechlike(LONG_SECONDS, seed=2)
    codes = codec.encode([audio])[0]
    expected = reference.speech_tokenizer.encode(audio, sr=SR).audio_codes[0].cpu()
    assert_varied(codes)
    assert (codes[:, 0] == expected[:, 0]).float().mean() >= 0.99
    assert (codes == expected).float().mean() >= 0.95
    xvector = speaker.embed(audio)
    assert xvector.dtype == torch.bfloat16
    assert cosine(xvector, reference.extract_speaker_embedding(audio, sr=SR).cpu()) >= 0.995


def test_bf16_runs_and_returns_cpu_tensors(base_06b):
    codec = load_codec_encoder(base_06b, dtype=torch.bfloat16)
    speaker = load_speaker_encoder(base_06b, dtype=torch.bfloat16)
    audio = speechlike(2.0)
    codes = codec.encode([audio])[0]
    xvector = speaker.embed(audio)
    assert codes.shape == (25, 16) and codes.dtype == torch.long and codes.device.type == "cpu"
    assert xvector.dtype == torch.bfloat16 and xvector.device.type == "cpu" and torch.isfinite(xvector).all()


# ------------------------------------------------------------------------------------------
# speaker encoder


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["0.6b-base", "1.7b-base"])
def test_speaker_embedding_matches_official(variant, tiny_checkpoint, official):
    reference_model = official(variant).model
    speaker = load_speaker_encoder(tiny_checkpoint(variant))
    for seconds, seed in ((3.0, 0), (5.37, 3)):
        audio = speechlike(seconds, seed=seed)
        expected = reference_model.extract_speaker_embedding(audio, sr=SR).cpu()
        xvector = speaker.embed(audio)
        assert xvector.shape == expected.shape == (reference_model.config.talker_config.hidden_size,)
        assert cosine(xvector, expected) >= XVECTOR_MIN_COSINE
        assert (xvector - expected).abs().max().item() <= XVECTOR_MAX_ABS


def test_speaker_encoder_refuses_what_it_cannot_serve(tiny_checkpoint, base_06b):
    with pytest.raises(CheckpointError, match="Base checkpoint"):
        load_speaker_encoder(tiny_checkpoint("0.6b-custom_voice"))
    speaker = load_speaker_encoder(base_06b)
    with pytest.raises(ValueError, match="too short"):
        speaker.embed(np.zeros(speaker.min_samples - 1, np.float32))
    assert torch.isfinite(speaker.embed(speechlike(speaker.min_samples / SR))).all()


# ------------------------------------------------------------------------------------------
# voice-clone profile


@pytest.mark.parity
def test_voice_clone_profile_matches_official(tmp_path, official_06b, ours_06b):
    audio_16k = speechlike(3.3, 16000, seed=5)
    path = tmp_path / "ref.wav"
    sf.write(path, audio_16k, 16000, subtype="FLOAT")
    text = "This is the reference transcript."

    # the official wrapper reads the file itself; ours receives the uploaded bytes
    (icl_ref,) = official_06b.create_voice_clone_prompt(str(path), ref_text=text)
    icl = create_voice_clone_profile(ours_06b, path.read_bytes(), ref_text=text)
    assert not icl.x_vector_only and icl.ref_text == text == icl_ref.ref_text
    assert_varied(icl.ref_codes)
    assert torch.equal(icl.ref_codes, icl_ref.ref_code.cpu())
    assert cosine(icl.xvector, icl_ref.ref_spk_embedding.cpu()) >= XVECTOR_MIN_COSINE
    assert (icl.xvector - icl_ref.ref_spk_embedding.cpu()).abs().max().item() <= XVECTOR_MAX_ABS

    (xvec_ref,) = official_06b.create_voice_clone_prompt((audio_16k, 16000), x_vector_only_mode=True)
    xvec = create_voice_clone_profile(ours_06b, (audio_16k, 16000), x_vector_only=True)
    assert xvec.x_vector_only and xvec.ref_codes is None and xvec_ref.ref_code is None
    assert cosine(xvec.xvector, xvec_ref.ref_spk_embedding.cpu()) >= XVECTOR_MIN_COSINE
    assert (xvec.xvector - xvec_ref.ref_spk_embedding.cpu()).abs().max().item() <= XVECTOR_MAX_ABS


def test_icl_profile_needs_a_transcript(ours_06b):
    with pytest.raises(ValueError, match="ref_text"):
        create_voice_clone_profile(ours_06b, (speechlike(1.0), SR))
