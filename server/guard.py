"""What the speech server serves, to whom, and how large a request body may be.

vLLM's API server carries dozens of routes of its own (completions, chat, tokenize, generate,
elastic scaling, LoRA loading, sleep, cache resets, collective RPC, ...). The talker is not a
text model, and those routes bypass the tenants' keys and limits, so the speech server serves
none of them: `SpeechGuard`, an ASGI middleware in front of every route, serves only the paths
of `SERVED` and answers every other path 404 in OpenAI's `{"error": {...}}` shape.

Everything it decides comes from the request line and headers, before any body byte is read:

1. the path: not in `SERVED` -> 404; there but not with this method -> 405 (with `Allow`);
2. the key: a `KEY` route, with keys configured, needs `Authorization: Bearer <key>` of a
   tenant -> else 401; before the speech service exists such routes answer 503;
3. the body size: a declared `Content-Length` over the route's limit -> 413 at once; a body
   without one (chunked) is counted as the route reads it and cut off with 413 at the limit.

`ROUTES` lists every route path the app is known to carry with its exposure (`SERVED` plus
vLLM's routes, `NOT_SERVED`); tests/test_server_routes.py walks the running app's routes and
fails on any route missing from it, so a route added later is classified before it ships (and
meanwhile the guard does not serve it).

WebSocket connections are checked for the path here; the route authenticates them itself
(header or `api_key` query parameter) before reading any message.

Every response of a `/v1/audio/` path, the guard's own refusals and the WebSocket handshake
included, carries `X-Request-Id`: the client's own where it sent a safe one (`request_id_for`),
else the id the server gives the request's synthesis, so that client and log lines agree. The
route finds it in `request.state.request_id` (a `RequestId`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .schemas import APIError


class Exposure(str, Enum):
    PUBLIC = "public"  # anyone
    KEY = "key"  # any tenant's key when keys are configured (everyone when none are)
    NOT_SERVED = "not_served"  # 404 for everyone


class Body(str, Enum):
    """Which body limit a route has (`body_limit`)."""

    NONE = "none"  # the route reads no body
    SPEECH = "speech"  # a JSON SpeechBody, possibly with base64 reference audio
    VOICE_UPLOAD = "voice_upload"  # a multipart form with an audio sample


WEBSOCKET = "WEBSOCKET"  # the "method" of a WebSocket handshake in `Route.methods`


@dataclass(frozen=True)
class Route:
    path: str  # as the app declares it ("/v1/audio/voices/{name}"); "/static/{path:path}" spans slashes
    methods: tuple[str, ...]
    exposure: Exposure
    body: Body = Body.NONE
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{[^}:]+:path\}", ".+", re.escape(self.path).replace(r"\{", "{").replace(r"\}", "}"))
        regex = re.sub(r"\{[^}]+\}", "[^/]+", regex)
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    def matches(self, path: str) -> bool:
        return self.pattern.match(path) is not None


GET, HEAD, POST, DELETE = "GET", "HEAD", "POST", "DELETE"

# The speech server's own surface. /metrics names tenants and vLLM labels its series with the
# served model name (by default the checkpoint's path), so it takes a key like /v1/models
# (README, "Security"). /docs loads its scripts from a CDN; with vLLM's --enable-offline-docs
# they come from /static instead, which is public like the pages that use them.
SERVED: tuple[Route, ...] = (
    Route("/v1/audio/speech", (POST,), Exposure.KEY, Body.SPEECH),
    Route("/v1/audio/speech/stream", (WEBSOCKET,), Exposure.KEY),
    Route("/v1/audio/voices", (GET,), Exposure.KEY),
    Route("/v1/audio/voices", (POST,), Exposure.KEY, Body.VOICE_UPLOAD),
    Route("/v1/audio/voices/{name}", (DELETE,), Exposure.KEY),
    Route("/v1/models", (GET,), Exposure.KEY),
    Route("/metrics", (GET,), Exposure.KEY),
    Route("/health", (GET,), Exposure.PUBLIC),
    Route("/ready", (GET,), Exposure.PUBLIC),
    Route("/openapi.json", (GET, HEAD), Exposure.PUBLIC),
    Route("/docs", (GET, HEAD), Exposure.PUBLIC),
    Route("/docs/oauth2-redirect", (GET, HEAD), Exposure.PUBLIC),
    Route("/redoc", (GET, HEAD), Exposure.PUBLIC),
    Route("/static/{path:path}", (GET, HEAD), Exposure.PUBLIC),
)

# vLLM's routes (0.26 to 0.32, every task and switch: dev mode, runtime LoRA, fault tolerance,
# SageMaker, pooling, transcription), none of them served here.
VLLM_PATHS = (
    "/load", "/version", "/kv_event_sources", "/ping", "/invocations", "/tokenize", "/detokenize",
    "/tokenizer_info", "/readyz", "/server_info", "/get_world_size",
    "/v1/completions", "/v1/completions/render", "/v1/completions/derender",
    "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/chat/completions/render",
    "/v1/chat/completions/derender", "/v1/responses", "/v1/responses/render", "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/cancel", "/v1/messages", "/v1/messages/count_tokens", "/v1/messages/render",
    "/v1/systemone", "/generative_scoring", "/inference/v1/generate", "/inference/v1/abort_requests",
    "/abort_requests", "/scale_elastic_ep", "/is_scaling_elastic_ep",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/{adapter_name}",
    "/start_profile", "/stop_profile", "/sleep", "/wake_up", "/is_sleeping", "/pause", "/resume", "/is_paused",
    "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/release_kv_cache_memory",
    "/init_weight_transfer_engine", "/start_weight_update", "/start_draft_weight_update", "/finish_weight_update",
    "/update_weights", "/update_weight_version", "/shutdown_weight_transfer_engine", "/weight_checker",
    "/weight_info", "/fault_tolerance/apply", "/fault_tolerance/status",
    "/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/realtime",
)
NOT_SERVED: tuple[Route, ...] = tuple(Route(p, (), Exposure.NOT_SERVED) for p in VLLM_PATHS)

ROUTES: tuple[Route, ...] = SERVED + NOT_SERVED

# Body limits. JSON escapes a character in at most 12 bytes (a surrogate pair as \uXXXX\uXXXX);
# the allowance covers the other fields, whitespace and a data: URI prefix.
JSON_BYTES_PER_CHAR = 12
JSON_ALLOWANCE = 1 << 20
FORM_ALLOWANCE = 1 << 20  # multipart boundaries and headers, ref_text, description, an embedding
NO_BODY_LIMIT = 64 << 10  # routes that read no body


def body_limit(body: Body, settings: Any) -> int:
    """Largest request body a route accepts, from the server's settings (`ServerSettings`):
    a speech request may carry the whole reference audio in base64 and the longest input;
    a voice upload the reference audio plus its form."""
    if body is Body.SPEECH:
        return 4 * -(-settings.max_ref_audio_bytes // 3) + JSON_BYTES_PER_CHAR * settings.max_input_chars + JSON_ALLOWANCE
    if body is Body.VOICE_UPLOAD:
        return settings.max_ref_audio_bytes + FORM_ALLOWANCE
    return NO_BODY_LIMIT


@dataclass(frozen=True)
class Admitted:
    route: Route
    body_limit: int


def route_for(path: str, method: str) -> Route | APIError:
    """The served route of a request, or the 404/405/426 it gets."""
    candidates = [r for r in SERVED if r.matches(path)]
    shown = f"{method} {path[:200]}"
    if not candidates:
        return APIError(404, f"{shown} is not served here: this server serves speech (its routes: /docs)",
                        code="not_found")
    for route in candidates:
        if method in route.methods:
            return route
    allowed = sorted({m for r in candidates for m in r.methods})
    if allowed == [WEBSOCKET]:
        return APIError(426, f"{path[:200]} is a WebSocket endpoint; connect with ws:// or wss://",
                        code="upgrade_required", headers={"Upgrade": "websocket"})
    return APIError(405, f"{shown} is not allowed; allowed: {', '.join(allowed)}", code="method_not_allowed",
                    headers={"Allow": ", ".join(allowed)})


def admit(path: str, method: str, headers: dict[str, str], service: Any) -> Admitted | APIError:
    """Decide a request from its line and headers alone (`headers`: lower-case names)."""
    route = route_for(path, method)
    if isinstance(route, APIError):
        return route
    if route.exposure is Exposure.PUBLIC:
        return Admitted(route, NO_BODY_LIMIT)
    if service is None:
        return APIError(503, "the speech service is not initialised", type="server_error", code="not_ready",
                        headers={"Retry-After": "5"})
    if method != WEBSOCKET:  # the WebSocket route authenticates before it reads a message
        try:
            service.authenticate(headers.get("authorization"))
        except APIError as e:
            e.headers.setdefault("WWW-Authenticate", "Bearer")
            return e
    limit = body_limit(route.body, service.settings)
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return APIError(400, "invalid Content-Length header", code="invalid_content_length")
        if int(declared) > limit:
            return too_large(limit)
    return Admitted(route, limit)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


# ------------------------------------------------------------------------------ request ids

REQUEST_ID_PATHS = "/v1/audio/"  # the speech routes, whose responses carry X-Request-Id
REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_CHARS = 128
_SAFE_REQUEST_ID = re.compile(f"[!-~]{{1,{MAX_REQUEST_ID_CHARS}}}")  # printable ASCII, no spaces


@dataclass(frozen=True)
class RequestId:
    """A speech request's ids. `shown`: what its responses' `X-Request-Id` and the server's log
    lines say, the client's own id or else `unique`; `unique`: the server's, never reused, which
    the engine's and the codec's requests are named after (a client's id may repeat)."""

    shown: str
    unique: str


def request_id_for(headers: dict[str, str], websocket: bool = False) -> RequestId:
    """The ids of a request with these (lower-case) headers: the client's `X-Request-Id` is kept
    where it is 1 to MAX_REQUEST_ID_CHARS printable ASCII characters, and replaced otherwise."""
    unique = f"{'ws' if websocket else 'speech'}-{uuid.uuid4().hex[:12]}"
    sent = headers.get("x-request-id")
    return RequestId(sent if sent is not None and _SAFE_REQUEST_ID.fullmatch(sent) else unique, unique)


def _with_request_id(send, request_id: str):
    """`send`, with the X-Request-Id header set on the response's start (HTTP, or a WebSocket's
    acceptance or refusal), in place of any other layer's."""
    starts = ("http.response.start", "websocket.accept", "websocket.http.response.start")
    value = request_id.encode("ascii")

    async def sending(message) -> None:
        if message["type"] in starts:
            headers = [(k, v) for k, v in message.get("headers") or () if k.lower() != REQUEST_ID_HEADER]
            message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, value)]}
        await send(message)

    return sending


class BodyTooLarge(Exception):
    """Raised into the route by `receive` when a body without Content-Length passes its limit."""


class SpeechGuard:
    """ASGI middleware applying `admit` to every HTTP request and WebSocket handshake.
    `state`: the app's state, where `init_state` puts the speech service (`qwen3tts`)."""

    def __init__(self, app, state: Any):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope["method"] if scope["type"] == "http" else WEBSOCKET
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path.startswith(REQUEST_ID_PATHS):
            request_id = request_id_for(headers, websocket=scope["type"] == "websocket")
            scope.setdefault("state", {})["request_id"] = request_id
            send = _with_request_id(send, request_id.shown)
        decision = admit(path, method, headers, getattr(self.state, "qwen3tts", None))
        if isinstance(decision, APIError):
            if scope["type"] == "websocket":
                await _deny_websocket(scope, receive, send, decision)
            else:
                await _send_error(send, decision)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        await self._call_limited(scope, receive, send, decision.body_limit)

    async def _call_limited(self, scope, receive, send, limit: int) -> None:
        received = 0
        overflowed = False
        started = False

        async def limited_receive():
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflowed = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if overflowed:  # whatever the route makes of the cut-off body, the answer is 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_error(send, too_large(limit))
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not overflowed:  # the route's own failure; an overflow's echo is answered below
                raise
        if overflowed and not started:
            await _send_error(send, too_large(limit))


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.to_json()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _deny_websocket(scope, receive, send, error: APIError) -> None:
    """Refuse a WebSocket handshake: with the HTTP error itself where the server can send one
    (ASGI's websocket.http.response extension), else a close (the client sees 403)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps(error.to_json()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


__all__ = ["ROUTES", "SERVED", "NOT_SERVED", "Exposure", "Body", "RequestId", "Route", "SpeechGuard", "admit",
           "body_limit", "request_id_for", "route_for"]
