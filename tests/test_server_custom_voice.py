"""The speech server, started the way the README starts it (`vllm-qwen3tts serve`, embedded
default checkpoint), called with the real `openai` client, httpx and websockets.

The server runs the CPU vLLM engine with 4 sequences at a time and priority scheduling,
three API keys (two ordinary tenants and one tightly limited) and a global bound of 12
requests in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import typing
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


async def websocket_session(server: str, text_mode: str | None, send, voice: str | dict = "aiden", **config
                            ) -> tuple[list[dict], dict[int, bytes]]:
    """A WebSocket session (`text_mode` None: the default), `config` added to its session.config:
    `send(ws, events)` writes the client's messages (it may wait on the events so far); returns
    every event and the audio bytes by sentence (utterance) index."""
    events, audio = [], {}
    mode = {} if text_mode is None else {"text_mode": text_mode}
    async with websockets.connect(f"{server.replace('http', 'ws')}/v1/audio/speech/stream?api_key=bob-key",
                                  max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.config", **mode, "voice": voice, "response_format": "pcm",
                                  **GREEDY, "max_new_tokens": FRAMES, **config}))
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
            if event["type"] == "session.done":
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


def test_websocket_token_mode_is_the_default_and_speaks_each_utterance_as_its_text_arrives(server):
    """Text cut anywhere (inside words too) in input.text messages, two utterances split by
    input.flush: each is one request (well within its 40 frames), its audio that of its whole
    text in streaming text mode."""
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
        events, audio = asyncio.run(websocket_session(server, None, send, max_new_tokens=40))
        assert events[0] == {"type": "session.created", "response_format": "pcm", "sample_rate": 24000,
                             "text_mode": "token"}
        done = [e for e in events if e["type"] == "audio.done"]
        assert [(e["text"], e["requests"]) for e in done] == [(text, 1) for text in utterances], events
        assert sorted(audio) == [0, 1], events
        assert events[-1]["type"] == "session.done" and events[-1]["usage"]["sentences"] == 2
        return audio[0] + audio[1]

    def one_shot() -> bytes:
        return b"".join(speak(server, key="bob-key", response_format="pcm", input=text, voice="aiden",
                              extra_body={"non_streaming_mode": False, "max_new_tokens": 40}) for text in utterances)

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

    events, audio = asyncio.run(websocket_session(server, None, send))
    done = [e for e in events if e["type"] == "audio.done"]
    assert done[0] == {"type": "audio.done", "sentence_index": 0, "cleared": True}, events
    assert done[1]["sentence_index"] == 1 and done[1]["text"] == "After the barge-in." and len(audio[1]) > 0
    assert events[-1]["type"] == "session.done"
    deadline = time.monotonic() + 30  # the cleared request's abort reaches vLLM's gauges within a step or two
    while metric(server, "qwen3tts_requests_in_flight") or metric(server, "vllm:num_requests_running") \
            or metric(server, "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline, "the session left requests behind"
        time.sleep(0.1)


def llm_words(text: str) -> list[str]:
    """`text` as an LLM's tokenizer hands it out, roughly: words with the space before them."""
    words = text.split(" ")
    return words[:1] + [" " + w for w in words[1:]]


def ws_url(server: str) -> str:
    return f"{server.replace('http', 'ws')}/v1/audio/speech/stream?api_key=bob-key"


def test_websocket_min_text_tokens_holds_speech_for_a_lead_and_keeps_the_codes(server):
    """With min_text_tokens, an utterance's request starts only once that many of its text tokens
    are final, or its text is complete: no audio while fewer have come (for seconds), where the
    same words without a lead are heard at once. The audio is the whole text's, whatever the lead."""
    text = "Hold on for the lead here."
    words = llm_words(text)  # after three words, two tokens are final ("Hold", " on")

    async def session(lead: int | None) -> bytes:
        config = {} if lead is None else {"min_text_tokens": lead}
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.config", "voice": "aiden", "response_format": "pcm", **GREEDY,
                                      "max_new_tokens": 40, **config}))
            assert json.loads(await ws.recv())["type"] == "session.created"
            for word in words[:3]:
                await ws.send(json.dumps({"type": "input.text", "text": word}))
            early = b""
            try:
                async with asyncio.timeout(2.0 if lead else 120):  # without a lead: until the first audio
                    while not early:
                        if isinstance(message := await ws.recv(), bytes):
                            early += message
            except TimeoutError:
                pass
            assert bool(early) == (not lead), (lead, len(early))
            for word in words[3:]:
                await ws.send(json.dumps({"type": "input.text", "text": word}))
            await ws.send(json.dumps({"type": "input.done"}))
            audio, events = early, []
            async for message in ws:
                if isinstance(message, bytes):
                    audio += message
                elif (event := json.loads(message))["type"] == "session.done":
                    break
                else:
                    events.append(event)
        assert [e["type"] for e in events] in (["audio.start", "audio.done"], ["audio.done"]), events
        return audio

    assert_renders_one_generation(
        lambda: speak(server, key="bob-key", response_format="pcm", input=text, voice="aiden",
                      extra_body={"non_streaming_mode": False, "max_new_tokens": 40}),
        lambda: asyncio.run(session(None)), lambda: asyncio.run(session(5)), lambda: asyncio.run(session(64)))


def test_websocket_a_long_utterance_continues_in_a_new_request_at_a_sentence_end(server):
    """An utterance whose text nears what one request can speak (20 frames here, its
    max_new_tokens: from 4 text tokens on, it ends at the next sentence end) goes on at a sentence
    end as a new request in the same voice: one audio.start and one audio.done (saying two
    requests), no error, and the audio is both requests', whole, back to back on the same stream."""
    sentences = ["The first one is here.", "Then a second follows."]
    forced = {"max_new_tokens": 20, "min_new_tokens": 20}

    async def send(ws, events):
        for word in llm_words(" ".join(sentences)):
            await ws.send(json.dumps({"type": "input.text", "text": word}))
        await ws.send(json.dumps({"type": "input.done"}))

    def over_websocket() -> bytes:
        events, audio = asyncio.run(websocket_session(server, None, send, **forced))
        assert [e["type"] for e in events] == ["session.created", "audio.start", "audio.done", "session.done"], events
        assert events[2]["requests"] == 2 and events[2]["text"] == " ".join(sentences), events
        assert events[3]["usage"]["output_tokens"] == 2 * 20 and len(audio[0]) == 2 * 20 * 1920 * 2
        return audio[0]

    def request_by_request() -> bytes:
        return b"".join(speak(server, key="bob-key", response_format="pcm", input=text, voice="aiden",
                              extra_body={"non_streaming_mode": False, **forced}) for text in sentences)

    assert_renders_one_generation(over_websocket, request_by_request)


def test_websocket_malformed_messages_and_input_after_done_get_errors_and_the_session_goes_on(server):
    bad = [b"binary", "not json", "[1, 2]", json.dumps({"text": "no type"}), json.dumps({"type": "input.texts"}),
           json.dumps({"type": "input.text"}), json.dumps({"type": "input.text", "text": 5}),
           json.dumps({"type": "session.config"})]

    async def send(ws, events):
        for message in bad:
            await ws.send(message)
        await ws.send(json.dumps({"type": "input.text", "text": "Still spoken after them."}))
        await ws.send(json.dumps({"type": "input.done"}))
        await ws.send(json.dumps({"type": "input.text", "text": "Too late."}))  # while the utterance is spoken

    events, audio = asyncio.run(websocket_session(server, None, send, max_new_tokens=40, min_new_tokens=40))
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [(e["param"], e["code"]) for e in errors] == [
        ("type", "invalid_message"), ("type", "invalid_message"), ("type", "invalid_message"),
        ("type", "missing_parameter"), ("type", "unknown_message_type"), ("text", "missing_parameter"),
        ("text", "invalid_value"), ("type", "unknown_message_type"), ("type", "input_after_done")], errors
    assert "input.flush" in errors[4]["message"], errors[4]  # what a token-mode session takes
    done = [e for e in events if e["type"] == "audio.done"]
    assert [e["text"] for e in done] == ["Still spoken after them."] and len(audio[0]) == 40 * 1920 * 2, events
    assert events[-1]["type"] == "session.done" and events[-1]["usage"]["sentences"] == 1


def test_websocket_text_beyond_what_may_wait_is_refused_and_the_session_goes_on(server):
    """At most max_input_chars (20000 on this server) may wait to be spoken: text beyond is refused
    with an error naming the limit; what was accepted is still being spoken (until input.clear
    here), and text sent afterwards is spoken."""
    chunk = "word " * 1800  # 9000 characters, hundreds of requests' worth: most of it waits

    async def send(ws, events):
        await ws.send(json.dumps({"type": "input.text", "text": chunk}))
        await ws.send(json.dumps({"type": "input.text", "text": chunk}))  # 18000 waiting at most: accepted
        await ws.send(json.dumps({"type": "input.text", "text": "word " * 2400}))  # 21000 at least: refused
        while not any(e["type"] == "error" for e in events) or not any(e["type"] == "audio.start" for e in events):
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "input.clear"}))
        while not any(e["type"] == "audio.done" for e in events):
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "input.text", "text": "After the refusal."}))
        await ws.send(json.dumps({"type": "input.done"}))

    events, audio = asyncio.run(websocket_session(server, None, send))
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "text_queue_full" and errors[0]["param"] == "text", errors
    assert "20000" in errors[0]["message"] and "max_input_chars" in errors[0]["message"]
    done = [e for e in events if e["type"] == "audio.done"]
    assert done[0] == {"type": "audio.done", "sentence_index": 0, "cleared": True}, events
    assert done[1]["text"] == "After the refusal." and len(audio[1]) > 0 and events[-1]["type"] == "session.done"


@pytest.mark.parametrize("ending", ["the client closes the socket", "the session idles",
                                    "the session sends only empty text and junk"])
def test_a_websocket_session_left_mid_utterance_frees_its_request_at_once(server, ending):
    """An utterance's request holds while it waits for more text. When the client closes the
    socket, or sends nothing for the session's idle timeout (1 s here) while nothing is being
    spoken, the request is freed: vLLM's running and waiting requests and the server's requests
    in flight return to 0 (the idle session first gets an idle_timeout error, then is closed).
    Empty text and malformed messages, every 0.3 s, are not activity: they cannot hold it."""
    idle = ending != "the client closes the socket"
    junk = ending == "the session sends only empty text and junk"

    async def session() -> tuple[list[dict], int | None]:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.config", "voice": "aiden", "response_format": "pcm", **GREEDY,
                                      "max_new_tokens": 40, **({"idle_timeout_s": 1} if idle else {})}))
            assert json.loads(await ws.recv())["type"] == "session.created"
            for word in llm_words("Some words arrive, and then"):
                await ws.send(json.dumps({"type": "input.text", "text": word}))
            while not isinstance(await ws.recv(), bytes):  # spoken as far as its text goes, then it holds
                pass
            assert metric(server, "qwen3tts_requests_in_flight") >= 1
            if not idle:
                return [], None

            async def keep_poking():
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        await ws.send(json.dumps({"type": "input.text", "text": ""}))
                        await ws.send("not json")
                        await asyncio.sleep(0.3)

            poking = asyncio.create_task(keep_poking()) if junk else None
            events = []
            async with asyncio.timeout(120):  # the server closes the session (else: a failure, not a hang)
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for message in ws:
                        if isinstance(message, str):
                            events.append(json.loads(message))
            if poking is not None:
                poking.cancel()
            return [e for e in events if e.get("error", {}).get("code") != "invalid_message"], ws.close_code

    events, code = asyncio.run(session())
    if idle:
        assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["idle_timeout"] and code == 1008, events
    deadline = time.monotonic() + 30  # the abort reaches vLLM's gauges within a step or two
    while metric(server, "qwen3tts_requests_in_flight") or metric(server, "vllm:num_requests_running") \
            or metric(server, "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline, "the session left its request behind"
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
    for alias, speaker in (("coral", "vivian"), ("echo", "ryan"), ("marin", "vivian"), ("cedar", "ryan")):
        assert_renders_one_generation(lambda: speak(server, voice=alias, response_format="pcm"),
                                      lambda: speak(server, voice=speaker, response_format="pcm"))


def test_every_voice_name_the_openai_sdk_lists_is_served(server):
    from openai.types.audio.speech_create_params import Voice

    sdk_names = {name for arg in typing.get_args(Voice) if typing.get_origin(arg) is typing.Literal
                 for name in typing.get_args(arg)}
    assert {"alloy", "marin", "cedar"} <= sdk_names  # the SDK still lists its names as a Literal
    served = httpx.get(f"{server}/v1/audio/voices", headers={"Authorization": "Bearer alice-key"}, timeout=30)
    assert sdk_names <= set(served.json()["voices"]), sdk_names - set(served.json()["voices"])
    for name in sorted(sdk_names):
        assert len(pcm16(speak(server, voice=name, response_format="pcm",
                               extra_body={"max_new_tokens": 2, "min_new_tokens": 2}))) == 2 * 1920, name


def test_a_voice_object_names_a_voice_as_its_name_does_on_every_route(server):
    """`{"id": name}`, the SDK's form for custom voices: whole file, stream and WebSocket speak
    with the voice named; an unknown one is refused as an unknown name is."""
    def streamed(voice) -> bytes:
        with client(server).audio.speech.with_streaming_response.create(
                model="tts-1", voice=voice, input="Hello there.", response_format="pcm", stream_format="audio",
                extra_body={**GREEDY, "max_new_tokens": FRAMES}) as response:
            return response.read()

    async def over_websocket(voice) -> bytes:
        async def send(ws, events):
            await ws.send(json.dumps({"type": "input.text", "text": "Hello there."}))
            await ws.send(json.dumps({"type": "input.done"}))

        events, audio = await websocket_session(server, "sentence", send, voice=voice)
        assert events[-1]["type"] == "session.done", events
        return audio[0]

    assert_renders_one_generation(lambda: speak(server, voice="ryan", response_format="pcm"),
                                  lambda: speak(server, voice={"id": "ryan"}, response_format="pcm"),
                                  lambda: streamed({"id": "RYAN"}),
                                  lambda: asyncio.run(over_websocket({"id": "ryan"})))
    refusals = []
    for voice in ("nobody", {"id": "nobody"}):
        with pytest.raises(openai.BadRequestError) as refused:
            speak(server, voice=voice)
        refusals.append((refused.value.status_code, refused.value.code, refused.value.param))
    assert refusals[0] == refusals[1] == (400, "voice_not_found", "voice")


@pytest.mark.parametrize("voice,says", [
    ({}, '"id" is missing'),
    ({"name": "ryan"}, '"id" is missing'),
    ({"id": 7}, "voice.id must be a voice name"),
    ({"id": "ryan", "style": "calm"}, "unknown field 'style'"),
])
def test_a_malformed_voice_object_is_a_400_saying_what_is_wrong(server, voice, says):
    r = httpx.post(f"{server}/v1/audio/speech", json={"input": "hi", "voice": voice},
                   headers={"Authorization": "Bearer alice-key"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice" and says in r.json()["error"]["message"], \
        r.text


def test_x_request_id_is_echoed_on_every_speech_response(speech_server):
    server = speech_server.base
    sdk = client(server)
    whole = sdk.audio.speech.with_raw_response.create(
        model="tts-1", voice="ryan", input="Hello there.", response_format="pcm",
        extra_headers={"X-Request-Id": "client-whole-1"}, extra_body={**GREEDY, "max_new_tokens": 2})
    assert whole.status_code == 200 and whole.request_id == "client-whole-1"
    for stream_format in ("audio", "sse"):
        with sdk.audio.speech.with_streaming_response.create(
                model="tts-1", voice="ryan", input="Hello there.", response_format="pcm", stream_format=stream_format,
                extra_headers={"X-Request-Id": f"client-{stream_format}"},
                extra_body={**GREEDY, "max_new_tokens": 2}) as streamed:
            assert streamed.headers["X-Request-Id"] == f"client-{stream_format}" and streamed.read()
    with pytest.raises(openai.BadRequestError) as refused:  # refused by the route
        sdk.audio.speech.create(model="tts-1", voice="nobody", input="hi", extra_headers={"X-Request-Id": "bad-voice"})
    assert refused.value.request_id == "bad-voice"
    with pytest.raises(openai.BadRequestError) as refused:  # refused by the body's validation
        sdk.audio.speech.create(model="tts-1", voice="ryan", input="", extra_headers={"X-Request-Id": "empty-input"})
    assert refused.value.request_id == "empty-input"
    with pytest.raises(openai.AuthenticationError) as refused:  # refused before the body is read
        client(server, key="wrong").audio.speech.create(model="tts-1", voice="ryan", input="hi",
                                                         extra_headers={"X-Request-Id": "no-key"})
    assert refused.value.request_id == "no-key"
    voices = httpx.get(f"{server}/v1/audio/voices", headers={"Authorization": "Bearer alice-key",
                                                             "X-Request-Id": "list-1"}, timeout=30)
    assert voices.headers["X-Request-Id"] == "list-1"

    async def handshake() -> str:
        async with websockets.connect(f"{server.replace('http', 'ws')}/v1/audio/speech/stream?api_key=bob-key",
                                      additional_headers={"X-Request-Id": "client-ws-1"}) as ws:
            return ws.response.headers["X-Request-Id"]

    assert asyncio.run(handshake()) == "client-ws-1"
    log = speech_server.log.read_text(errors="replace")
    events = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"event": "speech"' in line]
    assert {"client-whole-1", "client-audio", "client-sse"} <= {e["request_id"] for e in events}


@pytest.mark.parametrize("sent", [None, "x" * 129, "has space", "caf\xe9".encode("latin-1"), ""])
def test_without_a_safe_x_request_id_the_server_gives_one_its_log_names(speech_server, sent):
    headers = {"Authorization": "Bearer alice-key", **({} if sent is None else {"X-Request-Id": sent})}
    body = {"input": "Hello there.", "voice": "ryan", "response_format": "pcm", "max_new_tokens": 2}
    ids = []
    for _ in range(2):
        r = httpx.post(f"{speech_server.base}/v1/audio/speech", json=body, headers=headers, timeout=120)
        assert r.status_code == 200 and re.fullmatch(r"speech-[0-9a-f]{12}", r.headers["X-Request-Id"]), r.headers
        ids.append(r.headers["X-Request-Id"])
    assert ids[0] != ids[1]
    log = speech_server.log.read_text(errors="replace")
    assert f'"request_id": "{ids[0]}"' in log and f'"request_id": "{ids[1]}"' in log


def test_a_websocket_session_gets_an_x_request_id_its_log_lines_name(speech_server):
    """The handshake answers with the session's id (the client's, else one of the server's), a
    refused session.config's too; each sentence's log line names it and its engine request."""
    url = f"{speech_server.base.replace('http', 'ws')}/v1/audio/speech/stream?api_key=bob-key"

    async def session(headers: dict, config: dict) -> tuple[str, list[dict]]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "session.config", **config}))
            if "error" in (first := json.loads(await ws.recv())):
                return ws.response.headers["X-Request-Id"], [first]
            await ws.send(json.dumps({"type": "input.text", "text": "The first one. The second one."}))
            await ws.send(json.dumps({"type": "input.done"}))
            return ws.response.headers["X-Request-Id"], [first] + [json.loads(m) async for m in ws
                                                                   if isinstance(m, str)]

    config = {"text_mode": "sentence", "voice": {"id": "aiden"}, "response_format": "pcm", **GREEDY,
              "max_new_tokens": 2}
    shown, events = asyncio.run(session({}, config))
    assert re.fullmatch(r"ws-[0-9a-f]{12}", shown) and events[-1]["type"] == "session.done", events
    own, events = asyncio.run(session({"X-Request-Id": "client-session-9"}, config))
    assert own == "client-session-9" and events[-1]["type"] == "session.done", events
    refused, events = asyncio.run(session({"X-Request-Id": "client-refused"}, {**config, "voice": {"id": 7}}))
    assert refused == "client-refused" and events[0]["error"]["param"] == "voice", events
    log = speech_server.log.read_text(errors="replace")
    lines = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"event": "speech"' in line]
    for request_id in (shown, own):
        engine = sorted(e.get("engine_request_id") for e in lines if e["request_id"] == request_id)
        assert len(engine) == 2 and all(e and e.startswith("ws-") and e != request_id for e in engine), engine


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


def test_per_key_concurrency_and_rate_limits_answer_429_naming_the_limit_with_retry_after(server):
    """The tight key may have 1 request in flight and make 2 a minute; the SDK's RateLimitError
    carries which limit was reached and its value."""
    sdk = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="tight-key", max_retries=0, timeout=300)

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=300, headers={"Authorization": "Bearer tight-key"}) as c:
            body = {"input": "A long streamed answer.", "voice": "ryan", "response_format": "pcm",
                    "stream_format": "audio", "max_new_tokens": 40}
            async with c.stream("POST", "/v1/audio/speech", json=body) as first:
                assert first.status_code == 200
                pieces = first.aiter_bytes()
                await pieces.__anext__()  # admitted and streaming
                with pytest.raises(openai.RateLimitError) as second:
                    await sdk.audio.speech.create(model="tts-1", voice="ryan", input="A second one.",
                                                  extra_headers={"X-Request-Id": "second-of-tight"})
                error = second.value
                assert error.code == error.body["code"] == "concurrency_limit_exceeded"
                assert "1 request in flight" in error.message and "max_concurrency" in error.message, error.message
                assert int(error.response.headers["Retry-After"]) >= 1 and error.request_id == "second-of-tight"
                async for _ in pieces:
                    pass
            outcomes = []
            for _ in range(3):  # 2 requests per minute: the first one used a token
                try:
                    await sdk.audio.speech.create(model="tts-1", voice="ryan", input="Short.", response_format="pcm",
                                                  extra_body={"max_new_tokens": 2})
                    outcomes.append(200)
                except openai.RateLimitError as e:
                    outcomes.append(429)
                    assert e.code == e.body["code"] == "rate_limit_exceeded"
                    assert "2 requests per minute" in e.message and "requests_per_minute" in e.message, e.message
                    assert int(e.response.headers["Retry-After"]) >= 1
            assert outcomes.count(200) == 1 and outcomes[-1] == 429

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


def example(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run examples/NAME with `args`; it must succeed."""
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
    return done


def test_examples_produce_audio(server, tmp_path):
    out = tmp_path / "hello.wav"
    subprocess.run([sys.executable, str(EXAMPLES / "speech.py"), "--base-url", f"{server}/v1", "--api-key", "alice-key",
                    "--out", str(out)], check=True, timeout=300)
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) > 0
    subprocess.run([sys.executable, str(EXAMPLES / "speech_stream.py"), "--base-url", f"{server}/v1", "--api-key",
                    "alice-key", "--out", str(tmp_path / "s.pcm")], check=True, timeout=300)
    assert (tmp_path / "s.pcm").stat().st_size > 0
    sse = example("speech_sse.py", "--base-url", f"{server}/v1", "--api-key", "alice-key", "--out", str(tmp_path / "e.pcm"))
    assert "done: " in sse.stdout and len(pcm16((tmp_path / "e.pcm").read_bytes())) > 0
    info = example("server_info.py", "--base-url", f"{server}/v1", "--api-key", "alice-key").stdout
    assert "health: 200" in info and "model: " in info and "qwen3tts_requests_total{" in info, info
    assert "vivian" in json.loads(example("voices.py", "--base-url", f"{server}/v1", "--api-key", "alice-key",
                                          "list").stdout)["voices"]
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
