"""Which routes the speech server serves, to whom, and how much body it reads before it decides.

Every route the app carries is checked from one list (`server.guard.ROUTES`): vLLM's own
routes answer 404 with and without a key, the speech routes 401 without a key, and a route
of the app missing from the list fails here, so a route added later is classified before it
ships. Each refusal comes from the request line and headers alone: the requests below declare
a large body and never send it, so a server that waited for the body would time out.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import pytest

from vllm_qwen3tts.base.settings import ServerSettings
from vllm_qwen3tts.server.guard import NOT_SERVED, ROUTES, SERVED, WEBSOCKET, Body, Exposure, body_limit

pytestmark = pytest.mark.engine

ALICE = {"Authorization": "Bearer alice-key"}
SAMPLE_PARAMS = {"{name}": "nobody", "{response_id}": "x", "{adapter_name}": "x", "{path:path}": "a.js"}
DECLARED_BODY = 10_000_000  # bytes announced in Content-Length and never sent

# vLLM's app as the server builds it (our plugins loaded), in the configurations that add routes:
# the default, vLLM's dev mode with runtime LoRA updates, and offline docs.
APP_ROUTES_SCRIPT = r"""
import json, os, sys
os.environ["VLLM_PLUGINS"] = "qwen3_tts,qwen3_tts_speech"
try:
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # vLLM 0.26
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

found = []
for env, flags in (({}, []), ({"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, []),
                   ({}, ["--enable-offline-docs"])):
    os.environ.update(env)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "checkpoint", *flags])
    app = build_app(args, ("generate",))
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or [])
        kind = type(route).__name__
        found.append([kind, route.path, ["WEBSOCKET"] if "WebSocket" in kind else methods])
print("ROUTES " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def app_routes() -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, path, methods) of every route of the app, hidden ones (`include_in_schema=False`)
    included."""
    proc = subprocess.run([sys.executable, "-c", APP_ROUTES_SCRIPT], capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ROUTES ")), None)
    assert line, proc.stderr[-3000:]
    return sorted({(k, p, tuple(m)) for k, p, m in json.loads(line[len("ROUTES "):])})


def concrete(path: str) -> str:
    for param, value in SAMPLE_PARAMS.items():
        path = path.replace(param, value)
    return path


def listed(path: str) -> list:
    return [r for r in ROUTES if r.path == path]


def raw_request(base: str, method: str, path: str, headers: dict[str, str], body: bytes = b"",
                timeout_s: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection; `headers` may declare a body that is not sent."""
    url = urlparse(base)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((url.hostname, url.port), timeout=timeout_s) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"{method} {path}: connection closed before a response"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        got = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        while len(rest) < int(got.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(status_line.split()[1]), got, rest


def upload_until_answered(base: str, path: str, headers: dict[str, str], total: int,
                          chunked: bool = False, limit_s: float = 120) -> tuple[int, bytes, bool]:
    """Send a `total`-byte body as fast as the server takes it, stopping at its first answer.
    Returns (bytes sent, what the server answered, whether it closed the connection)."""
    url = urlparse(base)
    lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json"]
    lines += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {total}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    piece = b"\x20" * (1 << 20)  # whitespace: valid JSON padding, were the server to parse it
    frame = (b"%x\r\n" % len(piece)) + piece + b"\r\n" if chunked else piece
    s = socket.create_connection((url.hostname, url.port), timeout=30)
    try:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        s.setblocking(False)
        sent, answer, closed, pending = 0, b"", False, memoryview(b"")
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([s], [s] if sent < total or pending else [], [], 1.0)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    closed = True
                    break
                if not data:
                    closed = True
                    break
                answer += data
                if b"\r\n\r\n" in answer:
                    break
            if writable:
                if not pending:
                    pending = memoryview(frame)
                try:
                    n = s.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                pending = pending[n:]
                if not pending:
                    sent += len(piece)
        else:
            raise AssertionError(f"no answer within {limit_s} s after {sent} bytes")
        return sent, answer, closed
    finally:
        s.close()


# ------------------------------------------------------------------------------ the list


def test_every_route_of_the_app_is_in_the_exposure_list(app_routes, speech_server):
    """A route the list does not name fails here (the guard already refuses it: add it to
    `guard.NOT_SERVED`, or to `guard.SERVED` with its exposure and body limit)."""
    documented = set(httpx.get(f"{speech_server.base}/openapi.json", timeout=30).json()["paths"])
    paths = {p for _, p, _ in app_routes} | documented
    missing = []
    for kind, path, methods in app_routes:
        rules = listed(path) or (listed(path + "/{path:path}") if kind == "Mount" else [])
        if not rules:
            missing.append(path)
        elif rules[0].exposure is not Exposure.NOT_SERVED and kind != "Mount":
            listed_methods = {m for r in rules for m in r.methods}
            assert set(methods) <= listed_methods, f"{path}: the app answers {methods}, the list has {listed_methods}"
    missing += sorted(documented - {r.path for r in ROUTES})
    assert not missing, f"routes of the app missing from server/guard.py ROUTES: {sorted(set(missing))}"
    # and the document describes only what is served
    assert documented <= {r.path for r in SERVED}, sorted(documented - {r.path for r in SERVED})
    assert {"/v1/audio/speech", "/v1/audio/voices", "/v1/models", "/metrics"} <= paths


def test_routes_not_served_answer_404_with_or_without_a_key_before_any_body(app_routes, speech_server):
    served = {r.path for r in SERVED}
    paths = {r.path for r in NOT_SERVED} | {p for _, p, _ in app_routes if p not in served and p != "/static"}
    for path in sorted(paths):
        for headers in ({}, ALICE):
            status, got, body = raw_request(speech_server.base, "POST", concrete(path),
                                            {**headers, "Content-Length": str(DECLARED_BODY)})
            assert status == 404, (path, status, body[:300])
            error = json.loads(body)["error"]
            assert error["code"] == "not_found" and "not served" in error["message"], (path, error)


def test_key_routes_answer_401_without_a_valid_key_before_any_body(speech_server):
    for route in SERVED:
        if route.exposure is not Exposure.KEY or route.methods == (WEBSOCKET,):
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "alice-key"}):
            status, got, body = raw_request(speech_server.base, route.methods[0], concrete(route.path),
                                            {**headers, "Content-Length": str(DECLARED_BODY)})
            assert status == 401, (route.path, headers, status, body[:300])
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
            assert got.get("www-authenticate") == "Bearer"


def test_a_websocket_without_a_key_is_refused_before_any_message_is_read(speech_server):
    import asyncio

    import websockets

    async def connect():
        async with websockets.connect(f"{speech_server.base.replace('http', 'ws')}/v1/audio/speech/stream") as ws:
            first = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return first, closed.value.rcvd.code

    error, code = asyncio.run(connect())
    assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key" and code == 1008


def test_public_routes_answer_without_a_key(speech_server):
    base = speech_server.base
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert httpx.get(f"{base}/ready", timeout=30).json() == {"status": "ready"}
    assert httpx.get(f"{base}/docs", timeout=30).status_code == 200
    assert "/v1/audio/speech" in httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]


def test_a_known_path_with_another_method_gets_405_with_its_methods(speech_server):
    r = httpx.put(f"{speech_server.base}/v1/audio/voices", headers=ALICE, timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert r.json()["error"]["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------ what it reveals


def test_metrics_and_models_take_a_key_and_name_no_file_path(speech_server):
    """Without a key, neither reveals tenants (/metrics labels series by tenant) nor the
    checkpoint's path (vLLM's own model list gave it as `root`)."""
    base = speech_server.base
    for path in ("/metrics", "/v1/models"):
        r = httpx.get(f"{base}{path}", timeout=30)
        assert r.status_code == 401, path
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == "invalid_api_key"
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer bob-key"}, timeout=30)
    assert metrics.status_code == 200 and "qwen3tts_requests_in_flight" in metrics.text
    models = httpx.get(f"{base}/v1/models", headers=ALICE, timeout=30).json()
    assert models["object"] == "list" and models["data"]
    for model in models["data"]:
        assert model["object"] == "model" and model["root"] == model["id"] and model["parent"] is None
        assert not any(isinstance(v, str) and v.startswith("/") for k, v in model.items() if k not in ("id", "root"))


# ------------------------------------------------------------------------------ bodies


def test_an_unauthenticated_200_mb_upload_gets_401_before_most_of_it_is_sent(speech_server):
    total = 200 << 20
    sent, answer, closed = upload_until_answered(speech_server.base, "/v1/audio/speech", {}, total)
    assert sent < total // 4, f"the server answered only after {sent} of {total} bytes"
    assert answer.startswith(b"HTTP/1.1 401") or (closed and not answer), answer[:200]


@pytest.mark.parametrize("path,body", [("/v1/audio/speech", Body.SPEECH), ("/v1/audio/voices", Body.VOICE_UPLOAD)])
def test_a_declared_oversize_body_gets_413_before_it_is_sent(speech_server, path, body):
    limit = body_limit(body, ServerSettings())  # the shared server runs with the default limits
    status, _, reply = raw_request(speech_server.base, "POST", path,
                                   {**ALICE, "Content-Type": "application/json", "Content-Length": str(limit + 1)})
    assert status == 413, reply[:300]
    assert json.loads(reply)["error"]["code"] == "request_too_large"
    # a body at the limit is read (and then judged as a request)
    status, _, reply = raw_request(speech_server.base, "POST", path,
                                   {**ALICE, "Content-Type": "application/json", "Content-Length": "2"}, b"{}")
    assert status in (400, 422), reply[:300]


def test_a_chunked_oversize_body_is_cut_off_with_413_at_the_limit(speech_server):
    limit = body_limit(Body.SPEECH, ServerSettings())
    total = 4 * limit
    sent, answer, closed = upload_until_answered(speech_server.base, "/v1/audio/speech", ALICE, total, chunked=True)
    assert sent < total // 2, f"the server read {sent} bytes of a body limited to {limit}"
    assert answer.startswith(b"HTTP/1.1 413") or (closed and not answer), answer[:200]
    if answer:
        assert b"request_too_large" in answer or b"content-length" in answer.lower()
    # the server still serves
    r = httpx.post(f"{speech_server.base}/v1/audio/speech", headers=ALICE, timeout=300,
                   json={"input": "Still here.", "voice": "ryan", "response_format": "wav", "max_new_tokens": 4})
    assert r.status_code == 200, r.text


def test_the_completion_that_killed_the_engine_is_not_served(speech_server):
    """POST /v1/completions {prompt: [999999]} once crashed the engine core (an id past the
    talker's vocabulary); it is not a route of this server, and the engine serves on."""
    served = httpx.get(f"{speech_server.base}/v1/models", headers=ALICE, timeout=30).json()["data"][0]["id"]
    body = {"model": served, "prompt": [999999], "max_tokens": 5}
    for headers in ({}, ALICE):
        r = httpx.post(f"{speech_server.base}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(f"{speech_server.base}/v1/audio/speech", headers=ALICE, timeout=300,
                   json={"input": "Still here.", "voice": "ryan", "response_format": "wav", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
