"""Voice cloning through the server (a Base checkpoint): saved voices per API key,
inline references, and every way a reference can be bad. The same server (plain `vllm serve`)
also shows vLLM's own API key at work, a codec worker whose stream slots are all taken, and,
last, a shutdown that drains what is in flight (it ends the server)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import soundfile as sf
import websockets.sync.client

from server_harness import assert_renders_one_generation, metric, running_server, starts_in_background

pytestmark = pytest.mark.engine

KEYS = [{"key": "alice-key", "name": "alice"}, {"key": "bob-key", "name": "bob"}]
GREEDY = {"temperature": 0, "max_new_tokens": 8}
EXAMPLES = Path(__file__).parent.parent / "examples"
CODEC_STREAMS = 3  # this server's codec stream slots (`--codec-streams`; it has one codec worker)
GRACE_S = 120  # this server's shutdown grace period (`--shutdown-grace`): far more than its drain needs


def reference_wav(seconds: float = 1.5, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * 24000)) / 24000
    wav = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), 24000, format="WAV")
    return buf.getvalue()


@starts_in_background(__name__, "served")
def start_served(tmp_path_factory, tiny_checkpoint):
    """Plain `vllm serve CHECKPOINT` (no `vllm-qwen3tts serve`, no VLLM_PLUGINS): the server starts its own codec
    worker once the engine is up and takes its speech settings from vLLM's `--additional-config`. vLLM's own API
    key (VLLM_API_KEY, as vLLM's `--api-key`) is set beside the tenants' keys file."""
    tmp = tmp_path_factory.mktemp("server-base")
    (tmp / "keys.json").write_text(json.dumps(KEYS))
    speech = {"api_keys_file": str(tmp / "keys.json"), "voices_dir": str(tmp / "voices"), "max_frames": 40,
              "allow_url_ref_audio": True, "max_ref_audio_bytes": 400_000, "codec_streams": CODEC_STREAMS,
              "shutdown_grace": GRACE_S}
    return running_server(tmp, [str(tiny_checkpoint("0.6b-base")), "--max-num-seqs", "4", "--max-model-len", "1024",
                                "--enforce-eager",  # no compile: these tests are about voices and keys
                                "--additional-config", json.dumps({"qwen3tts": speech})],
                          env={"VLLM_API_KEY": "vllm-key"}, vllm_serve=True, as_server=True)


@pytest.fixture(scope="module")
def served(request, background):
    """`start_served`'s server, started as the session began (conftest's `background`)."""
    with background.server(request, "served") as served:
        yield served  # the last test ends it: the harness's teardown finds it gone


@pytest.fixture(scope="module")
def server(served):
    return served.base


def test_plain_vllm_serve_starts_its_codec_worker_itself(served):
    log = served.log.read_text()
    assert "speech endpoints ready to warm up" in log
    assert "started codec worker" not in log and "waiting to be provisioned" not in log
    assert "codec workers provisioned" not in log
    assert f", {CODEC_STREAMS} stream slots" in log  # QWEN3TTS_CODEC_STREAMS, allocated at start


def test_the_log_states_the_settings_in_force_once_with_the_keys_masked(served):
    lines = [line for line in served.log.read_text(errors="replace").splitlines() if "speech server settings: " in line]
    assert len(lines) == 1 and "(APIServer pid=" in lines[0], lines  # once, by the API server process
    line = lines[0]
    assert "api_keys=<1 masked>" in line and "vllm-key" not in line  # vLLM's key is a speech key, never logged
    for expected in (f"codec_streams={CODEC_STREAMS}", "max_frames_per_segment=40", f"shutdown_grace_s={GRACE_S}",
                     "allow_url_ref_audio=1", "max_ref_audio_bytes=400000", "warmup=1"):
        assert expected in line.split(), (expected, line)


def test_vllm_api_key_is_a_speech_key_beside_the_tenants_keys(server):
    """vLLM's key opens the speech routes as a tenant's key does, and none of vLLM's text routes."""
    ref = "data:audio/wav;base64," + base64.b64encode(reference_wav()).decode()
    for key in ("vllm-key", "alice-key"):  # vLLM's key, and a tenant's that vLLM alone would refuse
        r = speak(server, key, ref_audio=ref, x_vector_only_mode=True)
        assert r.status_code == 200 and len(r.content) == 8 * 1920 * 2, (key, r.text)
    r = httpx.post(f"{server}/v1/audio/speech", json={"input": "Hi.", "ref_audio": ref, "x_vector_only_mode": True},
                   timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/completions", json={"prompt": [1], "max_tokens": 1},
                   headers=headers("vllm-key"), timeout=30)
    assert r.status_code == 404


def headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def speak(server, key: str, **body) -> httpx.Response:
    return httpx.post(f"{server}/v1/audio/speech", headers=headers(key), timeout=300,
                      json={"input": "Cloned speech.", "response_format": "pcm", **GREEDY, **body})


def test_saved_voices_belong_to_the_key_that_made_them(server):
    created = httpx.post(f"{server}/v1/audio/voices", headers=headers("alice-key"), timeout=300,
                         data={"name": "narrator", "ref_text": "This is the reference.", "consent": "yes"},
                         files={"audio_sample": ("ref.wav", reference_wav(), "audio/wav")})
    assert created.status_code == 201, created.text
    assert created.json()["mode"] == "icl" and "xvector" not in created.json()
    listed = httpx.get(f"{server}/v1/audio/voices", headers=headers("alice-key")).json()
    assert "narrator" in listed["voices"] and [v["name"] for v in listed["uploaded_voices"]] == ["narrator"]
    assert "narrator" not in httpx.get(f"{server}/v1/audio/voices", headers=headers("bob-key")).json()["voices"]

    audio = speak(server, "alice-key", voice="narrator")
    assert audio.status_code == 200 and len(audio.content) == 8 * 1920 * 2
    refused = speak(server, "bob-key", voice="narrator")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "voice"
    # the OpenAI SDK names a custom voice as {"id": name}: the same voice, the same refusal
    def by_sdk(key: str) -> bytes:
        sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=300)
        return sdk.audio.speech.create(model="tts-1", voice={"id": "narrator"}, input="Cloned speech.",
                                       response_format="pcm", extra_body=GREEDY).content

    assert_renders_one_generation(lambda: speak(server, "alice-key", voice="narrator").content,
                                  lambda: by_sdk("alice-key"))
    with pytest.raises(openai.BadRequestError) as refused_object:
        by_sdk("bob-key")
    assert (refused_object.value.code, refused_object.value.param) == (refused.json()["error"]["code"], "voice")
    duplicate = httpx.post(f"{server}/v1/audio/voices", headers=headers("alice-key"), timeout=300,
                           data={"name": "NARRATOR", "ref_text": "x"},
                           files={"audio_sample": ("ref.wav", reference_wav(), "audio/wav")})
    assert duplicate.status_code == 409
    assert httpx.delete(f"{server}/v1/audio/voices/narrator", headers=headers("bob-key")).status_code == 404
    assert httpx.delete(f"{server}/v1/audio/voices/narrator", headers=headers("alice-key")).status_code == 200
    assert speak(server, "alice-key", voice="narrator").status_code == 400


def test_a_voice_saved_from_a_speaker_embedding(server):
    hidden = 64  # the tiny 0.6B talker
    embedding = json.dumps(list(np.random.default_rng(1).standard_normal(hidden).round(4)))
    r = httpx.post(f"{server}/v1/audio/voices", headers=headers("bob-key"),
                   data={"name": "vector-voice", "speaker_embedding": embedding})
    assert r.status_code == 201 and r.json()["mode"] == "x_vector"
    assert speak(server, "bob-key", voice="vector-voice").status_code == 200
    wrong = httpx.post(f"{server}/v1/audio/voices", headers=headers("bob-key"),
                       data={"name": "bad", "speaker_embedding": "[1, 2, 3]"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "speaker_embedding"


def test_inline_reference_equals_the_saved_voice(server):
    ref = reference_wav(seed=3)
    saved = httpx.post(f"{server}/v1/audio/voices", headers=headers("bob-key"), timeout=300,
                       data={"name": "same", "ref_text": "Words of the reference."},
                       files={"audio_sample": ("ref.wav", ref, "audio/wav")})
    assert saved.status_code == 201
    inline = speak(server, "bob-key", voice="ignored", ref_audio=base64.b64encode(ref).decode(),
                   ref_text="Words of the reference.")
    assert inline.status_code == 200
    assert_renders_one_generation(lambda: speak(server, "bob-key", voice="ignored", ref_audio=base64.b64encode(ref).decode(),
                                                ref_text="Words of the reference.").content,
                                  lambda: speak(server, "bob-key", voice="same").content)
    data_uri = "data:audio/wav;base64," + base64.b64encode(ref).decode()
    xvec = speak(server, "bob-key", ref_audio=data_uri, x_vector_only_mode=True)
    assert xvec.status_code == 200 and xvec.content != inline.content


@pytest.mark.parametrize("body,status,code", [
    ({"ref_audio": "%%% not base64 %%%", "ref_text": "x"}, 400, "invalid_ref_audio"),
    ({"ref_audio": base64.b64encode(b"RIFF garbage, not audio" * 10).decode(), "ref_text": "x"}, 400, "invalid_ref_audio"),
    ({"ref_audio": base64.b64encode(reference_wav()).decode()}, 400, None),  # ICL needs ref_text
    ({"ref_audio": "http://127.0.0.1:9/ref.wav", "ref_text": "x"}, 400, "forbidden_ref_audio_url"),
    ({"ref_audio": "http://10.1.2.3/ref.wav", "ref_text": "x"}, 400, "forbidden_ref_audio_url"),
    ({"ref_audio": "file:///etc/passwd", "ref_text": "x"}, 400, "invalid_ref_audio"),
    ({"ref_audio": base64.b64encode(b"\0" * 600_000).decode(), "ref_text": "x"}, 413, "ref_audio_too_large"),
    ({"voice": "nobody"}, 400, "voice_not_found"),
    ({"voice": "x", "instructions": "whisper", "ref_audio": base64.b64encode(reference_wav()).decode(),
      "ref_text": "x"}, 400, None),
])
def test_bad_references_get_clear_errors(server, body, status, code):
    r = speak(server, "alice-key", **body)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code


def test_oversize_upload_is_413(server):
    r = httpx.post(f"{server}/v1/audio/voices", headers=headers("alice-key"), timeout=300,
                   data={"name": "huge", "ref_text": "x"},
                   files={"audio_sample": ("big.wav", reference_wav(seconds=10.0), "audio/wav")})
    assert r.status_code == 413


def test_voice_clone_example(server, tmp_path):
    ref = tmp_path / "ref.wav"
    ref.write_bytes(reference_wav(seed=5))
    out = tmp_path / "clone.wav"
    subprocess.run([sys.executable, str(EXAMPLES / "voice_clone.py"), "--base-url", f"{server}/v1", "--api-key",
                    "alice-key", "--ref-audio", str(ref), "--ref-text", "The reference words.", "--out", str(out)],
                   check=True, timeout=300)
    for path in (out, tmp_path / "clone_inline.wav"):
        audio, rate = sf.read(path)
        assert rate == 24000 and len(audio) > 0

    def voices(*args: str) -> dict:
        done = subprocess.run([sys.executable, str(EXAMPLES / "voices.py"), "--base-url", f"{server}/v1", "--api-key",
                               "alice-key", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    created = voices("create", "--name", "example-voice", "--audio", str(ref), "--ref-text", "The reference words.")
    assert created["name"] == "example-voice"
    assert "example-voice" in voices("list")["voices"]
    assert voices("delete", "--name", "example-voice")["deleted"] is True
    assert "example-voice" not in voices("list")["voices"]


def test_openai_client_clones_through_extra_body(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="alice-key", max_retries=0, timeout=300)
    audio = client.audio.speech.create(model="tts-1", voice="anything", input="Cloned by the SDK.", response_format="wav",
                                       extra_body={"ref_audio": base64.b64encode(reference_wav(seed=7)).decode(),
                                                   "ref_text": "A reference.", **GREEDY})
    wav, rate = sf.read(io.BytesIO(audio.content))
    assert rate == 24000 and len(wav) == 8 * 1920


def test_with_every_codec_stream_slot_taken_new_requests_get_503_before_any_audio_and_ready_says_so(server):
    """Three streamed requests of five sentences each hold the server's three codec stream slots,
    one each for the whole request although every sentence is a codec stream of its own. While
    they speak, every new request gets 503 `codec_busy` with Retry-After before any audio (a
    newcomer never takes a slot in the gap between two of their sentences), and /ready says why;
    each of the three gets all its audio; then the slots are free and a request is served."""
    frames = 12
    ref = "data:audio/wav;base64," + base64.b64encode(reference_wav()).decode()
    long_text = " ".join(f"Sentence number {n} is spoken now." for n in range(5))
    extra = {"ref_audio": ref, "x_vector_only_mode": True, "temperature": 0, "min_new_tokens": frames,
             "max_new_tokens": frames}
    holders: list[bytes | Exception] = []

    def hold() -> None:
        try:
            with openai.OpenAI(base_url=f"{server}/v1", api_key="alice-key", max_retries=0, timeout=300) \
                    .audio.speech.with_streaming_response.create(model="tts-1", voice="ignored", input=long_text,
                                                                 response_format="pcm", stream_format="audio",
                                                                 extra_body=extra) as response:
                holders.append(response.read())
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            holders.append(e)

    threads = [threading.Thread(target=hold) for _ in range(CODEC_STREAMS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while (r := httpx.get(f"{server}/ready", timeout=10)).status_code == 200 and not holders:
        assert time.monotonic() < deadline, "the three requests never held every slot"
        time.sleep(0.01)
    assert r.status_code == 503 and "every codec stream slot is in use" in r.json()["error"]["message"], r.text

    newcomer = openai.OpenAI(base_url=f"{server}/v1", api_key="bob-key", max_retries=0, timeout=60)
    refused = 0
    while any(t.is_alive() for t in threads) and not holders:
        try:
            with newcomer.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="ignored", input="A newcomer.", response_format="pcm", stream_format="audio",
                    extra_body={**extra, "max_new_tokens": 4, "min_new_tokens": 4}) as response:
                response.read()
            break  # admitted: one of the three has just finished (its client may not have seen its end yet)
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.response.headers["retry-after"] == "1", e
            assert e.response.json()["error"]["code"] == "codec_busy"
            refused += 1
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=300)
    assert refused >= 1
    whole = 5 * frames * 1920 * 2  # five sentences of 16-bit samples
    assert [len(h) if isinstance(h, bytes) else h for h in holders] == [whole] * CODEC_STREAMS

    deadline = time.monotonic() + 30
    while metric(server, "qwen3tts_codec_active_streams") or httpx.get(f"{server}/ready").status_code != 200:
        assert time.monotonic() < deadline, "the slots were not freed"
        time.sleep(0.1)
    assert len(speak(server, "bob-key", ref_audio=ref, x_vector_only_mode=True).content) == 8 * 1920 * 2


def test_sigterm_drains_what_is_in_flight_refuses_the_rest_and_exits_0_leaving_no_process(served):
    """Last: it ends this module's server. On SIGTERM a streamed request and a WebSocket session in
    flight go on to the end (the session's sentences sent after the signal too), while a new
    request or session gets 503 `shutting_down` with Retry-After and /ready says 503 draining;
    then the server exits with status 0, and its engine core and codec worker are gone with it."""
    api = psutil.Process(served.pid)
    children = api.children(recursive=True)
    assert any("EngineCore" in c.name() for c in children), [c.name() for c in children]
    frames, sentences = 25, 4
    ref = "data:audio/wav;base64," + base64.b64encode(reference_wav()).decode()
    extra = {"ref_audio": ref, "x_vector_only_mode": True, "temperature": 0, "min_new_tokens": frames,
             "max_new_tokens": frames}
    streamed: dict = {}
    started = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{served.base}/v1/audio/speech", headers=headers("alice-key"), timeout=300,
                              json={"input": " ".join(f"Sentence number {n} is spoken now." for n in range(sentences)),
                                    "response_format": "pcm", "stream_format": "audio", **extra}) as r:
                pieces = []
                for piece in r.iter_bytes():
                    pieces.append(piece)
                    started.set()
                streamed["audio"] = b"".join(pieces)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            streamed["error"] = e
        finally:
            started.set()

    def session_config() -> str:
        return json.dumps({"type": "session.config", "text_mode": "sentence", "voice": "ignored", "response_format": "pcm",
                           **extra, "min_new_tokens": 8, "max_new_tokens": 8})

    streaming = threading.Thread(target=stream)
    streaming.start()
    ws_url = f"{served.base.replace('http', 'ws')}/v1/audio/speech/stream?api_key=bob-key"
    with websockets.sync.client.connect(ws_url, max_size=None) as ws:
        ws.send(session_config())
        assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
        ws.send(json.dumps({"type": "input.text", "text": "The first sentence is spoken before the signal. "}))
        assert json.loads(ws.recv(timeout=120))["type"] == "audio.start"  # the session is in flight
        assert started.wait(120) and "error" not in streamed, streamed  # so is the stream

        os.kill(served.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{served.base}/ready", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "/ready never said the server was draining"
            time.sleep(0.05)
        assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"], ready.text
        refused = speak(served.base, "bob-key", ref_audio=ref, x_vector_only_mode=True)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        with websockets.sync.client.connect(ws_url) as newcomer:
            newcomer.send(session_config())
            assert json.loads(newcomer.recv(timeout=60))["error"]["code"] == "shutting_down"

        ws.send(json.dumps({"type": "input.text", "text": "A second one is sent after it."}))
        ws.send(json.dumps({"type": "input.done"}))
        events, audio = [], b""
        while not events or events[-1]["type"] not in ("session.done", "error"):
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                audio += message
            else:
                events.append(json.loads(message))
    assert [e["type"] for e in events] == ["audio.done", "audio.start", "audio.done", "session.done"], events
    assert len(np.frombuffer(audio, dtype="<i2")) == 2 * 8 * 1920  # both sentences, whole

    streaming.join(timeout=300)
    assert "error" not in streamed, streamed
    pcm = np.frombuffer(streamed["audio"], dtype="<i2")
    assert len(pcm) == sentences * frames * 1920 and np.abs(pcm).max() > 0  # every sentence, whole

    assert api.wait(timeout=GRACE_S + 60) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive  # the engine core, its worker and the codec worker went with it
    log = served.log.read_text(errors="replace")
    assert re.search(r"drained in [\d.]+ s; 0 speech requests and sessions left", log), log[-3000:]
