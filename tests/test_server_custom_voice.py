"""The speech server, started the way the README starts it (`vllm-qwen3tts serve`, embedded
default checkpoint), called with the real `openai` client, httpx and websockets.

The server runs the CPU vLLM engine with 4 sequences at a time and priority scheduling,
three API keys (two ordinary tenants and one tightly limited) and a global bound of 12
requests in flight.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import websockets

from server_harness import KEYS, assert_renders_one_generation, metric  # noqa: F401 (KEYS: the keys the tests use)

pytestmark = pytest.mark.engine

GREEDY = {"temperature": 0, "language": "English"}
FRAMES = 10
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def server(speech_server):
    return speech_server.base


def client(server, key="alice-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=300)


def speak(server, key="alice-key", **kw) -> bytes:
    kw.setdefault("model", "tts-1")
    kw.setdefault("voice", "vivian")
    kw.setdefault("input", "Hello there.")
    extra = {**GREEDY, "max_new_tokens": FRAMES, **kw.pop("extra_body", {})}
    return client(server, key).audio.speech.create(extra_body=extra, **kw).content


def decode(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as f:
        stream = f.streams.audio[0]
        frames = [fr.to_ndarray().reshape(-1) for fr in f.decode(stream)]
        return np.concatenate(frames).astype(np.float32), stream.rate


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus", "aac"])
def test_every_format_decodes_with_the_right_rate_and_length(server, fmt):
    data = speak(server, response_format=fmt)
    expected = FRAMES * 1920
    if fmt == "pcm":
        audio, rate = pcm16(data), 24000
    elif fmt == "wav":
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    else:
        audio, rate = decode(data)
    if fmt == "opus":  # FFmpeg decodes Opus at 48 kHz; the stream itself is 24 kHz
        assert rate == 48000 and abs(len(audio) / 2 - expected) <= 960
    elif fmt in ("mp3", "aac"):
        assert rate == 24000 and expected <= len(audio) <= expected + 2 * 1152
    else:
        assert rate == 24000 and len(audio) == expected
    assert np.abs(audio).max() > 1e-3


def test_streamed_chunks_concatenate_to_the_non_streamed_audio(server):
    text = "First sentence here. And a second one follows!"

    def whole() -> bytes:
        audio = speak(server, response_format="pcm", input=text, voice="ryan")
        assert len(audio) == 2 * FRAMES * 1920 * 2  # two sentences, 16-bit samples
        return audio

    def streamed() -> bytes:
        with client(server).audio.speech.with_streaming_response.create(
            model="tts-1", voice="ryan", input=text, response_format="pcm", stream_format="audio",
            extra_body={**GREEDY, "max_new_tokens": FRAMES},
        ) as response:
            chunks = list(response.iter_bytes())
        assert len(chunks) >= 3
        return b"".join(chunks)

    assert_renders_one_generation(streamed, whole)


def test_sse_deltas_add_up_to_the_audio_and_end_with_usage(server):
    text = "Server sent events."

    def sse() -> bytes:
        events = sse_events(server, input=text)
        deltas = [e for e in events if e["type"] == "speech.audio.delta"]
        assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
        usage = events[-1]["usage"]
        assert usage["output_tokens"] == FRAMES and usage["total_tokens"] == usage["input_tokens"] + FRAMES
        return b"".join(base64.b64decode(e["audio"]) for e in deltas)

    assert_renders_one_generation(sse, lambda: speak(server, response_format="pcm", input=text, voice="serena"))


def sse_events(server, **fields) -> list[dict]:
    """The events of one SSE speech request (serena, 16-bit PCM, greedy, FRAMES frames per sentence)."""
    with httpx.stream("POST", f"{server}/v1/audio/speech", timeout=300, headers={"Authorization": "Bearer alice-key"},
                      json={"voice": "serena", "response_format": "pcm", "stream_format": "sse", **GREEDY,
                            "max_new_tokens": FRAMES, **fields}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def sse_audio_deltas(server, **fields) -> list[bytes]:
    return [base64.b64decode(e["audio"]) for e in sse_events(server, **fields) if e["type"] == "speech.audio.delta"]


def test_initial_codec_chunk_frames_sets_the_first_streamed_chunk_and_not_the_audio(server):
    frame_bytes = 1920 * 2  # one 80 ms frame of 16-bit PCM

    def rendered(first_chunks: list[int], **fields) -> bytes:
        deltas = sse_audio_deltas(server, input="One sentence.", **fields)
        assert [len(d) for d in deltas[: len(first_chunks)]] == [n * frame_bytes for n in first_chunks]
        return b"".join(deltas)

    assert_renders_one_generation(
        lambda: rendered([1, 2, 4]),  # alone on the server: the light-load schedule, 1 frame first
        lambda: rendered([2, 4], initial_codec_chunk_frames=2),
        lambda: rendered([5, 5], initial_codec_chunk_frames=5),  # 5, then the rest of 10 frames
    )


async def websocket_session(server: str, text_mode: str, send) -> tuple[list[dict], dict[int, bytes]]:
    """A WebSocket session: `send(ws, events)` writes the client's messages (it may wait on the
    events so far); returns every event and the audio bytes by sentence (utterance) index."""
    events, audio = [], {}
    async with websockets.connect(f"{server.replace('http', 'ws')}/v1/audio/speech/stream?api_key=bob-key",
                                  max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.config", "text_mode": text_mode, "voice": "aiden",
                                  "response_format": "pcm", **GREEDY, "max_new_tokens": FRAMES}))
        writer = asyncio.create_task(send(ws, events))
        current = None
        async for message in ws:
            if isinstance(message, bytes):
                audio[current] = audio.get(current, b"") + message
                continue
            event = json.loads(message)
            events.append(event)
            if event["type"] == "audio.start":
                current = event["sentence_index"]
            if event["type"] in ("session.done", "error"):
                break
        await writer
    return events, audio


def test_websocket_text_in_pieces_audio_out_per_sentence(server):
    sentences = ["The first sentence arrives in pieces.", "A second one follows."]

    async def send(ws, events):
        for word in " ".join(sentences).split(" "):
            await ws.send(json.dumps({"type": "input.text", "text": word + " "}))
        await ws.send(json.dumps({"type": "input.done"}))

    def over_websocket() -> bytes:
        events, audio = asyncio.run(websocket_session(server, "sentence", send))
        starts = [e for e in events if e["type"] == "audio.start"]
        assert [e["text"] for e in starts] == sentences
        assert events[0]["type"] == "session.created" and events[-1]["type"] == "session.done"
        assert sorted(audio) == [0, 1]
        return audio[0] + audio[1]

    def sentence_by_sentence() -> bytes:
        return b"".join(speak(server, key="bob-key", response_format="pcm", input=text, voice="aiden")
                        for text in sentences)

    assert_renders_one_generation(over_websocket, sentence_by_sentence)


def test_websocket_token_mode_speaks_each_utterance_as_its_text_arrives(server):
    """Text cut anywhere (inside words too) in input.text messages, two utterances split by
    input.flush: each is one request, its audio that of its whole text in streaming text mode."""
    utterances = ["The first utterance arrives in small pieces.", "Then a second, after a flush."]
    rng = np.random.default_rng(3)

    async def send(ws, events):
        for i, text in enumerate(utterances):
            cuts = sorted(set(rng.integers(1, len(text), size=len(text) // 3)))
            for piece in np.split(np.array(list(text)), cuts):
                await ws.send(json.dumps({"type": "input.text", "text": "".join(piece)}))
                await asyncio.sleep(0.01)
            await ws.send(json.dumps({"type": "input.flush" if i == 0 else "input.done"}))

    def over_websocket() -> bytes:
        events, audio = asyncio.run(websocket_session(server, "token", send))
        assert events[0] == {"type": "session.created", "response_format": "pcm", "sample_rate": 24000,
                             "text_mode": "token"}
        done = [e for e in events if e["type"] == "audio.done"]
        assert [e["text"] for e in done] == utterances and sorted(audio) == [0, 1], events
        assert events[-1]["type"] == "session.done" and events[-1]["usage"]["sentences"] == 2
        return audio[0] + audio[1]

    def one_shot() -> bytes:
        return b"".join(speak(server, key="bob-key", response_format="pcm", input=text, voice="aiden",
                              extra_body={"non_streaming_mode": False}) for text in utterances)

    assert_renders_one_generation(over_websocket, one_shot)


def test_websocket_token_mode_input_clear_stops_speaking_and_the_session_goes_on(server):
    long_text = " ".join(["Words keep coming for a long while here."] * 6)

    async def send(ws, events):
        for word in long_text.split(" "):
            await ws.send(json.dumps({"type": "input.text", "text": word + " "}))
        while not any(e["type"] == "audio.start" for e in events):
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "input.clear"}))
        while not any(e["type"] == "audio.done" for e in events):
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "input.text", "text": "After the barge-in."}))
        await ws.send(json.dumps({"type": "input.done"}))

    events, audio = asyncio.run(websocket_session(server, "token", send))
    done = [e for e in events if e["type"] == "audio.done"]
    assert done[0] == {"type": "audio.done", "sentence_index": 0, "cleared": True}, events
    assert done[1]["sentence_index"] == 1 and done[1]["text"] == "After the barge-in." and len(audio[1]) > 0
    assert events[-1]["type"] == "session.done"
    deadline = time.monotonic() + 30  # the cleared request's abort reaches vLLM's gauges within a step or two
    while metric(server, "qwen3tts_requests_in_flight") or metric(server, "vllm:num_requests_running") \
            or metric(server, "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline, "the session left requests behind"
        time.sleep(0.1)


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_changes_duration_not_pitch(server, speed):
    normal = pcm16(speak(server, response_format="pcm", extra_body={"max_new_tokens": 20}))
    fast = pcm16(speak(server, response_format="pcm", speed=speed, extra_body={"max_new_tokens": 20}))
    assert abs(len(fast) - len(normal) / speed) <= 0.01 * len(normal) / speed


def test_every_request_is_logged_as_one_json_line(server, tmp_path_factory):
    speak(server, key="bob-key", input="Logged request.")
    log = next(tmp_path_factory.getbasetemp().glob("server-cv*/server.log")).read_text()
    events = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"event": "speech"' in line]
    assert any(e["tenant"] == "bob" and e["outcome"] in ("length", "stop") and e["frames"] == FRAMES for e in events)


def test_serve_starts_the_codec_workers_before_vllm_and_provisions_them_after_the_engine(server, tmp_path_factory):
    log = next(tmp_path_factory.getbasetemp().glob("server-cv*/server.log")).read_text()
    started = re.search(r"started codec workers \[(\d+), (\d+)\] on \['cpu', 'cpu'\]", log)
    assert started, log[-3000:]
    assert log.index(started.group(0)) < log.index("starting: -m vllm.entrypoints.openai.api_server")
    for pid in started.groups():  # each came up waiting, then got its pool from the server
        assert re.search(rf"codec-worker\[{pid}\].*waiting to be provisioned", log)
        assert re.search(rf"codec-worker\[{pid}\].*provisioned for 64 streams", log)
    assert "codec workers provisioned for 64 streams" in log


def test_the_engine_process_logs_the_talker_it_built(server, tmp_path_factory):
    """Our INFO lines print in vLLM's engine process too, under its prefix (vLLM gives a handler to
    its own logger only; the talker plugin routes ours through it)."""
    log = next(tmp_path_factory.getbasetemp().glob("server-cv*/server.log")).read_text()
    assert re.search(r"\((?:EngineCore|Worker)[^)]*\) INFO .*Qwen3-TTS talker: \d+ layers of \d+, code predictor "
                     r"\d+ layers of \d+, \d+ slots; Model Runner V1; frame completion eager", log), log[-3000:]


def test_min_new_tokens_equal_to_max_forces_the_length(server):
    # random weights may say EOS at any frame; a forced length is how benchmarks compare servers
    for frames in (3, 17):
        pcm = pcm16(speak(server, response_format="pcm", extra_body={"max_new_tokens": frames, "min_new_tokens": frames}))
        assert len(pcm) == frames * 1920


def test_openai_voice_names_map_to_builtin_speakers(server):
    for alias, speaker in (("coral", "vivian"), ("echo", "ryan")):
        assert_renders_one_generation(lambda: speak(server, voice=alias, response_format="pcm"),
                                      lambda: speak(server, voice=speaker, response_format="pcm"))


@pytest.mark.parametrize("body,status,param", [
    ({"input": "", "voice": "ryan"}, 400, "input"),
    ({"input": "x" * 20001, "voice": "ryan"}, 400, "input"),
    ({"input": "hi", "voice": "nobody"}, 400, "voice"),
    ({"input": "hi", "voice": "ryan", "language": "klingon"}, 400, "language"),
    ({"input": "hi", "voice": "ryan", "speed": 9}, 400, None),
    ({"input": "hi", "voice": "ryan", "response_format": "ogg"}, 400, None),
    ({"input": "hi", "voice": "ryan", "task_type": "Base"}, 400, "task_type"),
    ({"input": "hi", "voice": "ryan", "ref_audio": "aGVsbG8=", "ref_text": "x"}, 400, "ref_audio"),
    ({"input": "hi", "voice": "ryan", "model": "someone-else"}, 404, "model"),
    ({"input": "hi", "voice": "ryan", "unknown_field": 1}, 400, None),
    ({"input": "hi", "voice": "ryan", "initial_codec_chunk_frames": 26}, 400, None),
])
def test_bad_input_gets_an_openai_style_error(server, body, status, param):
    r = httpx.post(f"{server}/v1/audio/speech", json=body, headers={"Authorization": "Bearer alice-key"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param:
        assert param in (error.get("param") or "")


def test_missing_or_wrong_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server}/v1/audio/speech", json={"input": "hi", "voice": "ryan"}, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        speak(server, key="wrong")


def test_per_key_concurrency_and_rate_limits_answer_429_with_retry_after(server):
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=300, headers={"Authorization": "Bearer tight-key"}) as c:
            body = {"input": "A long streamed answer.", "voice": "ryan", "response_format": "pcm",
                    "stream_format": "audio", "max_new_tokens": 40}
            async with c.stream("POST", "/v1/audio/speech", json=body) as first:
                assert first.status_code == 200
                pieces = first.aiter_bytes()
                await pieces.__anext__()  # admitted and streaming
                second = await c.post("/v1/audio/speech", json=body)
                assert second.status_code == 429
                assert second.json()["error"]["code"] == "concurrency_limit_exceeded"
                assert int(second.headers["Retry-After"]) >= 1
                async for _ in pieces:
                    pass
            statuses = []
            for _ in range(3):  # 2 requests per minute: the first one used a token
                r = await c.post("/v1/audio/speech", json={**body, "stream_format": None, "max_new_tokens": 2})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert int(r.headers["Retry-After"]) >= 1
            assert statuses.count(200) == 1 and statuses[-1] == 429

    asyncio.run(run())


def test_global_bound_answers_503_and_serves_the_rest(server):
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=300) as c:
            async def one(i):
                key = "alice-key" if i % 2 else "bob-key"
                r = await c.post("/v1/audio/speech", headers={"Authorization": f"Bearer {key}"},
                                 json={"input": f"Request number {i}.", "voice": "ryan", "response_format": "pcm",
                                       "max_new_tokens": 30, "min_new_tokens": 30})  # sampled: EOS masked
                return r.status_code, r
            return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(run())
    codes = [code for code, _ in results]
    assert codes.count(503) >= 1 and codes.count(200) >= 12
    for code, r in results:
        if code == 503:
            assert r.json()["error"]["code"] == "overloaded" and "Retry-After" in r.headers
        else:
            assert code == 200 and len(r.content) == 30 * 1920 * 2


def test_client_disconnect_mid_stream_frees_the_request(server):
    before = metric(server, "qwen3tts_requests_total", {"tenant": "alice", "status": "499"})
    with httpx.stream("POST", f"{server}/v1/audio/speech", timeout=300, headers={"Authorization": "Bearer alice-key"},
                      json={"input": "This will be cut off.", "voice": "ryan", "response_format": "pcm",
                            "stream_format": "audio", "max_new_tokens": 40}) as r:
        next(r.iter_bytes())
    for _ in range(60):
        if (metric(server, "qwen3tts_requests_in_flight") == 0 and metric(server, "vllm:num_requests_running") == 0
                and metric(server, "qwen3tts_requests_total", {"tenant": "alice", "status": "499"}) > before):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the disconnected request still holds server or engine state")
    assert len(speak(server, response_format="pcm")) == FRAMES * 1920 * 2  # still serving


def test_a_burst_from_one_tenant_does_not_starve_another(server):
    """4 sequences run at once. alice's first 4 requests run (40 frames); 6 more of hers wait in
    vLLM's queue (priorities 4 to 9: the requests she already had in flight). bob's one request
    (priority 0), sent once all 6 wait, takes the next free slot, so at least 3 of the 6 start after
    it; first come, first served would start all 6 before it (at most 2 beside it). Who waits is
    read from vLLM's own gauges, and who went first from the order first audio arrived: no sleep."""

    async def until(name: str, value: float) -> None:
        deadline = time.monotonic() + 120
        while (seen := await asyncio.to_thread(metric, server, name)) != value:
            assert time.monotonic() < deadline, f"{name} stayed {seen}, not {value}"
            await asyncio.sleep(0.05)

    async def run():
        first_audio: list[str] = []  # request names, in the order their first audio arrived
        async with httpx.AsyncClient(base_url=server, timeout=300) as c:
            async def one(name, key, frames):
                body = {"input": f"{name} request.", "voice": "ryan", "response_format": "pcm",
                        "stream_format": "audio", "max_new_tokens": frames, "min_new_tokens": frames}
                async with c.stream("POST", "/v1/audio/speech", json=body,
                                    headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_bytes():
                        if name not in first_audio:
                            first_audio.append(name)

            await until("vllm:num_requests_running", 0)
            await until("vllm:num_requests_waiting", 0)
            burst = [asyncio.create_task(one(f"running{i}", "alice-key", 40)) for i in range(4)]
            await until("vllm:num_requests_running", 4)
            burst += [asyncio.create_task(one(f"queued{i}", "alice-key", 30)) for i in range(6)]
            await until("vllm:num_requests_waiting", 6)
            await one("bob", "bob-key", 30)
            await asyncio.gather(*burst)
        return first_audio

    first_audio = asyncio.run(run())
    after_bob = [name for name in first_audio[first_audio.index("bob") + 1:] if name.startswith("queued")]
    assert len(after_bob) >= 3, f"bob waited behind alice's queued burst: {first_audio}"


def test_concurrent_load_loses_nothing(server):
    async def run():
        sem = asyncio.Semaphore(10)
        async with httpx.AsyncClient(base_url=server, timeout=300) as c:
            async def one(i):
                async with sem:
                    key = "alice-key" if i % 2 else "bob-key"
                    r = await c.post("/v1/audio/speech", headers={"Authorization": f"Bearer {key}"},
                                     json={"input": f"Load test number {i}.", "voice": "vivian",
                                           "response_format": "wav", "max_new_tokens": 8 + i % 5, "seed": i})
                    return i, r
            return await asyncio.gather(*(one(i) for i in range(32)))

    for i, r in asyncio.run(run()):
        assert r.status_code == 200, r.text
        audio, rate = sf.read(io.BytesIO(r.content))
        assert rate == 24000 and len(audio) == (8 + i % 5) * 1920
        assert r.headers["X-Output-Tokens"] == str(8 + i % 5)


def test_health_ready_models_and_metrics(server):
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/ready").json()["status"] == "ready"
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer bob-key"}).json()["data"]
    speak(server, key="bob-key")
    text = httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer bob-key"}).text
    for name in ("qwen3tts_time_to_first_audio_seconds_bucket", "qwen3tts_real_time_factor_bucket",
                 "qwen3tts_audio_seconds_total", "qwen3tts_queue_depth", "qwen3tts_requests_in_flight"):
        assert name in text
    assert metric(server, "qwen3tts_requests_total", {"tenant": "bob", "status": "200"}) >= 1
    assert metric(server, "qwen3tts_audio_seconds_total", {"tenant": "bob"}) > 0
    # the codec worker's counters arrive by polling (every 5 s)
    deadline = time.monotonic() + 30
    while metric(server, "qwen3tts_codec_frames_total", {}) == 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert metric(server, "qwen3tts_codec_frames_total", {}) > 0
    assert metric(server, "qwen3tts_codec_decode_seconds_total", {}) > 0
    assert metric(server, "qwen3tts_codec_chunks_total", {}) >= metric(server, "qwen3tts_codec_batches_total", {}) > 0
    # both codec workers decode: concurrent streams are spread over them
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        assert all(len(audio) > 0 for audio in pool.map(lambda i: speak(server, key="bob-key", input=f"Line {i}."),
                                                          range(4)))
    deadline = time.monotonic() + 30
    while metric(server, "qwen3tts_codec_frames_total", {"worker": "1"}) == 0 and time.monotonic() < deadline:
        time.sleep(1)
    for worker in ("0", "1"):
        assert metric(server, "qwen3tts_codec_frames_total", {"worker": worker}) > 0, worker


def test_examples_produce_audio(server, tmp_path):
    out = tmp_path / "hello.wav"
    subprocess.run([sys.executable, str(EXAMPLES / "speech.py"), "--base-url", f"{server}/v1", "--api-key", "alice-key",
                    "--out", str(out)], check=True, timeout=300)
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) > 0
    subprocess.run([sys.executable, str(EXAMPLES / "speech_stream.py"), "--base-url", f"{server}/v1", "--api-key",
                    "alice-key", "--out", str(tmp_path / "s.pcm")], check=True, timeout=300)
    assert (tmp_path / "s.pcm").stat().st_size > 0
    for mode in ("token", "sentence"):
        done = subprocess.run([sys.executable, str(EXAMPLES / "websocket_client.py"), "--url",
                               f"{server.replace('http', 'ws')}/v1/audio/speech/stream", "--api-key", "alice-key",
                               "--text-mode", mode, "--out", str(tmp_path / f"ws-{mode}.pcm")],
                              check=True, timeout=300, capture_output=True, text=True)
        assert (tmp_path / f"ws-{mode}.pcm").stat().st_size > 0 and "'session.done'" in done.stdout, done.stdout


def test_load_generator_measures_this_server(server, tmp_path):
    out = tmp_path / "load.json"
    bench = Path(__file__).parent.parent / "benchmarks" / "http_load.py"
    subprocess.run([sys.executable, str(bench), "--url", server, "--api-key", "bob-key", "--voice", "ryan",
                    "--concurrency", "3", "--rounds", "1", "--ramp-s", "0.1", "--client-procs", "2",
                    "--rates", "4", "--duration", "1", "--frames", "6",
                    "--warmup-frames", "2", "--out", str(out), "--plot", str(tmp_path / "load.png")],
                   check=True, timeout=600)
    report = json.loads(out.read_text())
    closed, opened = report["levels"]
    assert (closed["kind"], closed["requests"], closed["ok"]) == ("concurrency", 3, 3)
    assert closed["ramp_s"] == 0.1  # clients started over 0.1 s, not at once
    assert closed["audio_s"] == pytest.approx(3 * 6 / 12.5)  # forced lengths arrive whole
    assert opened["kind"] == "rate" and opened["ok"] == opened["requests"] >= 1
    assert opened["audio_s"] == pytest.approx(opened["requests"] * 6 / 12.5)
    assert 0 < closed["ttfa_p50_ms"] <= closed["ttfa_p99_ms"] and closed["audio_s_per_s"] > 0
    assert (tmp_path / "load.md").read_text().count("|") > 20 and (tmp_path / "load.png").stat().st_size > 0
    # the server's own counters, read around each level, say where the time went
    inside = closed["engine"]
    assert inside["steps_per_s"] > 0 and inside["tokens_per_step"] >= 1
    assert 0 < inside["itl_ms"] and 0 < inside["engine_ttft_ms"] <= inside["server_ttfa_ms"]
    assert inside["codec_frames_per_call"] > 1 and inside["codec_busy"] > 0  # chunks of 1 frame (the first) and more
    assert 0 < inside["server_prepare_ms"] < inside["server_ttfa_ms"]  # part of the server's first-audio time
    assert 0 < closed["client_cpu"] <= os.cpu_count()
    assert 0 < closed["sent_p50_ms"] <= closed["headers_p50_ms"] <= closed["ttfa_p50_ms"]  # in that order
    # the harness opened the level's connections before it (here in its 2 client processes)
    assert closed["new_connections"] == 0
    assert closed["client_lag_p99_ms"] >= 0 and inside["loop_lag_ms"] >= 0  # both event loops watched
    assert "Inside the server" in (tmp_path / "load.md").read_text()


def test_latency_counts_from_arrival_not_from_when_the_body_was_read(server):
    """A body that trickles in (as on a busy server, where reading it waits its turn) counts
    toward the time to first audio and the preparation time."""
    before = metric(server, "qwen3tts_request_prepare_seconds_sum", {})
    count = metric(server, "qwen3tts_request_prepare_seconds_count", {})
    body = json.dumps({"input": "Late body.", "voice": "ryan", "response_format": "pcm", **GREEDY,
                       "max_new_tokens": FRAMES}).encode()

    def trickle():
        yield body[:10]
        time.sleep(1.0)
        yield body[10:]

    r = httpx.post(f"{server}/v1/audio/speech", content=trickle(), timeout=120,
                   headers={"Authorization": "Bearer alice-key", "Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.content) == FRAMES * 1920 * 2
    assert metric(server, "qwen3tts_request_prepare_seconds_count", {}) == count + 1
    assert metric(server, "qwen3tts_request_prepare_seconds_sum", {}) - before >= 1.0
