"""Serving past one GPU on vLLM's own machinery, checked on the CPU build: `--data-parallel-size 2`
runs two talker engines behind one API server, and concurrent requests are balanced over both
and all answered in full. Last, a shutdown whose grace period ends before a stream does (it ends
the server)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import pytest
from server_harness import metric, running_server

from vllm_qwen3tts.server.plugin import codec_devices_for

pytestmark = pytest.mark.engine
FRAMES = 8
GRACE_S = 2  # this server's shutdown grace period (`--shutdown-grace`)


@pytest.fixture(scope="module")
def served(tmp_path_factory, hub_model):
    """`vllm-qwen3tts serve --model HUB_ID`, read offline from the Hugging Face cache, on two engines."""
    tmp = tmp_path_factory.mktemp("server-dp")
    repo, hub_env = hub_model("0.6b-custom_voice")
    with running_server(tmp, ["--model", repo, "--data-parallel-size", "2",
                              "--max-num-seqs", "4", "--max-model-len", "512", "--shutdown-grace", str(GRACE_S),
                              "--enforce-eager"],  # no compile: this is about balance (the shared server compiles)
                        env=hub_env, timeout_s=600, as_server=True) as served:
        yield served  # the last test ends it: the harness's teardown finds it gone


@pytest.fixture(scope="module")
def server(served):
    return served.base


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


def test_a_stream_still_running_when_the_grace_period_ends_is_ended_and_the_server_exits_0(served):
    """Last: it ends this module's server (`vllm-qwen3tts serve`, grace period GRACE_S). An SSE
    stream far longer than the grace period, in flight at SIGTERM, is ended when the period is
    over, with a `speech.audio.error` event saying `shutting_down` (raw audio would end early);
    the server still exits with status 0, and no process of its own is left."""
    api = psutil.Process(served.pid)
    children = api.children(recursive=True)
    assert sum("EngineCore" in c.name() for c in children) == 2, [c.name() for c in children]
    frames = 400  # 32 s of audio
    body = {"input": "A long stream.", "voice": "vivian", "response_format": "pcm", "stream_format": "sse",
            "max_new_tokens": frames, "min_new_tokens": frames, "language": "English"}
    events, audio_bytes = [], 0
    with httpx.stream("POST", f"{served.base}/v1/audio/speech", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            events.append(event["type"])
            if event["type"] == "speech.audio.delta":
                audio_bytes += len(base64.b64decode(event["audio"]))
                if len(events) == 1:
                    os.kill(served.pid, signal.SIGTERM)  # the stream is in flight
            elif event["type"] == "speech.audio.error":
                assert event["error"]["code"] == "shutting_down", event
    assert events[0] == "speech.audio.delta" and events[-1] == "speech.audio.error", events[-3:]
    assert 0 < audio_bytes < frames * 1920 * 2  # ended early, and the client saw it end
    assert api.wait(timeout=120) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive  # both engine cores and the codec worker went with it
    log = served.log.read_text(errors="replace")
    assert f"shutdown grace period of {GRACE_S} s is over: ending 1 speech requests" in log
