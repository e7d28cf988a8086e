"""One error shape for the speech routes, and an OpenAPI document that states the served
checkpoint's real constraints.

- `SpeechRoute` (the routes' `APIRoute` class) answers FastAPI's own refusals of a request (a
  JSON or multipart body that does not validate, one it cannot parse) and anything a route raises
  unexpectedly with `{"error": {"message", "type", "param", "code"}}`, `code` a string, as every
  other error of these routes. vLLM installs app-wide handlers for the same exceptions (integer
  `code`, pydantic's dicts in the message) after plugins attach; a route class is the one place
  that is ours alone.
- `install(app)` makes `/openapi.json` describe this server: the checkpoint's task type,
  languages and voices, what fits its model length (instructions), the input limit of its
  settings, and for every operation the error statuses it answers with their body and
  `Retry-After` header. The server refuses exactly what the document refuses, so a client
  generated from the document (or a fuzzer) never meets an undocumented 400.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..base.params import MAX_INPUT_CHARS, MAX_INSTRUCTIONS_CHARS
from .guard import MAX_REQUEST_ID_CHARS, REQUEST_ID_PATHS
from .schemas import OPENAI_VOICES, APIError, embedding_pattern, invalid_request

logger = logging.getLogger("vllm.qwen3tts.server")

SPEECH_PATH_PREFIXES = ("/v1/audio/", "/ready", "/health")
# Error statuses every speech/voices operation documents, with what they mean.
ERROR_STATUSES = {
    "400": "Invalid request: the message names the parameter and what it must be",
    "401": "Missing or invalid API key",
    "404": "Unknown model or voice, or no such saved voice",
    "409": "A voice of that name already exists",
    "413": "Request body or reference audio too large",
    "429": "Rate or concurrency limit of this API key (see Retry-After)",
    "500": "Internal error",
    "503": "At capacity or a dependency is restarting (see Retry-After)",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}
REQUEST_ID = {"X-Request-Id": {"description": "The request's X-Request-Id header where it sent one (1 to "
                               f"{MAX_REQUEST_ID_CHARS} printable ASCII characters, no spaces), else the id the server gave it (as its log lines)",
                               "required": True, "schema": {"type": "string"}}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=e.headers)


class SpeechRoute(APIRoute):
    """An `APIRoute` whose every refusal, including FastAPI's own, is an `APIError` body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return error_response(invalid_request(list(e.errors())))
            except APIError as e:  # raised by a dependency
                return error_response(e)
            except HTTPException as e:  # the body could not be parsed (multipart without a boundary, ...)
                message = e.detail if isinstance(e.detail, str) else "invalid request"
                return error_response(APIError(e.status_code, message[:200], code="invalid_body",
                                               headers=dict(e.headers or {})))
            except Exception:
                request_id = getattr(request.state, "request_id", None)
                logger.exception("%s %s failed (request %s)", request.method, request.url.path,
                                 getattr(request_id, "shown", "-"))
                return error_response(APIError(500, "internal error; the server log has the details",
                                               type="server_error", code="internal_error"))

        return handle


def install(app: FastAPI) -> None:
    """Make the app's OpenAPI document state this server's constraints (`describe_server`),
    once the speech service exists (the document is built at its first request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        describe_errors(schema)
        service = getattr(app.state, "qwen3tts", None)
        if service is None:  # not yet: the next request builds it again
            app.openapi_schema = None
            return schema
        describe_server(schema, service)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _our_operations(schema: dict[str, Any]):
    for path, item in schema.get("paths", {}).items():
        if path.startswith(SPEECH_PATH_PREFIXES):
            for method, operation in item.items():
                if isinstance(operation, dict) and "responses" in operation:
                    yield path, method, operation


def describe_errors(schema: dict[str, Any]) -> None:
    """Every speech/voices operation: its errors in our shape (FastAPI's 422 with `detail` is
    never sent: invalid input is a 400), `Retry-After` on 429 and 503."""
    for path, _, operation in _our_operations(schema):
        responses = operation["responses"]
        responses.pop("422", None)
        if path in ("/ready", "/health"):
            status = {"content": {"application/json": {"schema": {
                "type": "object", "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["status"]}}}}
            responses["200"] = {"description": "Ready" if path == "/ready" else "Healthy", **status}
            responses["503"] = {"description": "Not ready (why: reason)" if path == "/ready" else "Unhealthy",
                                **status, "headers": copy.deepcopy(RETRY_AFTER)}
            continue
        for status, description in ERROR_STATUSES.items():
            responses[status] = {"description": description, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            if status in ("429", "503"):
                responses[status]["headers"] = copy.deepcopy(RETRY_AFTER)
        if path.startswith(REQUEST_ID_PATHS):
            for response in responses.values():
                response.setdefault("headers", {}).update(copy.deepcopy(REQUEST_ID))
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # unless vLLM's own routes still use them
        if name in components and not _referenced(schema, name):
            del components[name]


def _referenced(schema: dict[str, Any], name: str) -> bool:
    ref = f"#/components/schemas/{name}"
    return ref in str(schema.get("paths", {})) or any(
        ref in str(v) for k, v in schema.get("components", {}).get("schemas", {}).items() if k != name)


def describe_server(schema: dict[str, Any], service: Any) -> None:
    """Narrow the request schemas to what this server's checkpoint and settings accept."""
    schemas = schema.get("components", {}).get("schemas", {})
    body = schemas.get("SpeechBody")
    if body is None:
        return
    cfg = service.config
    kind = cfg.tts_model_type
    props = body["properties"]
    from .service import TASK_TYPES  # (service imports this module)

    task_type = TASK_TYPES[kind]
    props["task_type"] = {"anyOf": [{"type": "string", "enum": [task_type]}, {"type": "null"}],
                          "description": f"This server's checkpoint is {task_type}; any other is refused"}
    props["language"] = {"anyOf": [{"type": "string", "pattern": case_insensitive_pattern(cfg.languages)},
                                   {"type": "null"}],
                         "description": f"One of {', '.join(cfg.languages)} (any case); auto if unset"}
    props["input"]["maxLength"] = input_limit(service)
    limit = instructions_limit(service.engine)
    props["instructions"] = {"anyOf": [{"type": "string", "maxLength": limit}, {"type": "null"}],
                             "description": "Style (CustomVoice 1.7B) or voice description (VoiceDesign); at most "
                             f"{limit} characters on this server (what fits its model length)" if limit else
                             "Not taken by this server's checkpoint (empty or null)"}
    if kind != "base":
        props["ref_audio"] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}],
                              "description": "Voice cloning needs a Base checkpoint: empty or null here"}
    if kind == "custom_voice":
        names = custom_voice_names(cfg)
        pattern = case_insensitive_pattern(names, allow_empty=True)
        props["voice"] = {"anyOf": [{"type": "string", "pattern": pattern}, {"$ref": "#/components/schemas/VoiceRef"},
                                    {"type": "null"}],
                          "description": f"A speaker of this checkpoint or an OpenAI voice name (any case): "
                          f"{', '.join(names)}; empty or unset: the default"}
        if "VoiceRef" in schemas:
            schemas["VoiceRef"]["properties"]["id"]["pattern"] = pattern
    cap = service.settings.max_frames_per_segment
    most = min(cap, service.engine.max_model_len) if cap else service.engine.max_model_len
    props["max_new_tokens"]["description"] = (
        f"At most this many frames (12.5 per second) per sentence; this server makes at most {most} "
        "(its frame limit, less the prompt's length) and caps larger values")
    for path, method, operation in _our_operations(schema):
        if path == "/v1/audio/voices" and method == "post":
            describe_voice_upload(schema, operation, cfg, task_type)


def describe_voice_upload(schema: dict[str, Any], operation: dict[str, Any], cfg: Any, task_type: str) -> None:
    """The upload form: exactly one of audio_sample and speaker_embedding, the embedding's size."""
    ref = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
    form = schema["components"]["schemas"].get(ref.get("$ref", "").rsplit("/", 1)[-1])
    if form is None:
        return
    form["oneOf"] = [{"required": ["audio_sample"]}, {"required": ["speaker_embedding"]}]
    size = cfg.talker.decoder.hidden_size
    embedding = form["properties"]["speaker_embedding"]
    text = next((b for b in embedding.get("anyOf", [embedding]) if b.get("type") == "string"), embedding)
    # a form field is text or absent: a null branch would let a client send the text "null"
    form["properties"]["speaker_embedding"] = {
        **text, "pattern": embedding_pattern(size),
        "description": f"Instead of audio: the speaker embedding (x-vector), a JSON list of {size} numbers"}
    audio = form["properties"]["audio_sample"]
    binary = next((b for b in audio.get("anyOf", [audio]) if b.get("type") == "string"), None)
    if binary is not None:  # a file part or none: a text part ("null") is no file
        form["properties"]["audio_sample"] = {**binary, "description": audio.get("description", "")}
    if cfg.tts_model_type != "base":
        operation["description"] = (f"This server's checkpoint ({task_type}) does not clone voices: a valid upload "
                                    "answers 404.")


def custom_voice_names(cfg: Any) -> list[str]:
    """Every `voice` a CustomVoice checkpoint takes: its speakers and the OpenAI names mapped to them."""
    return list(cfg.speakers) + [v for v, s in OPENAI_VOICES.items() if s in cfg.talker.spk_id]


def case_insensitive_pattern(names: list[str], allow_empty: bool = False) -> str:
    """A pattern matching exactly `names` in any ASCII case, in the syntax JSON Schema (ECMA 262),
    Python and pydantic share (no inline flags)."""
    def fold(name: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else ("\\" + c if c in ".-" else c) for c in name)

    alternatives = [fold(n) for n in names] + ([""] if allow_empty else [])
    return "^(?:" + "|".join(alternatives) + ")$"


def input_limit(service: Any) -> int:
    """Most characters of `input` this server takes."""
    return min(service.settings.max_input_chars, MAX_INPUT_CHARS)


# Prompt positions a character may take: the text tokenizer is byte-level BPE, so a character of
# 1-4 UTF-8 bytes is at most 4 tokens; the instructions' chat wrapper may take a few more.
POSITIONS_PER_CHAR = 4
INSTRUCTIONS_WRAPPER_SLACK = 8


@functools.cache
def instructions_limit(engine: Any) -> int:
    """Most characters of `instructions` that fit this engine's prompt with any one-character input
    (0 where the checkpoint takes none), at most MAX_INSTRUCTIONS_CHARS: longer ones could leave
    no room for audio, whatever the input."""
    from ..synthesis import MAX_PROMPT_POSITIONS
    from ..model.prompt import SpeechRequest, build_prompt

    cfg = engine.config
    if not cfg.supports_instruct:
        return 0
    speaker = cfg.speakers[0] if cfg.tts_model_type == "custom_voice" else None
    xvector = [0.0] * cfg.talker.decoder.hidden_size if cfg.tts_model_type == "base" else None
    base = max(len(build_prompt(cfg, engine.tokenizer, SpeechRequest(
        text="a", language=cfg.languages[-1], speaker=speaker, xvector=xvector, non_streaming_mode=ns)))
        for ns in (False, True))
    most = min(engine.max_model_len - 1, MAX_PROMPT_POSITIONS)
    free = most - base - (POSITIONS_PER_CHAR - 1) - INSTRUCTIONS_WRAPPER_SLACK
    return max(0, min(MAX_INSTRUCTIONS_CHARS, free // POSITIONS_PER_CHAR))


__all__ = ["SpeechRoute", "case_insensitive_pattern", "custom_voice_names", "describe_errors", "describe_server",
           "error_response", "input_limit", "install", "instructions_limit"]
