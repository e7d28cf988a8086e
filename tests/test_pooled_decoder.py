"""The codec worker's pooled decoder: batches padded to a grid of shapes (with a scratch row
nobody owns) and chunks of different lengths padded to one call length give every stream
exactly the audio of its own whole-utterance decode. On a GPU the same shapes are replayed as
CUDA graphs; this file checks the padding and row bookkeeping, which are the same with or
without graphs."""

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


def test_chunks_of_nearby_lengths_share_a_call_and_short_first_chunks_go_first(decoder):
    pooled = PooledDecoder(decoder, streams=8, grid=DecodeGrid((1, 2, 4, 8), (2, 4, 8, 16, 25)))
    assert [pooled.run_length(n) for n in (1, 5, 25, 30)] == [2, 8, 25, 30]  # beyond the grid: as it is
    # one 16-frame chunk pads to 25 for less than a call costs; four 2-frame chunks would not
    frames = [25, 16, 2, 2, 2, 2, 25]
    calls = pooled.plan_calls(frames, max_batch=8)
    assert calls == [(2, [2, 3, 4, 5]), (25, [0, 6, 1])]
    assert sorted(i for _, members in pooled.plan_calls(frames, max_batch=2) for i in members) == list(range(7))
    assert all(len(m) <= 2 for _, m in pooled.plan_calls(frames, max_batch=2))


@torch.inference_mode()
def test_padded_ragged_batches_give_each_stream_its_whole_decode(decoder):
    """Three streams in rows 4, 0, 2 of a 5-row pool: a batch of 3 padded to 4 rows with the
    scratch row, chunks of 2, 5 and 8 frames decoded in one call of 8 (each stream advancing
    by its own frames only), a call length off the grid, and ragged final chunks."""
    pooled = PooledDecoder(decoder, streams=5, grid=DecodeGrid((1, 4), (2, 8)))
    rows = [4, 0, 2]
    schedules = {4: [2, 8, 8, 3], 0: [2, 5, 4, 10], 2: [2, 2, 6, 11]}
    codes = {row: random_codes(sum(schedules[row]), seed=row) for row in rows}
    for row in rows:
        pooled.reset(row)
    out = {row: [] for row in rows}
    for step in range(4):
        chunks, start = [], {}
        for row in rows:
            start = sum(schedules[row][:step])
            chunks.append(codes[row][start : start + schedules[row][step]])
        length = max(pooled.run_length(c.shape[0]) for c in chunks)
        for row, chunk, audio in zip(rows, chunks, pooled.decode(rows, chunks, length)):
            assert audio.shape == (chunk.shape[0] * SAMPLES_PER_FRAME,)
            out[row].append(audio)
    for row in rows:
        streamed = np.concatenate(out[row])
        assert np.abs(streamed - whole_decode(decoder, codes[row])).max() <= FP32_TOL, row


@torch.inference_mode()
def test_padding_never_touches_other_streams_rows(decoder):
    """A stream left waiting keeps its state while others decode padded batches around it."""
    pooled = PooledDecoder(decoder, streams=3, grid=DecodeGrid((2,), (4,)))
    waiting, busy = 1, 0
    codes_w, codes_b = random_codes(6, seed=7), random_codes(12, seed=8)
    for row in (waiting, busy):
        pooled.reset(row)
    first = pooled.decode([waiting], [codes_w[:4]], 4)[0]
    busy_audio = [pooled.decode([busy], [codes_b[i : i + 4]], 4)[0] for i in (0, 4, 8)]  # each padded to 2 rows
    second = pooled.decode([waiting], [codes_w[4:6]], 4)[0]  # 2 real frames in a 4-frame call
    assert np.abs(np.concatenate([first, second]) - whole_decode(decoder, codes_w)).max() <= FP32_TOL
    assert np.abs(np.concatenate(busy_audio) - whole_decode(decoder, codes_b)).max() <= FP32_TOL
