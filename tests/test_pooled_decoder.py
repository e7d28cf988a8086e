"""The codec worker's pooled decoder: batches padded to a grid of shapes (with a scratch row
nobody owns) and final chunks padded in length give every stream exactly the audio of its own
whole-utterance decode. On a GPU the same shapes are replayed as CUDA graphs; this file checks
the padding and row bookkeeping, which are the same with or without graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_qwen3tts.codec.decoder import CodecDecoder
from vllm_qwen3tts.codec.pooled_decoder import DecodeGrid, PooledDecoder

SAMPLES_PER_FRAME = 1920
FP32_TOL = 1e-4  # spec §8.3, codec waveform, fp32


def random_codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, size=(frames, 16), dtype=np.int64)


@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder(tiny_checkpoint) -> CodecDecoder:
    return CodecDecoder.from_checkpoint(tiny_checkpoint("0.6b-base"))


def whole_decode(decoder: CodecDecoder, codes: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return decoder(torch.from_numpy(codes)[None])[0].numpy()


def test_grid_buckets():
    grid = DecodeGrid.up_to(48, (25, 2, 8, 4, 16))
    assert grid.batch_sizes == (1, 2, 4, 8, 16, 32, 48)
    assert grid.chunk_lengths == (2, 4, 8, 16, 25)
    assert [grid.batch_bucket(b) for b in (1, 3, 33, 48, 49)] == [1, 4, 48, 48, None]
    assert [grid.length_bucket(n) for n in (1, 2, 9, 25, 26)] == [2, 2, 16, 25, None]


def test_only_final_chunks_are_padded_in_length(decoder):
    pooled = PooledDecoder(decoder, streams=2, grid=DecodeGrid((1, 2), (2, 8)))
    assert pooled.run_length(5, final=True) == 8
    assert pooled.run_length(5, final=False) == 5  # a stream goes on from exactly where it is
    assert pooled.run_length(9, final=True) == 9  # longer than the grid: decoded as it is
    assert PooledDecoder(decoder, streams=2).run_length(5, final=True) == 5  # no grid, no padding


@torch.inference_mode()
def test_padded_batches_give_each_stream_its_whole_decode(decoder):
    """Three streams in rows 4, 0, 2 of a 5-row pool, batches of 3 padded to 4 and of 1, a
    chunk length off the grid, and final chunks of 3 and 5 frames padded to 8."""
    pooled = PooledDecoder(decoder, streams=5, grid=DecodeGrid((1, 4), (2, 8)))
    rows = [4, 0, 2]
    codes = {row: random_codes(21, seed=row) for row in rows}  # 2 + 8 + 8 + 3 frames
    for row in rows:
        pooled.reset(row)
    out = {row: [] for row in rows}

    def step(batch_rows: list[int], start: int, frames: int, final: bool) -> None:
        chunks = [codes[r][start : start + frames] for r in batch_rows]
        for r, audio in zip(batch_rows, pooled.decode(batch_rows, chunks, pooled.run_length(frames, final))):
            assert audio.shape == (frames * SAMPLES_PER_FRAME,)
            out[r].append(audio)

    step(rows, 0, 2, final=False)  # batch 3 -> padded to 4 with the scratch row
    step(rows[:2], 2, 8, final=False)
    step(rows[2:], 2, 5, final=False)  # 5 is off the grid: eager, unpadded
    step(rows[2:], 7, 3, final=False)
    step(rows, 10, 8, final=False)
    step(rows[:2], 18, 3, final=True)  # padded to 8 frames; the extra audio is dropped
    step(rows[2:], 18, 3, final=True)

    for row in rows:
        streamed = np.concatenate(out[row])
        assert np.abs(streamed - whole_decode(decoder, codes[row])).max() <= FP32_TOL, row


@torch.inference_mode()
def test_padding_never_touches_other_streams_rows(decoder):
    """A stream left waiting keeps its state while others decode padded batches around it."""
    pooled = PooledDecoder(decoder, streams=3, grid=DecodeGrid((2,), (4,)))
    waiting, busy = 1, 0
    codes_w, codes_b = random_codes(8, seed=7), random_codes(12, seed=8)
    for row in (waiting, busy):
        pooled.reset(row)
    first = pooled.decode([waiting], [codes_w[:4]], 4)[0]
    busy_audio = [pooled.decode([busy], [codes_b[i : i + 4]], 4)[0] for i in (0, 4, 8)]  # each padded to 2 rows
    second = pooled.decode([waiting], [codes_w[4:]], pooled.run_length(4, final=True))[0]
    assert np.abs(np.concatenate([first, second]) - whole_decode(decoder, codes_w)).max() <= FP32_TOL
    assert np.abs(np.concatenate(busy_audio) - whole_decode(decoder, codes_b)).max() <= FP32_TOL
