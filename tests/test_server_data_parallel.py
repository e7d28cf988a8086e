"""Serving past one GPU on vLLM's own machinery, checked on the CPU build: `--data-parallel-size 2`
runs two talker engines behind one API server, and concurrent requests are balanced over both
and all answered in full."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from server_harness import metric, running_server

from vllm_qwen3tts.server.plugin import codec_devices_for

pytestmark = pytest.mark.engine
FRAMES = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("server-dp")
    with running_server(tmp, ["--model", str(tiny_checkpoint("0.6b-custom_voice")), "--data-parallel-size", "2",
                              "--max-num-seqs", "4", "--max-model-len", "512",
                              "--enforce-eager"],  # no compile: this is about balance (the shared server compiles)
                        timeout_s=600) as (base, log):
        yield base


def test_requests_are_balanced_over_both_engines_and_all_answered_in_full(server):
    def body(i: int) -> dict:
        return {"input": f"Sentence number {i}.", "voice": "vivian", "response_format": "pcm", "seed": i,
                "max_new_tokens": FRAMES, "min_new_tokens": FRAMES, "language": "English"}

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/audio/speech", json=body(i)) for i in range(8)))

    before = [metric(server, "vllm:generation_tokens_total", {"engine": e}) for e in ("0", "1")]
    replies = asyncio.run(burst())
    assert all(r.status_code == 200 for r in replies), [r.text[:200] for r in replies]
    audio = [np.frombuffer(r.content, dtype="<i2") for r in replies]
    assert all(a.shape == (FRAMES * 1920,) and np.abs(a).max() > 0 for a in audio)
    after = [metric(server, "vllm:generation_tokens_total", {"engine": e}) for e in ("0", "1")]
    served = [a - b for a, b in zip(after, before)]
    assert all(n > 0 for n in served), served
    assert sum(served) == 8 * FRAMES


def test_codec_workers_go_beside_each_data_parallel_rank():
    def config(dp: int, tp: int = 1):
        return SimpleNamespace(data_parallel_size_local=dp, tensor_parallel_size=tp)

    assert codec_devices_for(config(1), on_gpu=True) == ["cuda"]
    assert codec_devices_for(config(2), on_gpu=True) == ["cuda:0", "cuda:1"]
    assert codec_devices_for(config(2, tp=2), on_gpu=True) == ["cuda:0", "cuda:2"]
    assert codec_devices_for(config(4), on_gpu=False) == ["cpu"]
