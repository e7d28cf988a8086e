"""HTTP and WebSocket routes of the speech API.

POST   /v1/audio/speech          OpenAI's speech endpoint (+ Qwen extras); whole file, raw audio stream or SSE
WS     /v1/audio/speech/stream   text in incrementally, audio out per sentence
GET    /v1/audio/voices          built-in speakers and this key's saved voices
POST   /v1/audio/voices          save a cloned voice (multipart: audio_sample + ref_text, or speaker_embedding)
DELETE /v1/audio/voices/{name}   delete a saved voice
GET    /ready                    200 once warmed up
GET    /health                   200 while the codec worker lives
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import SAMPLE_RATE
from .audio_output import StreamingEncoder, content_type, encode_audio
from .schemas import APIError, ErrorBody, SpeechBody, Usage, bad_request
from .service import SpeechJob, SpeechService
from .text_split import IncrementalSplitter
from .voices import (InvalidVoiceName, InvalidVoiceProfile, VoiceExists, VoiceMetadata, VoiceNotFound,
                     VoiceQuotaExceeded)

router = APIRouter()

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


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=e.headers)


def usage_of(job: SpeechJob) -> Usage:
    return Usage(input_tokens=job.input_tokens, output_tokens=job.frames, total_tokens=job.input_tokens + job.frames)


# ---------------------------------------------------------------------------------- speech


@router.post("/v1/audio/speech", responses={**AUDIO_RESPONSE, **ERROR_RESPONSES}, response_class=Response)
async def create_speech(body: SpeechBody, request: Request) -> Response:
    received = getattr(request.state, "arrival", None) or time.perf_counter()  # plugin.ArrivalTime
    try:
        svc = service_of(request)
        tenant = svc.authenticate(request.headers.get("authorization"))
        stack = contextlib.AsyncExitStack()
        ticket = await stack.enter_async_context(svc.admit(tenant, "speech"))
        try:
            job = await svc.prepare(body, tenant, ticket.priority, received=received)
        except BaseException:
            await stack.aclose()
            raise
    except APIError as e:
        if e.status < 429 and "svc" in locals() and "tenant" in locals():
            svc.metrics.requests.labels(tenant.name, "speech", str(e.status)).inc()
        return error_response(e)

    request_id = f"speech-{uuid.uuid4().hex[:12]}"
    if body.streaming is None:
        async with stack:
            try:
                pcm = await _collect_unless_disconnected(svc, job, request_id, request)
            except asyncio.CancelledError:
                svc.metrics.requests.labels(tenant.name, "speech", "499").inc()
                raise
            data = encode_audio(pcm, body.response_format, SAMPLE_RATE)
        svc.metrics.requests.labels(tenant.name, "speech", "200").inc()
        return Response(data, media_type=content_type(body.response_format), headers=_usage_headers(job, pcm.size))

    generator = _sse_events(svc, job, request_id, body) if body.streaming == "sse" else _audio_bytes(svc, job, request_id, body)
    media = "text/event-stream" if body.streaming == "sse" else content_type(body.response_format)
    return StreamingResponse(_holding(stack, generator, svc, tenant), media_type=media,
                             headers={"X-Input-Tokens": str(job.input_tokens), "Cache-Control": "no-cache"})


async def _holding(stack: contextlib.AsyncExitStack, generator, svc: SpeechService, tenant):
    """Stream `generator` while holding the admission ticket; a disconnect cancels both."""
    status = "200"
    try:
        async with stack:
            async for piece in generator:
                yield piece
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    except Exception:
        status = "500"
        raise
    finally:
        svc.metrics.requests.labels(tenant.name, "speech", status).inc()


async def _collect_unless_disconnected(svc: SpeechService, job: SpeechJob, request_id: str, request: Request) -> np.ndarray:
    async def collect() -> np.ndarray:
        pieces = [pcm async for pcm in svc.pcm_stream(job, request_id)]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    task = asyncio.create_task(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _usage_headers(job: SpeechJob, samples: int) -> dict[str, str]:
    return {
        "X-Input-Tokens": str(job.input_tokens),
        "X-Output-Tokens": str(job.frames),
        "X-Audio-Duration": f"{samples / SAMPLE_RATE:.3f}",
        "X-Finish-Reason": job.finish_reason,
    }


async def _audio_bytes(svc: SpeechService, job: SpeechJob, request_id: str, body: SpeechBody):
    encoder = StreamingEncoder(body.response_format, SAMPLE_RATE)
    async for pcm in svc.pcm_stream(job, request_id):
        data = encoder.write(pcm)
        if data:
            yield data
    tail = encoder.finish()
    if tail:
        yield tail


async def _sse_events(svc: SpeechService, job: SpeechJob, request_id: str, body: SpeechBody):
    def event(kind: str, payload: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

    encoder = StreamingEncoder(body.response_format, SAMPLE_RATE)
    try:
        async for pcm in svc.pcm_stream(job, request_id):
            data = encoder.write(pcm)
            if data:
                yield event("speech.audio.delta", {"audio": base64.b64encode(data).decode(),
                                                   "response_format": body.response_format})
        tail = encoder.finish()
        if tail:
            yield event("speech.audio.delta", {"audio": base64.b64encode(tail).decode(),
                                               "response_format": body.response_format})
        yield event("speech.audio.done", {"usage": usage_of(job).model_dump(), "finish_reason": job.finish_reason})
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        yield event("speech.audio.error", {"error": {"message": str(e), "type": "server_error"}})


# ---------------------------------------------------------------------------------- voices


@router.get("/v1/audio/voices", responses=ERROR_RESPONSES)
async def list_voices(request: Request) -> JSONResponse:
    try:
        svc = service_of(request)
        tenant = svc.authenticate(request.headers.get("authorization"))
    except APIError as e:
        return error_response(e)
    saved = svc.voices.list(tenant.id)
    return JSONResponse({"voices": svc.available_voice_names(tenant),
                         "uploaded_voices": [v.to_public_dict() for v in saved]})


@router.post("/v1/audio/voices", responses=ERROR_RESPONSES)
async def create_voice(
    request: Request,
    name: str = Form(...),
    audio_sample: UploadFile | None = File(None),
    ref_text: str | None = Form(None),
    speaker_embedding: str | None = Form(None, description="JSON list of floats (x-vector) instead of audio"),
    consent: str | None = Form(None),
    description: str | None = Form(None),
) -> JSONResponse:
    from ..engine import VoiceProfile

    try:
        svc = service_of(request)
        tenant = svc.authenticate(request.headers.get("authorization"))
        if svc.config.tts_model_type != "base":
            raise bad_request("saved voices are cloned voices; this checkpoint is not a Base model",
                              code="unsupported_task_type")
        if name.lower() in {n.lower() for n in svc.config.speakers}:
            raise bad_request(f"{name!r} is a built-in speaker name", param="name")
        if (audio_sample is None) == (speaker_embedding is None):
            raise bad_request("send exactly one of audio_sample or speaker_embedding", param="audio_sample")
        extra: dict[str, Any] = {}
        seconds = None
        if audio_sample is not None:
            audio = await audio_sample.read(svc.settings.max_ref_audio_bytes + 1)
            if len(audio) > svc.settings.max_ref_audio_bytes:
                raise APIError(413, f"audio_sample exceeds {svc.settings.max_ref_audio_bytes} bytes",
                               param="audio_sample", code="ref_audio_too_large")
            profile = await svc.clone(audio, ref_text, x_vector_only=not (ref_text or "").strip())
            extra = {"mime_type": audio_sample.content_type, "file_size": len(audio)}
            if profile.ref_codes:
                seconds = len(profile.ref_codes) / 12.5
        else:
            try:
                xvector = [float(v) for v in json.loads(speaker_embedding)]
            except (ValueError, TypeError) as e:
                raise bad_request("speaker_embedding must be a JSON list of numbers", param="speaker_embedding") from e
            hidden = svc.config.talker.decoder.hidden_size
            if len(xvector) != hidden or not all(np.isfinite(xvector)):
                raise bad_request(f"speaker_embedding must hold {hidden} finite numbers", param="speaker_embedding")
            profile = VoiceProfile(xvector=xvector)
        metadata = VoiceMetadata(consent=consent, description=description, source_audio_seconds=seconds,
                                 model=str(svc.engine.model_dir), extra=extra)
        voice = await asyncio.to_thread(svc.voices.create, tenant.id, name, profile, metadata)
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
    return JSONResponse(voice.to_public_dict(), status_code=201)


@router.delete("/v1/audio/voices/{name}", responses=ERROR_RESPONSES)
async def delete_voice(name: str, request: Request) -> JSONResponse:
    try:
        svc = service_of(request)
        tenant = svc.authenticate(request.headers.get("authorization"))
        await asyncio.to_thread(svc.voices.delete, tenant.id, name)
    except APIError as e:
        return error_response(e)
    except VoiceNotFound:
        return error_response(APIError(404, f"no saved voice named {name!r}", param="name", code="voice_not_found"))
    return JSONResponse({"name": name, "deleted": True})


# ---------------------------------------------------------------------------------- health


@router.get("/ready", responses={503: {"model": ErrorBody}})
async def ready(request: Request) -> JSONResponse:
    svc = getattr(request.app.state, "qwen3tts", None)
    if svc is None or not svc.ready:
        return JSONResponse({"status": "warming_up"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/health", responses={503: {"model": ErrorBody}})
async def health(request: Request) -> JSONResponse:
    svc = getattr(request.app.state, "qwen3tts", None)
    if svc is None or not svc.healthy():
        return JSONResponse({"status": "unhealthy"}, status_code=503)
    return JSONResponse({"status": "ok"})


# ---------------------------------------------------------------------------------- websocket


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(ws: WebSocket) -> None:
    """Incremental text in, audio out per sentence (message schema: README, WebSocket)."""
    await ws.accept()
    try:
        svc = service_of(ws)
        key = ws.headers.get("authorization") or (
            f"Bearer {ws.query_params['api_key']}" if "api_key" in ws.query_params else None)
        tenant = svc.authenticate(key)
        first = await ws.receive_json()
        if first.get("type") != "session.config":
            raise bad_request("the first message must be {\"type\": \"session.config\", ...}")
        config = {k: v for k, v in first.items() if k != "type"}
        template = SpeechBody(input="-", **config)
    except APIError as e:
        await _ws_error(ws, e)
        await ws.close(code=1008)
        return
    except WebSocketDisconnect:
        return
    except Exception as e:  # invalid JSON / config fields
        await _ws_error(ws, bad_request(f"invalid session.config: {e}"))
        await ws.close(code=1008)
        return

    await ws.send_json({"type": "session.created", "response_format": template.response_format,
                        "sample_rate": SAMPLE_RATE})
    splitter = IncrementalSplitter(max_chars=svc.settings.max_segment_chars)
    sentences: asyncio.Queue[str | None] = asyncio.Queue()
    totals = {"input_tokens": 0, "output_tokens": 0, "sentences": 0}

    async def speak() -> None:
        index = 0
        while (text := await sentences.get()) is not None:
            body = template.model_copy(update={"input": text, "stream_format": None, "stream": None})
            try:
                async with svc.admit(tenant, "websocket") as ticket:
                    job = await svc.prepare(body, tenant, ticket.priority, split=False)
                    await ws.send_json({"type": "audio.start", "sentence_index": index, "text": text})
                    encoder = StreamingEncoder(template.response_format, SAMPLE_RATE)
                    samples = 0
                    async for pcm in svc.pcm_stream(job, f"ws-{uuid.uuid4().hex[:8]}-{index}"):
                        samples += pcm.size
                        data = encoder.write(pcm)
                        if data:
                            await ws.send_bytes(data)
                    tail = encoder.finish()
                    if tail:
                        await ws.send_bytes(tail)
                    totals["input_tokens"] += job.input_tokens
                    totals["output_tokens"] += job.frames
                    await ws.send_json({"type": "audio.done", "sentence_index": index,
                                        "audio_seconds": round(samples / SAMPLE_RATE, 3)})
            except APIError as e:
                await _ws_error(ws, e, sentence_index=index)
            index += 1
            totals["sentences"] = index

    speaker = asyncio.create_task(speak())
    received = 0
    try:
        while True:
            message = await ws.receive_json()
            kind = message.get("type")
            if kind == "input.text":
                text = str(message.get("text", ""))
                received += len(text)
                if received > svc.settings.max_input_chars:
                    await _ws_error(ws, bad_request(f"a session may send at most {svc.settings.max_input_chars} "
                                                    "characters", code="input_too_long"))
                    await ws.close(code=1009)
                    return
                for sentence in splitter.feed(text):
                    await sentences.put(sentence)
            elif kind == "input.done":
                for sentence in splitter.flush():
                    await sentences.put(sentence)
                await sentences.put(None)
                await speaker
                await ws.send_json({"type": "session.done", "usage": {
                    **totals, "total_tokens": totals["input_tokens"] + totals["output_tokens"]}})
                await ws.close()
                return
            else:
                await _ws_error(ws, bad_request(f"unknown message type {kind!r}; expected input.text or input.done"))
    except WebSocketDisconnect:
        pass
    except Exception as e:
        with contextlib.suppress(Exception):
            await _ws_error(ws, bad_request(f"invalid message: {e}"))
            await ws.close(code=1003)
    finally:
        if not speaker.done():
            speaker.cancel()  # the client left: abort generation and free codec state
            with contextlib.suppress(BaseException):
                await speaker


async def _ws_error(ws: WebSocket, e: APIError, sentence_index: int | None = None) -> None:
    payload: dict[str, Any] = {"type": "error", **e.to_json()}
    if sentence_index is not None:
        payload["sentence_index"] = sentence_index
    with contextlib.suppress(Exception):
        await ws.send_json(payload)


