"""HTTP and WebSocket routes of the speech API.

POST   /v1/audio/speech          OpenAI's speech endpoint (+ Qwen extras); whole file, raw audio stream or SSE
WS     /v1/audio/speech/stream   text in incrementally, audio out per sentence
GET    /v1/audio/voices          built-in speakers and this key's saved voices
POST   /v1/audio/voices          save a cloned voice (multipart: audio_sample + ref_text, or speaker_embedding)
DELETE /v1/audio/voices/{name}   delete a saved voice
GET    /ready                    200 once warmed up while a request can start (503 with the reason otherwise)
GET    /health                   200 while the engine runs and every codec worker serves (503 with the reason otherwise)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..base.params import PromptError
from ..synthesis import SAMPLE_RATE, run_to_completion
from ..base.params import (MAX_CONSENT_CHARS, MAX_DESCRIPTION_CHARS, MAX_EMBEDDING_CHARS, MAX_NAME_CHARS, MAX_REF_TEXT_CHARS,
                      quoted)
from .audio_output import StreamingEncoder, content_type, encode_audio
from .guard import RequestId, request_id_for
from .schemas import (EMBEDDING_PATTERN, APIError, ClientMessage, ErrorBody, SessionConfig, SpeechBody, Usage,
                      bad_request, client_message, session_config)
from .service import SpeechJob, SpeechService, TextCuts, UtteranceText
from .tenants import Tenant
from .text_split import IncrementalSplitter
from .validation import SpeechRoute
from .voices import (VOICE_NAME_PATTERN, InvalidVoiceMetadata, InvalidVoiceName, InvalidVoiceProfile, VoiceExists,
                     VoiceMetadata, VoiceNotFound, VoiceQuotaExceeded)

router = APIRouter(route_class=SpeechRoute)  # every refusal in our error shape (validation.py)
logger = logging.getLogger("vllm.qwen3tts.server")  # under vLLM's logger: its handler and level apply

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in ((400, "Invalid request"), (401, "Missing or invalid API key"), (404, "Not found"),
                       (409, "Already exists"), (413, "Upload too large"), (429, "Rate or concurrency limit"), (503, "At capacity"))
}
AUDIO_RESPONSE = {
    200: {"description": "Audio in the requested format, or text/event-stream with stream_format=sse",
          "content": {"audio/mpeg": {}, "audio/wav": {}, "audio/ogg": {}, "audio/aac": {}, "audio/flac": {},
                      "audio/pcm": {}, "text/event-stream": {}}},
}


def service_of(request: Request | WebSocket) -> SpeechService:
    svc = getattr(request.app.state, "qwen3tts", None)
    if svc is None:
        raise APIError(503, "the speech service is not initialised", type="server_error", code="not_ready")
    return svc


def caller(conn: Request | WebSocket) -> tuple[SpeechService, Tenant]:
    """The speech service and the tenant whose API key came with this request, or APIError (401).
    A WebSocket may pass its key as the `api_key` query parameter instead: browsers cannot set
    headers on one."""
    svc = service_of(conn)
    key = conn.headers.get("authorization")
    if not key and isinstance(conn, WebSocket) and "api_key" in conn.query_params:
        key = f"Bearer {conn.query_params['api_key']}"
    return svc, svc.authenticate(key)


def request_id_of(conn: Request | WebSocket) -> RequestId:
    """The ids the guard gave this request (its responses' `X-Request-Id` is `shown`)."""
    found = getattr(conn.state, "request_id", None)
    return found if isinstance(found, RequestId) else request_id_for({}, websocket=isinstance(conn, WebSocket))


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=e.headers)


def usage_of(job: SpeechJob) -> Usage:
    return Usage(input_tokens=job.input_tokens, output_tokens=job.frames, total_tokens=job.input_tokens + job.frames)


# ---------------------------------------------------------------------------------- speech


@router.post("/v1/audio/speech", responses={**AUDIO_RESPONSE, **ERROR_RESPONSES}, response_class=Response)
async def create_speech(body: SpeechBody, request: Request) -> Response:
    received = getattr(request.state, "arrival", None) or time.perf_counter()  # plugin.ArrivalTime
    ids = request_id_of(request)
    try:
        svc, tenant = caller(request)
    except APIError as e:
        return error_response(e)
    try:
        stack = contextlib.AsyncExitStack()
        ticket = await stack.enter_async_context(svc.admit(tenant, "speech"))
        try:
            job = await svc.prepare(body, tenant, ticket.priority, received=received)
        except BaseException:
            await stack.aclose()
            raise
    except APIError as e:
        if e.status < 429:  # refusals of admission are counted by the admission itself
            svc.metrics.requests.labels(tenant.name, "speech", str(e.status)).inc()
        return error_response(e)

    job.request_id, request_id = ids.shown, ids.unique  # the engine's requests: request_id-0, -1, ...
    if body.streaming is None:
        async with stack:
            try:
                pcm = await _collect_unless_disconnected(svc, job, request_id, request)
            except APIError as e:
                svc.metrics.requests.labels(tenant.name, "speech", str(e.status)).inc()
                return error_response(e)
        if pcm is None:  # the client has gone: nobody reads an answer (the server sends none)
            svc.metrics.requests.labels(tenant.name, "speech", "499").inc()
            return Response(status_code=499)
        data = encode_audio(pcm, body.response_format, SAMPLE_RATE)
        svc.metrics.requests.labels(tenant.name, "speech", "200").inc()
        return Response(data, media_type=content_type(body.response_format), headers=_usage_headers(job, pcm.size))

    generator = _sse_events(svc, job, request_id, body) if body.streaming == "sse" else _audio_bytes(svc, job, request_id, body)
    media = "text/event-stream" if body.streaming == "sse" else content_type(body.response_format)
    return SpeechStreamingResponse(_holding(stack, generator, svc, tenant), media_type=media,
                                   headers={"X-Input-Tokens": str(job.input_tokens), "Cache-Control": "no-cache"},
                                   stall_timeout_s=svc.settings.write_stall_timeout_s, request_id=ids.shown)


class SpeechStreamingResponse(StreamingResponse):
    """A streamed speech response that frees what its request holds as soon as it ends, however it ends.

    - Its headers go out with the first piece of the body, so that a failure before any audio
      (an `APIError`: 503 while the codec restarts, say) is an ordinary error response.
    - A write that waits more than `stall_timeout_s` (a client that stopped reading) ends it:
      the connection is closed and synthesis stopped.
    - Its body is closed (`aclose`, and with it every generator under it) before it returns,
      in a task of its own: not when it is garbage-collected, and not cut short by the
      cancellation that a client's disconnect delivers at every await of the response.
    """

    def __init__(self, content, *, stall_timeout_s: float, request_id: str, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.stall_timeout_s = stall_timeout_s
        self.request_id = request_id

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_to_completion(_close_quietly(self.body_iterator))

    async def stream_response(self, send) -> None:
        try:
            first = await anext(self.body_iterator, None)
        except APIError as e:
            await self._send_error(send, e)
            return
        except Exception:
            logger.exception("speech request %s failed before its first audio", self.request_id)
            await self._send_error(send, APIError(500, "speech synthesis failed", type="server_error"))
            return
        try:
            await self._write(send, {"type": "http.response.start", "status": self.status_code,
                                     "headers": self.raw_headers})
            if first is not None:
                await self._write(send, {"type": "http.response.body", "body": first, "more_body": True})
                async for chunk in self.body_iterator:
                    await self._write(send, {"type": "http.response.body", "body": chunk, "more_body": True})
            await self._write(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except _ClientStalled:
            logger.warning("speech request %s: the client took no audio for %g s; stream ended",
                           self.request_id, self.stall_timeout_s)
        except APIError as e:  # after the headers: a raw audio stream can only end early
            logger.warning("speech request %s ended early: %s", self.request_id, e)

    async def _write(self, send, message: dict) -> None:
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                await send(message)
        except TimeoutError:
            raise _ClientStalled from None

    async def _send_error(self, send, e: APIError) -> None:
        response = error_response(e)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})


class _ClientStalled(Exception):
    """A write to the client waited longer than the stall timeout."""


async def _close_quietly(stream) -> None:
    try:
        await stream.aclose()
    except Exception:  # noqa: BLE001 - its failure was reported where it happened
        logger.debug("closing a speech stream failed", exc_info=True)


async def _holding(stack: contextlib.AsyncExitStack, generator, svc: SpeechService, tenant):
    """Stream `generator` while holding the admission ticket; closing this closes both (the
    generator first)."""
    status = "200"
    try:
        async with stack, contextlib.aclosing(generator):
            async for piece in generator:
                yield piece
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    except APIError as e:
        status = str(e.status)
        raise
    except Exception:
        status = "500"
        raise
    finally:
        svc.metrics.requests.labels(tenant.name, "speech", status).inc()


async def _collect_unless_disconnected(svc: SpeechService, job: SpeechJob, request_id: str,
                                       request: Request) -> np.ndarray | None:
    """The whole request's PCM, or None as soon as the client disconnects: the ASGI receive
    channel says so (`http.disconnect`) at once, and the synthesis is then stopped and all it
    held freed before this returns."""
    async def collect() -> np.ndarray:
        async with contextlib.aclosing(svc.pcm_stream(job, request_id)) as stream:
            pieces = [pcm async for pcm in stream]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    collecting = asyncio.ensure_future(collect())
    leaving = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not collecting.done():
            collecting.cancel()
            await run_to_completion(_settled(collecting))
    if collecting.cancelled():
        return None
    return collecting.result()


async def _until_disconnected(receive) -> None:
    """Returns when the client disconnects (the request's body has been read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _settled(task: asyncio.Future) -> None:
    await asyncio.wait({task})


def _usage_headers(job: SpeechJob, samples: int) -> dict[str, str]:
    return {
        "X-Input-Tokens": str(job.input_tokens),
        "X-Output-Tokens": str(job.frames),
        "X-Audio-Duration": f"{samples / SAMPLE_RATE:.3f}",
        "X-Finish-Reason": job.finish_reason,
    }


async def _audio_bytes(svc: SpeechService, job: SpeechJob, request_id: str, body: SpeechBody):
    with StreamingEncoder(body.response_format, SAMPLE_RATE) as encoder:
        async with contextlib.aclosing(svc.pcm_stream(job, request_id)) as stream:
            async for pcm in stream:
                data = encoder.write(pcm)
                if data:
                    yield data
        tail = encoder.finish()
    if tail:
        yield tail


async def _sse_events(svc: SpeechService, job: SpeechJob, request_id: str, body: SpeechBody):
    """SSE events of the request's audio. A failure before the first event propagates (the
    response is then an HTTP error); after it, it is reported in-band, as OpenAI does."""
    def event(kind: str, payload: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

    encoder = StreamingEncoder(body.response_format, SAMPLE_RATE)
    started = False
    try:
        async with contextlib.aclosing(svc.pcm_stream(job, request_id)) as stream:
            async for pcm in stream:
                data = encoder.write(pcm)
                if data:
                    started = True
                    yield event("speech.audio.delta", {"audio": base64.b64encode(data).decode(),
                                                       "response_format": body.response_format})
        tail = encoder.finish()
        if tail:
            started = True
            yield event("speech.audio.delta", {"audio": base64.b64encode(tail).decode(),
                                               "response_format": body.response_format})
        yield event("speech.audio.done", {"usage": usage_of(job).model_dump(), "finish_reason": job.finish_reason})
    except Exception as e:
        if not started:
            raise
        if isinstance(e, APIError):
            error = e.to_json()["error"]
        else:
            logger.exception("speech request %s failed", job.request_id)
            error = {"message": "speech synthesis failed", "type": "server_error"}
        yield event("speech.audio.error", {"error": error})
    finally:
        encoder.close()


# ---------------------------------------------------------------------------------- voices


@router.get("/v1/audio/voices", responses=ERROR_RESPONSES)
async def list_voices(request: Request) -> JSONResponse:
    try:
        svc, tenant = caller(request)
    except APIError as e:
        return error_response(e)
    saved = svc.voices.list(tenant.id)
    return JSONResponse({"voices": svc.available_voice_names(tenant),
                         "uploaded_voices": [v.to_public_dict() for v in saved]})


@router.post("/v1/audio/voices", responses=ERROR_RESPONSES, status_code=201)
async def create_voice(
    request: Request,
    name: str = Form(..., min_length=1, max_length=MAX_NAME_CHARS, pattern=f"^{VOICE_NAME_PATTERN.pattern}$",
                     description="The voice's name: letters, digits, '_', '.' and '-' (unique per API key, "
                     "any case)"),
    audio_sample: UploadFile | None = File(None, description="Reference audio (wav, mp3, flac, ...); its size is "
                                           "limited by the server (QWEN3TTS_MAX_REF_AUDIO_BYTES, default 10 MiB)"),
    ref_text: str | None = Form(None, max_length=MAX_REF_TEXT_CHARS,
                                description="Transcript of audio_sample (in-context cloning); without it, the "
                                "speaker embedding only"),
    speaker_embedding: str | None = Form(None, max_length=MAX_EMBEDDING_CHARS, pattern=EMBEDDING_PATTERN,
                                         description="Instead of audio: the speaker embedding (x-vector), a JSON "
                                         "list of as many numbers as the talker's hidden size"),
    consent: str | None = Form(None, max_length=MAX_CONSENT_CHARS, description="Consent record, stored as is"),
    description: str | None = Form(None, max_length=MAX_DESCRIPTION_CHARS, description="Free text, stored as is"),
) -> JSONResponse:
    """Save a cloned voice under this API key, from exactly one of audio_sample (+ ref_text) or
    speaker_embedding. Only Base checkpoints clone voices: elsewhere a valid upload gets 404."""
    try:
        svc, tenant = caller(request)
        voice = await _save_voice(svc, tenant, name, audio_sample, ref_text, speaker_embedding, consent, description)
    except APIError as e:
        return error_response(e)
    except VoiceExists:
        return error_response(APIError(409, f"a voice named {name!r} already exists", param="name",
                                       code="voice_exists"))
    except VoiceQuotaExceeded as e:
        return error_response(APIError(400, str(e), param="name", code="voice_quota_exceeded"))
    except InvalidVoiceName as e:
        return error_response(bad_request(str(e), param="name", code="invalid_voice_name"))
    except InvalidVoiceProfile as e:
        return error_response(bad_request(str(e), param="speaker_embedding", code="invalid_voice"))
    except InvalidVoiceMetadata as e:
        return error_response(bad_request(str(e), param=str(e).split(" ", 1)[0], code="invalid_value"))
    return JSONResponse(voice.to_public_dict(), status_code=201)


async def _save_voice(svc: SpeechService, tenant: Tenant, name: str, audio_sample: UploadFile | None,
                      ref_text: str | None, speaker_embedding: str | None, consent: str | None,
                      description: str | None):
    """`create_voice`'s work: check the upload, clone the voice (or take the embedding), store it."""
    from ..synthesis import VoiceProfile

    if (audio_sample is None) == (speaker_embedding is None):
        raise bad_request("send exactly one of audio_sample or speaker_embedding", param="audio_sample")
    hidden = svc.config.talker.decoder.hidden_size
    xvector = None if speaker_embedding is None else speaker_embedding_values(speaker_embedding, hidden)
    if svc.config.tts_model_type != "base":
        raise APIError(404, "this server's checkpoint cannot clone voices, so it saves none (only Base "
                       "checkpoints can)", param="name", code="unsupported_task_type")
    if name.lower() in {n.lower() for n in svc.config.speakers}:
        raise bad_request(f"{name!r} is a built-in speaker name", param="name", code="invalid_voice_name")
    extra: dict[str, Any] = {}
    seconds = None
    if audio_sample is not None:
        audio = await audio_sample.read(svc.settings.max_ref_audio_bytes + 1)
        if len(audio) > svc.settings.max_ref_audio_bytes:
            raise APIError(413, f"audio_sample exceeds {svc.settings.max_ref_audio_bytes} bytes",
                           param="audio_sample", code="ref_audio_too_large")
        profile = await svc.clone(audio, ref_text, x_vector_only=not (ref_text or "").strip())
        extra = {"mime_type": (audio_sample.content_type or "")[:100], "file_size": len(audio)}
        if profile.ref_codes:
            seconds = len(profile.ref_codes) / 12.5
    else:
        profile = VoiceProfile(xvector=xvector)
    metadata = VoiceMetadata(consent=consent, description=description, source_audio_seconds=seconds,
                             model=str(svc.engine.model_dir), extra=extra)
    return await asyncio.to_thread(svc.voices.create, tenant.id, name, profile, metadata)


def speaker_embedding_values(text: str, size: int) -> list[float]:
    """The x-vector of a voice upload (`EMBEDDING_PATTERN` holds already: a JSON list of plain
    numbers, no booleans, none infinite): exactly `size` of them, else 400."""
    values = json.loads(text)
    if len(values) != size:
        raise bad_request(f"speaker_embedding must hold {size} numbers (the talker's hidden size), got "
                          f"{len(values)}", param="speaker_embedding", code="invalid_value")
    return [float(v) for v in values]


@router.delete("/v1/audio/voices/{name}", responses=ERROR_RESPONSES)
async def delete_voice(name: str, request: Request) -> JSONResponse:
    try:
        svc, tenant = caller(request)
        await asyncio.to_thread(svc.voices.delete, tenant.id, name)
    except APIError as e:
        return error_response(e)
    except VoiceNotFound:
        return error_response(APIError(404, f"no saved voice named {quoted(name)}", param="name",
                                       code="voice_not_found"))
    return JSONResponse({"name": name, "deleted": True})


# ---------------------------------------------------------------------------------- health


@router.get("/ready", responses={503: {"model": ErrorBody}})
async def ready(request: Request) -> JSONResponse:
    svc = getattr(request.app.state, "qwen3tts", None)
    reason = "starting" if svc is None else svc.not_ready_reason()
    if reason is not None:
        return error_response(APIError(503, f"not ready: {reason}", type="server_error", code="not_ready",
                                       headers={"Retry-After": "1"}))
    return JSONResponse({"status": "ready"})


@router.get("/health", responses={503: {"model": ErrorBody}})
async def health(request: Request) -> JSONResponse:
    svc = getattr(request.app.state, "qwen3tts", None)
    reason = "starting" if svc is None else svc.unavailable_reason()
    if reason is not None:
        return error_response(APIError(503, f"unhealthy: {reason}", type="server_error", code="unhealthy",
                                       headers={"Retry-After": "5"}))
    return JSONResponse({"status": "ok"})


# ---------------------------------------------------------------------------------- websocket


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(ws: WebSocket) -> None:
    """Incremental text in, audio out per sentence (message schema: README, WebSocket)."""
    await ws.accept()
    opened = await _open_session(ws)
    if opened is not None:
        with opened[0].open_session():  # a shutdown's drain waits for the session
            await SpeechSession(ws, *opened).run()


async def _open_session(ws: WebSocket) -> tuple[SpeechService, Tenant, SessionConfig] | None:
    """Authenticate and read the first message, the session's configuration (checked as an HTTP
    request's body is; it must come within the idle timeout). None once the session has been
    refused and closed, or the client left."""
    try:
        svc, tenant = caller(ws)
        try:
            first = await asyncio.wait_for(ws.receive(), svc.settings.websocket_idle_timeout_s)
        except TimeoutError:
            raise idle_timeout(svc.settings.websocket_idle_timeout_s) from None
        if first["type"] == "websocket.disconnect":
            return None
        text = first.get("text")
        if text is None and first.get("bytes") is not None:
            text = first["bytes"].decode("utf-8", "replace")
        config = session_config(text, token_mode=svc.engine.supports_text_streaming())
        most = svc.settings.websocket_idle_timeout_s
        if config.idle_timeout_s is not None and config.idle_timeout_s > most:
            raise bad_request(f"idle_timeout_s must be at most {most:g} on this server", param="idle_timeout_s",
                              code="invalid_value")
        svc.check_accepting()  # 503 once the server drains for its shutdown
        return svc, tenant, config
    except APIError as e:
        await _ws_error(ws, e)
        await ws.close(code=1008)
    except WebSocketDisconnect:
        pass
    except Exception:
        logger.exception("speech session %s: session.config failed", request_id_of(ws).shown)
        await _ws_error(ws, APIError(500, "internal error; the server log has the details", type="server_error",
                                     code="internal_error"))
        await ws.close(code=1011)
    return None


def idle_timeout(seconds: float) -> APIError:
    """The error of a WebSocket session closed for sending nothing for `seconds` while nothing was
    being spoken for it (it would otherwise hold its connection, and a held request, for ever)."""
    return APIError(408, f"the session sent nothing for {seconds:g} s while nothing was being spoken for it; "
                    "it is closed", code="idle_timeout")


class SpeechSession:
    """One configured WebSocket session, in one of two text modes:

    - token (the default): each utterance (its text up to input.flush or input.done) is spoken by
      a request that starts at its first words (or once `min_text_tokens` are final) and takes the
      rest as it arrives (`TTSEngine.stream_text`). A long one continues in a new request at a
      sentence end before the first runs out of room (`UtteranceText`), its audio on the same
      stream. input.clear stops what is being spoken and drops the text queued for it;
    - sentence: the client's text is split into sentences as it arrives, and a speaker task
      synthesises them in order, a request each.

    Text waiting to be spoken is bounded (max_input_chars: beyond, the text is refused with an
    error event and the session goes on), as is a malformed message. A session that sends nothing
    for its idle timeout while nothing is being spoken for it is closed. However the session ends
    (input.done, a client that leaves, stops reading or idles, a failure), synthesis is stopped
    and what it held freed."""

    def __init__(self, ws: WebSocket, svc: SpeechService, tenant: Tenant, config: SessionConfig):
        self.ws, self.svc, self.tenant = ws, svc, tenant
        self.template, self.text_mode, self.min_text_tokens = config.template, config.text_mode, config.min_text_tokens
        self.idle_timeout_s = config.idle_timeout_s or svc.settings.websocket_idle_timeout_s
        self.splitter = IncrementalSplitter(max_chars=svc.settings.max_segment_chars)
        self.sentences: asyncio.Queue[str | None] = asyncio.Queue()
        # token mode: the utterances to speak, in order, each a queue of its text pieces (None ends
        # one, and the session's None ends them all); `filling` is the one input.text appends to,
        # `spoken` the one being spoken
        self.utterances: asyncio.Queue[asyncio.Queue[str | None] | None] = asyncio.Queue()
        self.filling: asyncio.Queue[str | None] | None = None
        self.spoken: asyncio.Queue[str | None] | None = None
        self.speaking: asyncio.Task | None = None
        self.totals = {"input_tokens": 0, "output_tokens": 0, "sentences": 0}
        self.stall_s = svc.settings.write_stall_timeout_s
        self.queued_chars = 0  # text queued to be spoken that the speaker has not taken yet
        # The idle clock runs while the speaker waits for the client's text (`from_client`), from the
        # later of the client's last message and the start of that wait.
        self.waiting = asyncio.Event()
        self.idle_since = asyncio.get_running_loop().time()
        self.speaker: asyncio.Task | None = None
        self.request_id = request_id_of(ws)  # the engine's requests: unique-0, unique-1, ... (one per sentence)

    async def run(self) -> None:
        await self.ws.send_json({"type": "session.created", "response_format": self.template.response_format,
                                 "sample_rate": SAMPLE_RATE, "text_mode": self.text_mode})
        self.speaker = asyncio.create_task(self.speak() if self.text_mode == "sentence" else self.speak_utterances())
        try:
            while True:
                try:
                    message = await self.next_message()
                except APIError as e:  # a malformed message: said, and the session goes on
                    await _ws_error(self.ws, e)
                    continue
                if message is None or not await self.handle(message):
                    return
        except WebSocketDisconnect:
            pass
        except Exception:
            logger.exception("speech session %s failed", self.request_id.shown)
            with contextlib.suppress(Exception):
                await _ws_error(self.ws, APIError(500, "internal error; the server log has the details",
                                                  type="server_error", code="internal_error"))
                await self.ws.close(code=1011)
        finally:
            if not self.speaker.done():
                self.speaker.cancel()  # the client left: stop synthesis, which frees what it holds
            with contextlib.suppress(BaseException):  # also takes its exception, if it failed
                await self.speaker

    async def handle(self, message: ClientMessage) -> bool:
        """Act on one client message; False once the session is over."""
        if message.type == "input.text":
            await self.queue_text(message.text)
        elif message.type == "input.done":
            if self.text_mode == "token":
                self.end_utterance()
                await self.utterances.put(None)
            else:
                for sentence in self.splitter.flush():
                    self.queue_sentence(sentence)
                await self.sentences.put(None)
            await self.finish()
            return False
        elif message.type == "input.flush":
            self.end_utterance()
        elif message.type == "input.clear":
            self.clear()
        return True

    async def queue_text(self, text: str) -> None:
        """input.text: queue `text` to be spoken, unless the text waiting to be spoken would then
        exceed max_input_chars: it is refused then (an error event), and the session goes on."""
        limit = self.svc.settings.max_input_chars
        if self.queued_chars + len(text) > limit:
            await _ws_error(self.ws, bad_request(
                f"text of {len(text)} characters not accepted: {self.queued_chars} characters are waiting to be "
                f"spoken, and at most {limit} may wait (max_input_chars); send it again once more audio has come",
                param="text", code="text_queue_full"))
            return
        if self.text_mode == "sentence":
            for sentence in self.splitter.feed(text):
                self.queue_sentence(sentence)
        elif text:
            if self.filling is None:
                self.filling = asyncio.Queue()
                self.utterances.put_nowait(self.filling)
            self.filling.put_nowait(text)
            self.queued_chars += len(text)

    def queue_sentence(self, sentence: str) -> None:
        self.sentences.put_nowait(sentence)
        self.queued_chars += len(sentence)

    async def from_client(self, queue: asyncio.Queue):
        """The next item of `queue` (text the client sent, an utterance, or None at an end), its text
        counted out of the text waiting to be spoken. While `queue` is empty the speaker waits on
        the client: the idle clock runs."""
        if queue.empty():
            self.idle_since = asyncio.get_running_loop().time()
            self.waiting.set()
            try:
                item = await queue.get()
            finally:
                self.waiting.clear()
        else:
            item = queue.get_nowait()
        if isinstance(item, str):
            self.queued_chars -= len(item)
        return item

    def discard(self, pieces: asyncio.Queue) -> None:
        """Drop the text queued in `pieces` (an utterance's): it will not be spoken."""
        while not pieces.empty():
            if isinstance(piece := pieces.get_nowait(), str):
                self.queued_chars -= len(piece)

    def end_utterance(self) -> None:
        """Token mode: the utterance being written is complete; later text starts the next one."""
        if self.filling is not None:
            self.filling.put_nowait(None)
            self.filling = None

    def clear(self) -> None:
        """input.clear: the utterance being written is over, nothing queued is spoken, and the one
        being spoken stops within a decode step (`speak_utterances` reports it cleared)."""
        self.end_utterance()
        ended = False
        while not self.utterances.empty():
            if (pieces := self.utterances.get_nowait()) is None:
                ended = True  # input.done came: the session still ends
            else:
                self.discard(pieces)
        if ended:
            self.utterances.put_nowait(None)
        if self.speaking is not None and not self.speaking.done():
            self.discard(self.spoken)
            self.speaking.cancel()  # stops the request within a decode step

    async def finish(self) -> None:
        """After input.done: wait for the last sentence, then report the usage and close."""
        if not await self.until_spoken():
            return  # the client left: the speaker is stopped by run()
        if self.speaker.cancelled() or self.speaker.exception() is not None:
            await self.end_early()
            return
        totals = self.totals
        await self.ws.send_json({"type": "session.done", "usage": {
            **totals, "total_tokens": totals["input_tokens"] + totals["output_tokens"]}})
        await self.ws.close()

    async def until_spoken(self) -> bool:
        """After input.done, wait for the speaker to finish; False as soon as the client disconnects
        instead (a sentence queued in the engine would otherwise hold its slots until its first audio
        fails to send). Meanwhile input.clear still stops the utterance being spoken (token mode);
        any other message gets an error event."""
        while not self.speaker.done():
            leaving = asyncio.ensure_future(self.ws.receive())
            await asyncio.wait({self.speaker, leaving}, return_when=asyncio.FIRST_COMPLETED)
            if not leaving.done():
                leaving.cancel()
                continue
            if leaving.exception() is not None or leaving.result()["type"] == "websocket.disconnect":
                return False
            try:
                message = client_message(leaving.result(), self.text_mode)
            except APIError as e:
                await _ws_error(self.ws, e)
                continue
            if message.type == "input.clear":
                self.clear()
            else:
                await _ws_error(self.ws, bad_request(f"{message.type} after input.done: the session takes no more "
                                                     "input", param="type", code="input_after_done"))
        return True

    async def send(self, message: dict | bytes) -> None:
        """One write to the client; one that waits more than the stall timeout ends the session."""
        try:
            async with asyncio.timeout(self.stall_s):
                await (self.ws.send_bytes(message) if isinstance(message, bytes) else self.ws.send_json(message))
        except TimeoutError:
            raise _ClientStalled from None

    async def speak(self) -> None:
        index = 0
        while (text := await self.from_client(self.sentences)) is not None:
            try:
                await self.speak_sentence(text, index)
            except APIError as e:
                await self.send({"type": "error", **e.to_json(), "sentence_index": index})
            index += 1
            self.totals["sentences"] = index

    async def speak_sentence(self, text: str, index: int) -> None:
        body = self.template.model_copy(update={"input": text, "stream_format": None, "stream": None})
        async with self.svc.admit(self.tenant, "websocket") as ticket:
            job = await self.svc.prepare(body, self.tenant, ticket.priority, split=False)
            job.request_id = self.request_id.shown
            await self.send({"type": "audio.start", "sentence_index": index, "text": text})
            samples = await self.send_audio(job, index)
            self.totals["input_tokens"] += job.input_tokens
            self.totals["output_tokens"] += job.frames
            await self.send({"type": "audio.done", "sentence_index": index,
                             "audio_seconds": round(samples / SAMPLE_RATE, 3)})

    async def send_audio(self, job: SpeechJob, index: int) -> int:
        """Synthesize `job` (a sentence), sending its encoded audio as it comes; the samples sent."""
        with StreamingEncoder(self.template.response_format, SAMPLE_RATE) as encoder:
            samples = await self.stream_audio(encoder, job, f"{self.request_id.unique}-{index}")
            tail = encoder.finish()
        if tail:
            await self.send(tail)
        return samples

    async def stream_audio(self, encoder: StreamingEncoder, job: SpeechJob, request_id: str,
                           text: AsyncIterator[str] | None = None) -> int:
        """Synthesize `job` (token mode: its text arriving as `text`) as the engine's `request_id`,
        sending the audio through `encoder` as it comes; the samples it made."""
        samples = 0
        async with contextlib.aclosing(self.svc.pcm_stream(job, request_id, text, self.min_text_tokens)) as stream:
            async for pcm in stream:
                samples += pcm.size
                data = encoder.write(pcm)
                if data:
                    await self.send(data)
        return samples

    async def speak_utterances(self) -> None:
        """Token mode's speaker: each utterance in order; one stopped by input.clear ends with
        audio.done `"cleared": true`, and the session goes on. The text of one that failed or was
        cleared is dropped: text sent after it starts the next utterance."""
        index = 0
        try:
            while (pieces := await self.from_client(self.utterances)) is not None:
                self.spoken = pieces
                self.speaking = asyncio.create_task(self.speak_utterance(pieces, index))
                await asyncio.wait({self.speaking})
                self.spoken = None
                error = None if self.speaking.cancelled() else self.speaking.exception()
                if self.speaking.cancelled() or error is not None:
                    self.discard(pieces)
                    if self.filling is pieces:
                        self.filling = None
                if self.speaking.cancelled():
                    await self.send({"type": "audio.done", "sentence_index": index, "cleared": True})
                elif isinstance(error, APIError):
                    await self.send({"type": "error", **error.to_json(), "sentence_index": index})
                elif error is not None:
                    raise error
                index += 1
                self.totals["sentences"] = index
        finally:
            if self.speaking is not None and not self.speaking.done():
                self.speaking.cancel()
                await asyncio.wait({self.speaking})

    async def speak_utterance(self, pieces: asyncio.Queue, index: int) -> None:
        """One utterance: a request, or several in turn when it is long (`UtteranceText`), their
        audio one stream between one audio.start and one audio.done (which counts the requests)."""
        utterance = UtteranceText(lambda: self.from_client(pieces), self.svc.engine.tokenizer)
        first = await utterance.next_start()
        if first is None:  # flushed before any text
            return
        requests = samples = 0
        async with self.svc.admit(self.tenant, "websocket") as ticket:
            with StreamingEncoder(self.template.response_format, SAMPLE_RATE) as encoder:
                while first is not None:
                    body = self.template.model_copy(update={"input": first, "stream_format": None, "stream": None,
                                                            "non_streaming_mode": False})
                    job = await self.svc.prepare(body, self.tenant, ticket.priority, split=False)
                    job.request_id = self.request_id.shown
                    if not requests:
                        await self.send({"type": "audio.start", "sentence_index": index})
                    request_id = f"{self.request_id.unique}-{index}" + (f".{requests}" if requests else "")
                    text = utterance.pieces(first, TextCuts.for_frames(self.svc.request_frames(job)))
                    try:
                        async with contextlib.aclosing(text):
                            samples += await self.stream_audio(encoder, job, request_id, text)
                    except PromptError as e:
                        raise bad_request(str(e), param="input") from None
                    self.totals["output_tokens"] += job.frames
                    requests += 1
                    first = await utterance.next_start()
                tail = encoder.finish()
            if tail:
                await self.send(tail)
            self.totals["input_tokens"] += len(self.svc.engine.tokenizer(utterance.text, add_special_tokens=False)
                                               ["input_ids"])
            await self.send({"type": "audio.done", "sentence_index": index, "text": utterance.text,
                             "audio_seconds": round(samples / SAMPLE_RATE, 3), "requests": requests})

    async def next_message(self) -> ClientMessage | None:
        """The client's next message (APIError for a malformed one), or None once the session is
        over without one: the speaker stopped early (`end_early`), or the session idled
        (`end_idle`)."""
        loop = asyncio.get_running_loop()
        receiving = asyncio.ensure_future(self.ws.receive())
        try:
            while not receiving.done():
                if self.speaker.done():
                    await self.end_early()
                    return None
                if self.waiting.is_set():
                    left = self.idle_timeout_s - (loop.time() - self.idle_since)
                    if left <= 0:
                        await self.end_idle()
                        return None
                    await asyncio.wait({receiving, self.speaker}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                else:  # something is being spoken: no idle clock until the speaker waits for text again
                    waits = asyncio.ensure_future(self.waiting.wait())
                    await asyncio.wait({receiving, self.speaker, waits}, return_when=asyncio.FIRST_COMPLETED)
                    waits.cancel()
        finally:
            if not receiving.done():
                receiving.cancel()
        frame = receiving.result()
        if frame["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(frame.get("code", 1000))
        message = client_message(frame, self.text_mode)  # a malformed one raises: not activity
        if message.type != "input.text" or message.text.strip():
            # only a message that moves the session restarts the idle clock: empty text, sent every
            # few seconds, must not hold a paused request (and its slots) for ever
            self.idle_since = loop.time()
        return message

    async def end_idle(self) -> None:
        """The session sent nothing for its idle timeout while nothing was being spoken: say so and
        close it (`run` then stops what it held)."""
        logger.info("speech session %s: nothing sent for %g s while nothing was being spoken; closed",
                    self.request_id.shown, self.idle_timeout_s)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await _ws_error(self.ws, idle_timeout(self.idle_timeout_s))
                await self.ws.close(code=1008)

    async def end_early(self) -> None:
        """The speaker stopped before input.done's sentences were spoken: the client stopped
        reading (the session is closed), went away, or synthesis failed (logged, reported)."""
        error = self.speaker.exception() if not self.speaker.cancelled() else None
        if isinstance(error, _ClientStalled):
            logger.warning("speech session %s: the client took no audio for %g s; session ended",
                           self.request_id.shown, self.stall_s)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.ws.close(code=1008)
        elif error is not None and not isinstance(error, WebSocketDisconnect):
            logger.error("speech session %s failed", self.request_id.shown, exc_info=error)
            await _ws_error(self.ws, APIError(500, "speech synthesis failed", type="server_error"))
            with contextlib.suppress(Exception):
                await self.ws.close(code=1011)


async def _ws_error(ws: WebSocket, e: APIError, sentence_index: int | None = None) -> None:
    payload: dict[str, Any] = {"type": "error", **e.to_json()}
    if sentence_index is not None:
        payload["sentence_index"] = sentence_index
    with contextlib.suppress(Exception):
        await ws.send_json(payload)


