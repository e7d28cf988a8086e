"""Clients that go away, or stop reading, free everything their requests held at once.

Against the shared speech server (`speech_server`: two CPU codec workers, 4 sequences in the
engine, 12 requests in flight at most), hundreds of requests are abandoned in loops, a few at a
time, at every point: before the response headers, while queued in vLLM or prefilling, mid-chunk,
mid-utterance on a WebSocket. Afterwards the codec workers' open streams (as the workers report
them, polled after the loop), the requests in flight and vLLM's running and waiting requests are
back to 0 within seconds, and a normal request returns whole, decodable audio.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import websockets

from server_harness import metric

pytestmark = pytest.mark.engine

AUTH = {"Authorization": "Bearer alice-key"}
# Two sentences of 40 frames each (the server's --max-frames): long enough to be abandoned mid-stream.
TEXT = "The quick brown fox jumps over the lazy dog. A second sentence follows the first one."
LONG = {"max_new_tokens": 40, "min_new_tokens": 40}
AT_ONCE = 6  # abandoned requests in flight together: more than the engine runs (4), so some wait in vLLM
IDLE_GAUGES = ("qwen3tts_codec_active_streams", "qwen3tts_requests_in_flight", "vllm:num_requests_running",
               "vllm:num_requests_waiting")
SETTLE_S = 20.0  # the codec workers are polled every 5 s


@pytest.fixture(scope="module")
def base(speech_server) -> str:
    wait_until_idle(speech_server.base, after=0.0)
    return speech_server.base


def idle_values(base: str) -> dict[str, float]:
    return {name: metric(base, name) for name in IDLE_GAUGES}


def wait_until_idle(base: str, after: float) -> dict[str, float]:
    """Wait until a poll of the codec workers made after `after` (time.time()) shows no stream
    open on any worker, with nothing in flight in the server or in vLLM; fail after SETTLE_S."""
    deadline = time.time() + SETTLE_S
    while True:
        values = idle_values(base)
        polled = metric(base, "qwen3tts_codec_stats_timestamp_seconds")
        if polled > after and not any(values.values()):
            return values
        if time.time() > deadline:
            raise AssertionError(f"not idle {SETTLE_S:g} s after the abandoned requests: {values} "
                                 f"(codec workers last polled {polled - after:+.1f} s after them)")
        time.sleep(0.5)


def assert_a_normal_request_returns_whole_audio(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="bob-key", max_retries=0, timeout=300)
    response = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="vivian", input="Hello there.", response_format="wav",
        extra_body={"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 12})
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 24000
    assert audio.size == 12 * 1920
    assert float(response.headers["X-Audio-Duration"]) == pytest.approx(audio.size / rate, abs=1e-3)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def run_abandoned(count: int, abandon: Callable[[int, httpx.AsyncClient], Awaitable[None]]) -> float:
    """Run `abandon(i, http)` for i < count, AT_ONCE at a time; the time.time() they all ended."""
    async def main() -> None:
        gate = asyncio.Semaphore(AT_ONCE)
        async with httpx.AsyncClient(timeout=120) as http:
            async def one(i: int) -> None:
                async with gate:
                    await abandon(i, http)

            await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(main())
    return time.time()


def speech_body(i: int, **kw) -> dict:
    formats = ("pcm", "wav", "mp3", "opus")
    return {"model": "tts-1", "voice": "vivian", "input": TEXT, "response_format": formats[i % len(formats)],
            **LONG, **kw}


def assert_every_encoder_was_closed(server, offset: int) -> None:
    """No abandoned stream left its mp3/opus/aac/flac encoder to the garbage collector (which, with
    PyAV 16, aborts the server process): `audio_output` says so when it has to close one itself."""
    assert [line for line in log_since(server.log, offset) if "left unclosed" in line] == []


def log_since(path, offset: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


# ------------------------------------------------------------------------------------------ HTTP


def test_audio_streams_closed_after_their_first_bytes_free_their_codec_streams(base, speech_server):
    offset = speech_server.log.stat().st_size

    async def abandon(i: int, http: httpx.AsyncClient) -> None:
        body = speech_body(i, stream_format="audio")
        async with http.stream("POST", f"{base}/v1/audio/speech", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                break  # closes the connection mid-stream

    wait_until_idle(base, after=run_abandoned(32, abandon))
    assert_a_normal_request_returns_whole_audio(base)
    assert_every_encoder_was_closed(speech_server, offset)


def test_sse_streams_closed_early_free_their_codec_streams(base, speech_server):
    offset = speech_server.log.stat().st_size

    async def abandon(i: int, http: httpx.AsyncClient) -> None:
        body = speech_body(i, stream_format="sse")
        async with http.stream("POST", f"{base}/v1/audio/speech", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and i % 2:
                    assert json.loads(line[5:])["type"] == "speech.audio.delta"
                    break  # after the first event
                if i % 2 == 0:
                    break  # after the first bytes

    wait_until_idle(base, after=run_abandoned(24, abandon))
    assert_a_normal_request_returns_whole_audio(base)
    assert_every_encoder_was_closed(speech_server, offset)


def test_requests_closed_before_the_response_headers_free_everything(base):
    """Cancelled while queued in vLLM, during prefill (the codec stream still opening) or just
    before the first audio: the client gives up before any response header."""
    rng = random.Random(0)

    async def abandon(i: int, http: httpx.AsyncClient) -> None:
        body = speech_body(i, stream_format=("audio", "sse")[i % 2])
        call = asyncio.ensure_future(http.post(f"{base}/v1/audio/speech", json=body, headers=AUTH))
        done, _ = await asyncio.wait({call}, timeout=rng.uniform(0.01, 1.5))
        call.cancel()  # the client gives up (a timeout or a cancel): the connection is closed
        if done:  # the server was quicker: then it answered, with audio
            assert call.result().status_code == 200
        else:
            with pytest.raises(asyncio.CancelledError):
                await call

    wait_until_idle(base, after=run_abandoned(80, abandon))
    assert_a_normal_request_returns_whole_audio(base)


def test_abandoned_whole_file_requests_free_everything_and_log_no_error(base, speech_server):
    offset = speech_server.log.stat().st_size
    rng = random.Random(1)
    count = 64

    async def abandon(i: int, http: httpx.AsyncClient) -> None:
        try:
            await http.post(f"{base}/v1/audio/speech", json=speech_body(i), headers=AUTH,
                            timeout=rng.uniform(0.05, 1.5))
        except httpx.TimeoutException:
            pass

    wait_until_idle(base, after=run_abandoned(count, abandon))
    lines = log_since(speech_server.log, offset)
    errors = [line for line in lines if "ERROR" in line or "Traceback" in line]
    assert errors == []
    # one line per abandoned request (its outcome), besides the servers' periodic lines
    assert sum('"outcome": "cancelled"' in line for line in lines) <= count
    assert len(lines) <= 2 * count + 20
    assert_a_normal_request_returns_whole_audio(base)


# ------------------------------------------------------------------------------------ WebSocket


def test_websockets_closed_mid_utterance_free_everything(base, speech_server):
    offset = speech_server.log.stat().st_size
    url = base.replace("http://", "ws://") + "/v1/audio/speech/stream?api_key=alice-key"

    async def abandon(i: int, http: httpx.AsyncClient) -> None:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "session.config", "voice": "vivian", **LONG,
                                      "text_mode": ("token", "sentence")[i % 2],  # with i % 3: every mode, every point
                                      "response_format": ("pcm", "mp3", "opus", "flac")[i % 4]}))
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "input.text", "text": TEXT}))
            await ws.send(json.dumps({"type": "input.done"}))
            if i % 3 == 0:
                return  # closed while the first sentence is queued or prefilling
            while not isinstance(message := await ws.recv(), bytes):
                assert json.loads(message)["type"] == "audio.start"
            # i % 3 == 2: closed on the first audio frame; else one more frame into the sentence
            if i % 3 == 1:
                await ws.recv()

    wait_until_idle(base, after=run_abandoned(24, abandon))
    assert_a_normal_request_returns_whole_audio(base)
    assert_every_encoder_was_closed(speech_server, offset)


# ------------------------------------------------------------------------------ a stalled client


def test_a_client_that_stops_reading_has_its_stream_ended_and_everything_freed(base):
    """The client asks for far more audio than the sockets' buffers hold and never reads: once a
    write has waited the server's stall timeout, the stream ends and everything is freed while the
    client still holds the connection; the server then closes it."""
    sentences = 24
    text = " ".join(f"Sentence number {i} is here." for i in range(sentences))
    # speed 0.25: four times the samples; with every sentence forced to 40 frames, ~15 MB of PCM
    body = json.dumps({"model": "tts-1", "voice": "vivian", "input": text, "response_format": "pcm",
                       "stream_format": "audio", "speed": 0.25, **LONG}).encode()
    whole = sentences * 40 * 1920 * 4 * 2
    url = urlparse(base)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((url.hostname, url.port))
    try:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 60
        while metric(base, "qwen3tts_requests_in_flight") == 0:  # admitted, then it writes until it blocks
            assert time.time() < deadline, "the request was never admitted"
            time.sleep(0.2)
        wait_until_idle_within(base, 120)
        # the client never read a byte, and the connection is still open on its side: now it reads
        sock.settimeout(30)
        received = 0
        while piece := sock.recv(1 << 20):
            received += len(piece)
        assert 0 < received < whole / 2  # the server ended the stream, and closed the connection
    finally:
        sock.close()
    assert_a_normal_request_returns_whole_audio(base)


def wait_until_idle_within(base: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while any(idle_values(base).values()):
        assert time.time() < deadline, f"still busy after {timeout_s:g} s: {idle_values(base)}"
        time.sleep(1)
    wait_until_idle(base, after=time.time())


# ------------------------------------------------------------------------------- a full pool


def test_a_full_codec_pool_refuses_new_streams_itself_and_counts_slots_as_its_worker_does(tiny_checkpoint):
    """What admission asks (`CodecPool.free_slots`) agrees with the worker's own count at every
    step; a stream beyond the slots is refused by the pool (`CodecBusyError`, which the server
    answers with 503 + Retry-After before any audio) without reaching the worker; a final chunk
    whose wait was cancelled keeps its slot counted until the stream is closed."""
    from vllm_qwen3tts.codec.client import CodecClient
    from vllm_qwen3tts.codec.pool import CodecBusyError, CodecPool
    from vllm_qwen3tts.codec.worker import CodecWorkerConfig, start_codec_worker

    worker = start_codec_worker(CodecWorkerConfig(str(tiny_checkpoint("0.6b-base")), max_streams=2, num_threads=1),
                                startup_timeout_s=120)
    codes = np.random.default_rng(0).integers(0, 2048, size=(3, 16), dtype=np.int64)

    async def scenario() -> None:
        client = CodecClient(timeout_s=60)
        client.connect(worker.address)
        pool = CodecPool([client], max_streams=2)

        async def agree(free: int) -> None:
            assert (pool.free_slots(), (await client.stats()).free_slots) == (free, free)

        try:
            await agree(2)
            await pool.open_stream("a")
            await pool.open_stream("b")
            await agree(0)
            with pytest.raises(CodecBusyError, match="all 2 codec stream slots are in use"):
                await pool.open_stream("c")
            await agree(0)
            assert (await pool.decode("a", codes, final=True)).size == 3 * 1920
            await agree(1)
            final = asyncio.ensure_future(pool.decode("b", codes, final=True))
            await asyncio.sleep(0)
            final.cancel()
            assert pool.free_slots() == 1  # the final chunk may not have gone out: still counted
            await pool.close_stream("b")
            await agree(2)
            await pool.open_stream("c")  # the freed slots serve again
            await pool.close_stream("c")
            await agree(2)
        finally:
            client.close()

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
