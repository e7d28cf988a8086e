"""Faults survived: codec workers and the engine core killed (SIGKILL) while the server works.

The codec tests use the shared `speech_server` (two CPU codec workers, children of the API
server) and leave it serving: in-flight requests fail with a clear error, `/health` and `/ready`
say so at once, the worker comes back by itself and every kind of request succeeds again. The
engine test ends that server, so it runs after every other test of the session.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
import websockets

pytestmark = pytest.mark.engine

KEY = "alice-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRAMES = 40  # per sentence: the shared server's --max-frames
SENTENCE_BYTES = FRAMES * 1920 * 2  # 16-bit PCM
# Long enough to be still speaking when a worker is killed after its first audio.
LONG_INPUT = " ".join(f"This is sentence number {i} of a long answer." for i in range(1, 9))
BODY = {"model": "tts-1", "voice": "vivian", "language": "English", "response_format": "pcm",
        "max_new_tokens": FRAMES, "min_new_tokens": FRAMES}
RECOVERY_S = 300  # a CPU codec worker loads in seconds; the machine may be busy


@dataclass
class Outcome:
    """How one request ended: whole audio, an error response or event, or a broken connection."""

    kind: str
    status: int | None = None  # HTTP status (WebSocket: None)
    audio: bytes = b""
    error: dict | None = None  # the {"error": ...} body, or the error event / message
    retry_after: str | None = None
    transport_error: str | None = None
    done: bool = False  # the stream said it finished (SSE done event, WebSocket session.done)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # first audio arrived


def codec_workers(server) -> list[psutil.Process]:
    """The API server's live codec worker processes."""
    workers = []
    for child in psutil.Process(server.pid).children():
        try:
            if "vllm_qwen3tts.codec.worker" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.Error:
            pass
    return workers


def status_of(base: str) -> tuple[int, int]:
    return (httpx.get(f"{base}/health", timeout=10).status_code, httpx.get(f"{base}/ready", timeout=10).status_code)


def wait_until_serving(server, old_pids: set[int] = frozenset()) -> list[psutil.Process]:
    """Poll until both codec workers run (none of them `old_pids`) and /health and /ready say 200."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        workers = codec_workers(server)
        if len(workers) == 2 and not old_pids & {w.pid for w in workers} and status_of(server.base) == (200, 200):
            return workers
        assert time.monotonic() < deadline, f"not serving again within {RECOVERY_S} s: {status_of(server.base)}"
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- clients


async def sse(out: Outcome, http: httpx.AsyncClient, base: str, text: str) -> Outcome:
    try:
        async with http.stream("POST", f"{base}/v1/audio/speech", headers=AUTH,
                               json={**BODY, "input": text, "stream_format": "sse"}) as r:
            out.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                out.error, out.retry_after = r.json(), r.headers.get("retry-after")
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event["type"] == "speech.audio.delta":
                    out.audio += base64.b64decode(event["audio"])
                    out.started.set()
                elif event["type"] == "speech.audio.done":
                    out.done = True
                elif event["type"] == "speech.audio.error":
                    out.error = event
    except httpx.HTTPError as e:
        out.transport_error = repr(e)
    return out


async def raw_audio(out: Outcome, http: httpx.AsyncClient, base: str, text: str) -> Outcome:
    try:
        async with http.stream("POST", f"{base}/v1/audio/speech", headers=AUTH,
                               json={**BODY, "input": text, "stream_format": "audio"}) as r:
            out.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                out.error, out.retry_after = r.json(), r.headers.get("retry-after")
                return out
            async for piece in r.aiter_bytes():
                out.audio += piece
                out.started.set()
            out.done = True  # the body ended as a complete HTTP message
    except httpx.HTTPError as e:
        out.transport_error = repr(e)
    return out


async def whole_file(out: Outcome, http: httpx.AsyncClient, base: str, text: str) -> Outcome:
    try:
        r = await http.post(f"{base}/v1/audio/speech", headers=AUTH, json={**BODY, "input": text})
    except httpx.HTTPError as e:
        out.transport_error = repr(e)
        return out
    out.status = r.status_code
    if r.status_code == 200:
        out.audio, out.done = r.content, True
    else:
        out.error, out.retry_after = r.json(), r.headers.get("retry-after")
    return out


async def websocket(out: Outcome, base: str, text: str) -> Outcome:
    try:
        async with websockets.connect(f"{base.replace('http', 'ws')}/v1/audio/speech/stream?api_key={KEY}",
                                      open_timeout=60, close_timeout=10) as ws:
            await ws.send(json.dumps({"type": "session.config", "text_mode": "sentence",  # a request per sentence
                                      **{k: v for k, v in BODY.items() if k != "model"}}))
            await ws.send(json.dumps({"type": "input.text", "text": text}))
            await ws.send(json.dumps({"type": "input.done"}))
            async for message in ws:
                if isinstance(message, bytes):
                    out.audio += message
                    out.started.set()
                    continue
                event = json.loads(message)
                if event["type"] == "error":
                    out.error = event
                elif event["type"] == "session.done":
                    out.done = True
    except (websockets.WebSocketException, OSError) as e:
        out.transport_error = repr(e)
    return out


async def every_kind(base: str, text: str, kill=None) -> list[Outcome]:
    """One request of each kind at once; with `kill`, call it once the three streams have audio
    (the whole-file request is in flight with them)."""
    outcomes = [Outcome(kind) for kind in ("sse", "audio", "file", "websocket")]
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30)) as http:
        tasks = [asyncio.ensure_future(call) for call in (
            sse(outcomes[0], http, base, text), raw_audio(outcomes[1], http, base, text),
            whole_file(outcomes[2], http, base, text), websocket(outcomes[3], base, text))]
        if kill is not None:
            streams = asyncio.gather(*(o.started.wait() for o in outcomes if o.kind != "file"))
            done, _ = await asyncio.wait([streams, *tasks], timeout=RECOVERY_S, return_when=asyncio.FIRST_COMPLETED)
            assert streams in done, f"a request ended before every stream had audio: {outcomes}"
            kill()
        return list(await asyncio.gather(*tasks))


def ok(outcome: Outcome) -> bool:
    return outcome.done and outcome.error is None and outcome.transport_error is None


def assert_whole(outcome: Outcome, sentences: int) -> None:
    assert ok(outcome), outcome
    assert len(outcome.audio) == sentences * SENTENCE_BYTES, (outcome.kind, len(outcome.audio))


def assert_failed_clearly(outcome: Outcome) -> None:
    """A request that was in flight when the codec went away: an error in the channel its kind has."""
    assert not ok(outcome), outcome.kind
    if outcome.kind == "file":  # no headers were sent yet: an error response
        assert outcome.status == 503 and outcome.error["error"]["code"] == "codec_unavailable", outcome
        assert outcome.retry_after is not None
    elif outcome.kind == "sse":  # an error event ends the stream
        assert outcome.status == 200 and outcome.transport_error is None, outcome
        assert outcome.error["type"] == "speech.audio.error"
        assert outcome.error["error"]["code"] == "codec_unavailable", outcome.error
    elif outcome.kind == "websocket":  # an error message for the sentence, then the session goes on
        assert outcome.transport_error is None and outcome.done, outcome
        assert outcome.error["type"] == "error" and outcome.error["error"]["code"] == "codec_unavailable", outcome
    else:  # raw audio has no channel for errors: the response ends unfinished, never as if whole
        assert outcome.status == 200 and outcome.transport_error is not None, outcome
        assert len(outcome.audio) < 8 * SENTENCE_BYTES


def kill(*processes: psutil.Process) -> None:
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)


def watch_until_recovered(server) -> list[tuple[tuple[int, int], set[int]]]:
    """((health, ready), the live codec workers' pids) polled from now until both have said 503
    and then both say 200 again; fails after RECOVERY_S."""
    seen, deadline = [], time.monotonic() + RECOVERY_S
    while True:
        status = status_of(server.base)
        seen.append((status, {w.pid for w in codec_workers(server)}))
        if status == (200, 200) and any(s == (503, 503) for s, _ in seen):
            return seen
        assert time.monotonic() < deadline, f"no 503 then 200 within {RECOVERY_S} s: {[s for s, _ in seen][-20:]}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- tests


def test_a_killed_codec_worker_fails_its_requests_clearly_and_is_replaced_while_the_other_serves(speech_server):
    before = wait_until_serving(speech_server)
    victim = before[0]
    log_start = speech_server.log.stat().st_size
    watching = []

    with ThreadPoolExecutor(1) as threads:  # a thread: the streams must be read meanwhile
        def kill_one() -> None:
            kill(victim)
            watching.append(threads.submit(watch_until_recovered, speech_server))

        outcomes = asyncio.run(every_kind(speech_server.base, LONG_INPUT, kill=kill_one))
        seen = watching[0].result()

    # /health and /ready reported the dead worker (the watch ends only after a 503), and said 200
    # again only once its replacement ran
    pids_when_back = seen[-1][1]
    assert len(pids_when_back) == 2 and victim.pid not in pids_when_back, (victim.pid, seen)
    # the requests with a stream on the killed worker failed clearly; those on the other finished
    assert not all(ok(o) for o in outcomes), "no request had a stream on the killed worker"
    for outcome in outcomes:
        if ok(outcome):
            assert_whole(outcome, 8)
        else:
            assert_failed_clearly(outcome)

    after = wait_until_serving(speech_server, old_pids={victim.pid})
    assert victim.pid not in {w.pid for w in after} and before[1].pid in {w.pid for w in after}
    log = speech_server.log.read_bytes()[log_start:].decode(errors="replace")
    assert re.search(r"codec worker \d \(pid %d, cpu\) was killed by SIGKILL" % victim.pid, log), log[-3000:]
    assert re.search(r"codec worker \d \(cpu\) restarted as pid \d+", log), log[-3000:]

    for outcome in asyncio.run(every_kind(speech_server.base, "Back again. All is well.")):
        assert_whole(outcome, 2)


def test_with_every_codec_worker_killed_requests_fail_clearly_and_new_ones_get_503_until_they_are_back(
        speech_server):
    workers = wait_until_serving(speech_server)

    outcomes = asyncio.run(every_kind(speech_server.base, LONG_INPUT, kill=lambda: kill(*workers)))
    for outcome in outcomes:
        assert_failed_clearly(outcome)

    # new requests while no worker is back (loading one takes seconds): 503 + Retry-After before
    # any audio, of every kind
    assert status_of(speech_server.base) == (503, 503)
    refused = asyncio.run(every_kind(speech_server.base, "Anyone there?"))
    assert status_of(speech_server.base) == (503, 503)
    for outcome in refused:
        if outcome.kind == "websocket":
            assert outcome.error["type"] == "error" and outcome.error["error"]["code"] == "codec_unavailable"
            assert outcome.audio == b""
        else:
            assert outcome.status == 503 and outcome.audio == b"", outcome
            assert outcome.error["error"]["code"] == "codec_unavailable" and outcome.retry_after, outcome

    wait_until_serving(speech_server, old_pids={w.pid for w in workers})
    for outcome in asyncio.run(every_kind(speech_server.base, "Back again. All is well.")):
        assert_whole(outcome, 2)


@pytest.mark.ends_speech_server
def test_when_the_engine_core_dies_health_says_so_and_the_server_exits_non_zero(speech_server):
    """The shared server, which this test ends: it runs after every other test of the session
    (`ends_speech_server`), once the server serves again with both codec workers. vLLM cannot
    restart its engine core; the server must not live on as a zombie that says healthy."""
    server = speech_server
    api = psutil.Process(server.pid)
    (engine,) = [p for p in api.children(recursive=True) if "EngineCore" in p.name()]
    workers = wait_until_serving(server)
    assert status_of(server.base) == (200, 200)
    os.kill(engine.pid, signal.SIGKILL)
    seen, deadline = [], time.monotonic() + 120
    while True:
        try:
            seen.append(status_of(server.base))
        except httpx.HTTPError:  # it stopped listening
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    status = api.wait(timeout=120)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert status == 1
    assert (503, 503) in seen, seen  # said before it went away
    assert (200, 200) not in seen[seen.index((503, 503)):], seen  # and never healthy again
    assert not alive  # its codec workers went with it
    log = server.log.read_text(errors="replace")
    assert "the vLLM engine core has died; the server exits with status 1" in log
