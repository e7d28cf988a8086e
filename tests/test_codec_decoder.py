"""Codec decoder (codes -> 24 kHz audio): parity with the official decoder, exact streaming,
batching, and loading errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from oracle import load_official

from vllm_qwen3tts.codec.decoder import CodecDecoder, dilated_conv_by_phases, pad_codes, read_decoder_weights
from vllm_qwen3tts.base.config import CheckpointError

VARIANT = "0.6b-base"  # every variant ships the same speech tokenizer
SAMPLES_PER_FRAME = 1920
FP32_TOL = 1e-4  # spec §8.3, codec waveform, fp32
# Long enough that the transformer's 72-frame sliding window is exceeded.
STREAM_FRAMES = 100


def random_codes(frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (frames, 16), generator=gen)


def max_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread():
    """These tensors are small: with a second busy process on a 2-core machine, torch's
    intra-op threads mostly wait on each other (measured: the file takes 36 s instead of 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    """The tiny checkpoint; its transformer LayerScales are drawn in [0.3, 1], so the
    transformer shapes the waveform and attention or KV-cache mistakes exceed the tolerance."""
    return tiny_checkpoint(VARIANT)


@pytest.fixture(scope="module")
def decoder(checkpoint) -> CodecDecoder:
    return CodecDecoder.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def official_codec(checkpoint):
    """The official 12 Hz tokenizer wrapper (`.decode([{"audio_codes": codes}])`)."""
    tokenizer = load_official(checkpoint).model.speech_tokenizer
    return tokenizer


def official_decode(official_codec, items: list[torch.Tensor]) -> list[torch.Tensor]:
    wavs, sample_rate = official_codec.decode([{"audio_codes": c} for c in items])
    assert sample_rate == 24000
    return [torch.from_numpy(w) for w in wavs]


def stream(decoder: CodecDecoder, codes: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """Decode codes [T, 16] of one stream chunk by chunk; returns the concatenated samples."""
    assert sum(schedule) == codes.shape[0]
    state = decoder.new_stream_state(1)
    pieces, start = [], 0
    for n in schedule:
        audio, state = decoder.decode_chunk(codes[None, start : start + n], state)
        assert audio.shape == (1, n * SAMPLES_PER_FRAME)
        pieces.append(audio[0])
        start += n
    return torch.cat(pieces)


@pytest.fixture(scope="module")
def codes_100() -> torch.Tensor:
    return random_codes(STREAM_FRAMES, seed=1)


@pytest.fixture(scope="module")
def official_wave_100(official_codec, codes_100) -> torch.Tensor:
    (wav,) = official_decode(official_codec, [codes_100])
    return wav


@pytest.fixture(scope="module")
def whole_100(decoder, codes_100) -> torch.Tensor:
    with torch.inference_mode():
        return decoder(codes_100[None])[0]


# ----------------------------------------------------------------------------------------------
# the comparisons below cannot pass trivially


@pytest.mark.parity
def test_reference_waveforms_are_nontrivial(official_codec, codes_100, official_wave_100):
    wav = official_wave_100
    assert wav.std() > 0.03  # 300x the fp32 tolerance
    assert (wav.abs() >= 0.999).float().mean() < 0.01  # the final clamp does not flatten it
    # the transformer matters, even beyond one attention window (72 frames): history that
    # differs only 80-100 frames back still moves the last frame well above the tolerance
    other = codes_100.clone()
    other[:20] = random_codes(20, seed=2)
    (wav2,) = official_decode(official_codec, [other])
    assert max_err(wav[-SAMPLES_PER_FRAME:], wav2[-SAMPLES_PER_FRAME:]) > 10 * FP32_TOL


@pytest.mark.parity
def test_parity_check_detects_one_perturbed_weight(checkpoint, codes_100, official_wave_100):
    perturbed = CodecDecoder.from_checkpoint(checkpoint)
    with torch.no_grad():
        perturbed.transformer.layers[-1].mlp_layer_scale[0] *= 1.01  # 1 % on one of 32 channels
    (mine,) = perturbed.decode(codes_100[None])
    assert max_err(mine, official_wave_100) > 2 * FP32_TOL


# ----------------------------------------------------------------------------------------------
# whole utterances vs the official decoder


@pytest.mark.parity
def test_padded_batch_matches_official(decoder, official_codec):
    items = [random_codes(75, seed=4), random_codes(30, seed=5), random_codes(50, seed=6)]
    items[1][-1, 0] = 0  # a genuine code 0 in codebook 0 is not padding
    reference = official_decode(official_codec, items)
    mine = decoder.decode(pad_codes(items))
    for ref, got, codes in zip(reference, mine, items):
        assert got.dtype == torch.float32
        assert got.shape == (codes.shape[0] * SAMPLES_PER_FRAME,) == ref.shape
        assert max_err(got, ref) <= FP32_TOL


@pytest.mark.parity
def test_long_utterance_matches_official_chunked_decode(decoder, official_codec):
    codes = random_codes(320, seed=7)  # > 300 frames: two chunks, the second with 25 frames of context
    (reference,) = official_decode(official_codec, [codes])
    (mine,) = decoder.decode(codes[None])
    assert mine.shape == reference.shape == (320 * SAMPLES_PER_FRAME,)
    assert max_err(mine, reference) <= FP32_TOL
    # the chunking is visible: a single pass differs after frame 300
    with torch.inference_mode():
        single = decoder(codes[None])[0]
    assert max_err(single[300 * SAMPLES_PER_FRAME :], reference[300 * SAMPLES_PER_FRAME :]) > 10 * FP32_TOL


@pytest.mark.parity
def test_chunked_forward_matches_official_chunking_rule(decoder, official_codec):
    """Chunks of 20 frames with 25 of context reach every branch of the context rule:
    none for the first chunk, all previous frames while fewer than 25 exist, then 25."""
    codes = random_codes(50, seed=8)[None]
    with torch.inference_mode():
        reference = official_codec.model.decoder.chunked_decode(codes.transpose(1, 2), 20, 25)[:, 0]
        mine = decoder.chunked_forward(codes, chunk_frames=20, left_context_frames=25)
    assert max_err(mine, reference) <= FP32_TOL


def test_padded_batch_equals_items_decoded_alone(decoder):
    items = [random_codes(13, seed=9), random_codes(60, seed=10), random_codes(45, seed=11)]
    batched = decoder.decode(pad_codes(items))
    for codes, got in zip(items, batched):
        (alone,) = decoder.decode(codes[None])
        assert max_err(got, alone) <= 1e-5


# ----------------------------------------------------------------------------------------------
# exact streaming


@pytest.mark.parametrize(
    "schedule",
    [
        [1, 2, 4, 8, 25, 25, 35],  # low-latency start, then the serving chunk size
        [1] * STREAM_FRAMES,  # frame by frame, through the KV cache's wrap-around
        [3, 69, 1, 27],  # the window (72) filled exactly, then one frame past it
        [STREAM_FRAMES],
    ],
    ids=["growing", "frame-by-frame", "window", "one-chunk"],
)
def test_streaming_equals_whole_forward(decoder, codes_100, whole_100, schedule):
    with torch.inference_mode():
        streamed = stream(decoder, codes_100, schedule)
    assert max_err(streamed, whole_100) <= FP32_TOL


@pytest.mark.parity
def test_streaming_matches_official(decoder, codes_100, official_wave_100):
    with torch.inference_mode():
        streamed = stream(decoder, codes_100, [1, 4, 25, 25, 25, 20])
    assert max_err(streamed, official_wave_100) <= FP32_TOL


def test_streams_started_at_different_times_batch_together(decoder):
    """A worker keeps a pool of stream slots and decodes any subset with equal chunk length in
    one call; each stream must come out as if decoded alone."""
    lengths = {"a": 95, "b": 60, "c": 65}
    codes = {k: random_codes(n, seed=20 + i) for i, (k, n) in enumerate(lengths.items())}
    slot = {"a": 3, "b": 0, "c": 2}  # slot 1 stays idle throughout
    pool = decoder.new_stream_state(4)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in codes}
    pos = {k: 0 for k in codes}

    def step(names: list[str], n: int) -> None:
        idx = torch.tensor([slot[k] for k in names])
        sub = pool.select(idx)
        batch = torch.stack([codes[k][pos[k] : pos[k] + n] for k in names])
        audio, sub = decoder.decode_chunk(batch, sub)
        pool.update(idx, sub)
        for row, k in enumerate(names):
            out[k].append(audio[row])
            pos[k] += n

    with torch.inference_mode():
        step(["b"], 5)
        pool.conv_tails[0][2] = 1.0  # slot 2 still holds an earlier request's state ...
        pool.keys[:, 2] = 1.0
        pool.positions[2] = 17
        pool.reset(torch.tensor([2]))  # ... until it is handed to c
        step(["a"], 30)
        step(["a", "b"], 25)  # a at frame 30, b at frame 5
        step(["c", "b", "a"], 1)
        step(["b", "c", "a"], 4)
        step(["c", "a"], 35)  # a passes the 72-frame window while c is young
        step(["b", "c"], 25)
        assert pos == lengths
        for k in codes:
            whole = decoder(codes[k][None])[0]
            assert max_err(torch.cat(out[k]), whole) <= FP32_TOL
    assert pool.positions.tolist() == [lengths["b"], 0, lengths["c"], lengths["a"]]


def test_compiled_decoder_streams_like_the_eager_one_from_a_single_compilation(checkpoint, decoder):
    """On a GPU the codec worker runs the decoder through torch.compile as one graph, dynamic in
    the batch size and the chunk length (`compile_whole`). Every call of 2+ streams and 2+
    frames, ragged ones included, must reuse that one compilation and give the eager audio and
    state; a single stream or frame runs eagerly."""
    compiled = CodecDecoder.from_checkpoint(checkpoint)
    compiled.compile_whole()
    calls = [(3, 5, [5, 2, 4]), (2, 2, None), (4, 7, [7, 7, 1, 3]), (1, 3, None), (2, 1, None), (5, 4, [4, 4, 4, 2, 3])]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for i, (batch, frames, lengths) in enumerate(calls):
            codes = random_codes(batch * frames, seed=40 + i).view(batch, frames, 16)
            lens = None if lengths is None else torch.tensor(lengths)
            want, want_state = decoder.decode_chunk(codes, decoder.new_stream_state(batch), lens)
            got, got_state = compiled.decode_chunk(codes, compiled.new_stream_state(batch), lens)
            for row in range(batch):
                real = (frames if lengths is None else lengths[row]) * SAMPLES_PER_FRAME
                assert max_err(got[row, :real], want[row, :real]) <= 1e-5, (batch, frames, row)
            assert got_state.positions.tolist() == want_state.positions.tolist()
            assert max_err(got_state.keys, want_state.keys) <= 1e-5
            for a, b in zip(got_state.conv_tails, want_state.conv_tails, strict=True):
                assert max_err(a, b) <= 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1


@pytest.mark.parametrize("length, dilation", [(10, 3), (31, 9), (7, 3), (1, 9), (18, 9)])
def test_dilated_conv_by_phases_is_the_dilated_conv(length, dilation):
    """The vocoder's dilated convs run as undilated convs over the input's interleaved phases
    (cuDNN is slow on dilation): every output length, divisible by the dilation or not."""
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(2, 6, length + 6 * dilation, generator=gen)
    weight, bias = torch.randn(5, 6, 7, generator=gen), torch.randn(5, generator=gen)
    got = dilated_conv_by_phases(lambda z: torch.nn.functional.conv1d(z, weight, bias), x, dilation, 7)
    assert max_err(got, torch.nn.functional.conv1d(x, weight, bias, dilation=dilation)) <= 1e-5


def test_channels_last_convs_stream_the_same_audio(checkpoint, codes_100, whole_100):
    """`use_channels_last` (a GPU speed option) runs every conv as a 2-D one on channels-last
    tensors: streaming chunk by chunk still gives the whole-utterance audio."""
    decoder = CodecDecoder.from_checkpoint(checkpoint)
    decoder.use_channels_last()
    with torch.inference_mode():
        streamed = stream(decoder, codes_100, [1, 2, 4, 8, 25, 25, 35])
    assert max_err(streamed, whole_100) <= FP32_TOL


def test_stream_state_shapes_do_not_change(decoder):
    state = decoder.new_stream_state(2)
    shapes = [t.shape for t in (state.positions, state.keys, state.values, *state.conv_tails)]
    with torch.inference_mode():
        for n in (1, 3, 80):
            _, state = decoder.decode_chunk(random_codes(2 * n, seed=n).view(2, n, 16), state)
    assert [t.shape for t in (state.positions, state.keys, state.values, *state.conv_tails)] == shapes


# ----------------------------------------------------------------------------------------------
# bf16 (the CUDA serving dtype; spec §8.3: SNR >= 30 dB vs the official bf16 decoder)


@pytest.mark.parity
def test_bf16_matches_official_bf16(checkpoint):
    official_bf16 = load_official(checkpoint, dtype=torch.bfloat16).model.speech_tokenizer.model.decoder
    mine = CodecDecoder.from_checkpoint(checkpoint, dtype=torch.bfloat16)
    codes = random_codes(30, seed=30)[None]
    with torch.inference_mode():
        reference = official_bf16(codes.transpose(1, 2))[:, 0].float()
        got = mine(codes).float()
        streamed = stream(mine, codes[0], [1, 4, 25]).float()

    def snr_db(signal, estimate):
        return (10 * torch.log10(signal.pow(2).sum() / (signal - estimate).pow(2).sum())).item()

    assert snr_db(reference, got) >= 30
    assert snr_db(got[0], streamed) >= 30


# ----------------------------------------------------------------------------------------------
# loading errors


def test_missing_weight_file_is_reported(checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    (broken / "speech_tokenizer" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing codec weights .*model.safetensors"):
        CodecDecoder.from_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        CodecDecoder.from_checkpoint(tmp_path / "nowhere")


def test_missing_unexpected_and_misshapen_keys_are_reported(checkpoint):
    weights = dict(read_decoder_weights(checkpoint / "speech_tokenizer" / "model.safetensors"))
    fresh = CodecDecoder(CodecDecoder.from_checkpoint(checkpoint).config)
    assert len(fresh.load_weights(weights.items())) == len(weights)  # everything consumed

    dropped = "pre_transformer.layers.0.self_attn.k_proj.weight"
    with pytest.raises(CheckpointError, match=f"lacks 1 weights: .*{dropped}"):
        fresh.load_weights((k, v) for k, v in weights.items() if k != dropped)
    with pytest.raises(CheckpointError, match="unexpected codec decoder weights: .*upsample.9.gamma"):
        fresh.load_weights([*weights.items(), ("upsample.9.gamma", torch.zeros(3))])
    bad = dict(weights, **{"decoder.6.conv.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"decoder.6.conv.bias: checkpoint shape \(2,\)"):
        fresh.load_weights(bad.items())
