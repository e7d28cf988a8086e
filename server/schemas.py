"""Request and response bodies of the speech API, and OpenAI-style errors.

`SpeechBody` accepts OpenAI's `/v1/audio/speech` fields unchanged and the Qwen
extras (sent by the OpenAI SDK through `extra_body`). Its numeric limits are
`vllm_qwen3tts.base.params.BOUNDS`, which the engine checks too; `invalid_request` turns
pydantic's errors into the one error shape every route and the WebSocket answer with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from ..base.params import (BOUNDS, IDLE_TIMEOUT_S, INITIAL_CODEC_CHUNK_FRAMES, MAX_INPUT_CHARS, MIN_TEXT_TOKENS, MAX_INSTRUCTIONS_CHARS, MAX_NAME_CHARS,
                      MAX_NEW_TOKENS, MAX_REF_TEXT_CHARS, MIN_NEW_TOKENS, NOT_BLANK_PATTERN, REPETITION_PENALTY, SEED,
                      SPEED, SUBTALKER_TEMPERATURE, SUBTALKER_TOP_K, SUBTALKER_TOP_P, TEMPERATURE, TOP_K, TOP_P, Bound,
                      quoted)

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]

# OpenAI voice names -> CustomVoice preset speakers. Dialect speakers (eric: Sichuan,
# dylan: Beijing) are left out: they would turn Chinese input into dialect.
OPENAI_VOICES = {
    "alloy": "serena",
    "ash": "aiden",
    "ballad": "uncle_fu",
    "coral": "vivian",
    "echo": "ryan",
    "fable": "uncle_fu",
    "nova": "sohee",
    "onyx": "ryan",
    "sage": "ono_anna",
    "shimmer": "serena",
    "verse": "aiden",
    "marin": "vivian",  # female
    "cedar": "ryan",  # male
}


# A voice upload's speaker embedding: a JSON list of plain numbers (no booleans, no NaN or
# Infinity, at most 16 digits before the point and 2 of exponent: always a finite float).
_JSON_SPACE = "[ \\t\\n\\r]*"
_JSON_NUMBER = "-?(?:0|[1-9][0-9]{0,15})(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]{1,2})?"


def embedding_pattern(count: int | None = None) -> str:
    """The pattern of a JSON list of `count` numbers (None: one or more)."""
    more = "*" if count is None else "{%d}" % (count - 1)
    return (f"^\\[{_JSON_SPACE}{_JSON_NUMBER}(?:{_JSON_SPACE},{_JSON_SPACE}{_JSON_NUMBER}){more}"
            f"{_JSON_SPACE}\\]$")


EMBEDDING_PATTERN = embedding_pattern()


def _whole_number(value: Any) -> Any:
    """JSON Schema counts 19.0 as an integer, so the schema takes it as 19 (not 19.5, "19" or true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole_number(bound: Bound) -> Any:
    """The type of an integer parameter within `bound`: an int, or a float with nothing after the point."""
    return Annotated[int, Field(**bound.field), BeforeValidator(_whole_number)]


OWN_REASON = "must be "  # how this module's validators word a refusal (`invalid_request` quotes them)


def _unicode_text(value: Any) -> Any:
    """ValueError for a string holding a lone surrogate (JSON allows "\\ud800"; UTF-8 does not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(OWN_REASON + "valid Unicode text (no lone surrogates)") from None
    return value


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(..., max_length=MAX_NAME_CHARS, description="A voice name, as `voice` takes it")

    _unicode = field_validator("id")(_unicode_text)


class SpeechBody(BaseModel):
    """Strict: JSON types as the schema states them (no "1" for 1, no 1 for true)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # --- OpenAI
    model: str | None = Field(None, description="Served model name or an OpenAI TTS model name (an alias); optional")
    input: str = Field(..., min_length=1, max_length=MAX_INPUT_CHARS, pattern=NOT_BLANK_PATTERN,
                       description=f"Text to speak: 1 to {MAX_INPUT_CHARS} characters (the server may allow fewer), "
                       "not only whitespace (the pattern: at least one character that is not whitespace)")
    voice: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | VoiceRef | None = Field(
        None, description="CustomVoice speaker, OpenAI voice name (mapped), or a saved cloned voice (Base); the "
        "checkpoint's first OpenAI-mapped speaker if unset")
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS,
                                     description="Style (CustomVoice 1.7B) or voice description (VoiceDesign)")
    response_format: ResponseFormat = "mp3"
    speed: float = Field(1.0, **SPEED.field)
    stream_format: Literal["sse", "audio"] | None = Field(
        None, description="Stream while generating: raw audio bytes or server-sent events. Unset: one complete file")
    # --- Qwen3-TTS extras
    stream: bool | None = Field(None, description="true: stream (as stream_format, default audio)")
    language: str | None = Field(None, max_length=MAX_NAME_CHARS,
                                 description="Auto (default), Chinese, English, Japanese, Korean, German, ... "
                                 "(any case)")
    task_type: Literal["CustomVoice", "VoiceDesign", "Base"] | None = Field(
        None, description="Must match the served checkpoint if given")
    ref_audio: str | None = Field(None, description="Reference audio to clone (Base checkpoints): base64, "
                                  "data: URI, or http(s) URL (if enabled)")
    ref_text: str | None = Field(None, max_length=MAX_REF_TEXT_CHARS,
                                 description="Transcript of ref_audio (in-context cloning)")
    x_vector_only_mode: bool = Field(False, description="Clone from the speaker embedding only")
    non_streaming_mode: bool | None = None
    seed: whole_number(SEED) | None = Field(None)
    max_new_tokens: whole_number(MAX_NEW_TOKENS) | None = Field(
        None, description="At most this many frames (12.5 per second) per sentence; "
        "larger values are capped at the server's frame limit and at the model's room (its length less the "
        "prompt)")
    min_new_tokens: whole_number(MIN_NEW_TOKENS) | None = Field(
        None, description="At least this many frames: end-of-speech is suppressed until "
        "then (with max_new_tokens equal, a fixed length, e.g. for benchmarks); capped at the frames allowed")
    temperature: float | None = Field(None, **TEMPERATURE.field)
    top_k: whole_number(TOP_K) | None = Field(None, description="0: no top-k")
    top_p: float | None = Field(None, **TOP_P.field)
    repetition_penalty: float | None = Field(None, **REPETITION_PENALTY.field)
    subtalker_temperature: float | None = Field(None, **SUBTALKER_TEMPERATURE.field)
    subtalker_top_k: whole_number(SUBTALKER_TOP_K) | None = Field(None, description="0: no top-k")
    subtalker_top_p: float | None = Field(None, **SUBTALKER_TOP_P.field)
    initial_codec_chunk_frames: whole_number(INITIAL_CODEC_CHUNK_FRAMES) | None = Field(
        None, description="Streaming: frames (80 ms each) in the first audio "
        "chunk of each sentence; later chunks double up to 25 frames. 0 or unset: the server's choice by load "
        "(1 while at most 32 streams are being synthesized, else 2). Smaller comes sooner (one talker step per "
        "frame); vllm-omni's field of the same name")

    _unicode = field_validator("model", "input", "voice", "instructions", "language", "ref_audio", "ref_text")(
        _unicode_text)

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice

    @property
    def streaming(self) -> Literal["sse", "audio"] | None:
        if self.stream_format is not None:
            return self.stream_format
        return "audio" if self.stream else None


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        return self.body.model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------- invalid input

# What each parameter without a numeric bound must be (numeric ones: `params.BOUNDS`), for messages.
_BOOLEAN = "true or false"
RULES: dict[str, str] = {
    "model": "a string",
    "input": f"text of 1 to {MAX_INPUT_CHARS} characters, not only whitespace",
    "voice": f"a voice name of at most {MAX_NAME_CHARS} characters, or {{\"id\": name}}",
    "instructions": f"a string of at most {MAX_INSTRUCTIONS_CHARS} characters",
    "response_format": "one of mp3, opus, aac, flac, wav, pcm",
    "stream_format": "sse or audio",
    "stream": _BOOLEAN,
    "language": "a language name such as auto, English or Chinese",
    "task_type": "CustomVoice, VoiceDesign or Base",
    "ref_audio": "a string: base64 audio, a data: URI or a URL",
    "ref_text": f"a string of at most {MAX_REF_TEXT_CHARS} characters",
    "x_vector_only_mode": _BOOLEAN,
    "non_streaming_mode": _BOOLEAN,
    # the voice upload's form (POST /v1/audio/voices)
    "name": f"1 to {MAX_NAME_CHARS} letters, digits, '_', '.' or '-'",
    "audio_sample": "an audio file",
    "speaker_embedding": "a JSON list of numbers",
    "consent": f"a string of at most {MAX_REF_TEXT_CHARS} characters",
    "description": f"a string of at most {MAX_REF_TEXT_CHARS} characters",
}
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def invalid_request(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for pydantic's (or FastAPI's) validation `errors`: it names the first invalid
    parameter and what it must be, quotes at most a short prefix of the value, and says nothing
    of the code that found it."""
    if not errors:
        return bad_request("invalid request", code="invalid_request")
    error = errors[0]
    kind = str(error.get("type", ""))
    loc = list(error.get("loc") or ())
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    if kind == "json_invalid":
        return bad_request("the request body is not valid JSON", code="invalid_json")
    if not loc or not isinstance(loc[0], str):  # the body as a whole
        if kind == "missing":
            return bad_request("a request body is required", code="invalid_body")
        return bad_request("the request body must be a JSON object", code="invalid_body")
    param = loc[0]
    others = len({_param_of_loc(e.get("loc")) for e in errors} - {param})
    more = f" (and {others} more invalid parameter{'s' if others > 1 else ''})" if others else ""
    if kind == "extra_forbidden" and len(loc) == 1:
        return bad_request(f"unknown parameter {quoted(param)}{more}", param=param[:MAX_NAME_CHARS],
                           code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"{param} is required{more}", param=param, code="missing_parameter")
    if param == "voice" and isinstance(error.get("input"), dict):
        return bad_request(_voice_object_problem(errors) + more, param="voice", code="invalid_value")
    reason = str(error.get("ctx", {}).get("error", ""))
    if kind == "value_error" and reason.startswith(OWN_REASON):  # our validators' words, not a library's
        return bad_request(f"{param} {reason}{more}", param=param, code="invalid_value")
    rule = BOUNDS[param].describe() if param in BOUNDS else RULES.get(param, "valid")
    return bad_request(f"{param} must be {rule}, got {quoted(error.get('input'))}{more}", param=param,
                       code="invalid_value")


def _voice_object_problem(errors: list[dict[str, Any]]) -> str:
    """What is wrong with a `voice` sent as an object: `{"id": name}` is the one form taken."""
    for error in errors:
        loc = [part for part in _body_loc(error.get("loc")) if part != "VoiceRef"]
        if loc[:1] != ["voice"] or "VoiceRef" not in (error.get("loc") or ()):
            continue
        kind = error.get("type")
        if kind == "missing":
            return 'voice as an object must be {"id": name}: "id" is missing'
        if kind == "extra_forbidden" and len(loc) == 2:
            return f'voice as an object must be {{"id": name}}: unknown field {quoted(loc[1])}'
        if loc[1:] == ["id"]:
            reason = str(error.get("ctx", {}).get("error", ""))
            if kind == "value_error" and reason.startswith(OWN_REASON):
                return f"voice.id {reason}"
            return f"voice.id must be a voice name of at most {MAX_NAME_CHARS} characters, got {quoted(error.get('input'))}"
    return f"voice must be {RULES['voice']}"


def _body_loc(loc: Any) -> list[Any]:
    loc = list(loc or ())
    return loc[1:] if loc and loc[0] in _LOCATIONS else loc


def _param_of_loc(loc: Any) -> Any:
    loc = list(loc or ())
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    return loc[0] if loc else None


TEXT_MODES = ("token", "sentence")


@dataclass(frozen=True)
class SessionConfig:
    """A WebSocket session's configuration: its session.config message, checked."""

    template: SpeechBody  # the request of every utterance (sentence), but its input
    text_mode: str = "token"  # "token": a request per utterance, fed as its text arrives; "sentence": per sentence
    min_text_tokens: int = 0  # token mode: text tokens an utterance's request waits for before it starts
    idle_timeout_s: float | None = None  # None: the server's websocket_idle_timeout_s


def session_config(text: str | None, token_mode: bool = True) -> SessionConfig:
    """The WebSocket's first message, `{"type": "session.config", "text_mode": ..., "min_text_tokens":
    ..., "idle_timeout_s": ..., ...SpeechBody fields but input}`: the template of every utterance's
    request (the same 400s as HTTP otherwise), the text mode ("token", the default, or "sentence"),
    and the session's own settings, each a 400 naming it when out of its bounds. `token_mode`:
    whether this server speaks text as it arrives (`TTSEngine.supports_text_streaming`); where it
    does not, "sentence" is the default and "token" a 400."""
    try:
        message = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        message = None
    if not isinstance(message, dict) or message.get("type") != "session.config":
        raise bad_request('the first message must be a JSON object {"type": "session.config", ...}',
                          param="type", code="invalid_session_config")
    config = {k: v for k, v in message.items() if k != "type"}
    text_mode = config.pop("text_mode", "token" if token_mode else "sentence")
    if text_mode not in TEXT_MODES:
        raise bad_request(f"text_mode must be one of {', '.join(TEXT_MODES)}", param="text_mode", code="invalid_value")
    if text_mode == "token" and not token_mode:
        raise bad_request("text_mode token is not available on this server (GPUs, for now); use text_mode sentence",
                          param="text_mode", code="unsupported_value")
    own = {}
    for bound in (MIN_TEXT_TOKENS, IDLE_TIMEOUT_S):
        if bound.name in config:
            value = _whole_number(config.pop(bound.name)) if bound.kind is int else config.pop(bound.name)
            if not bound.contains(value):
                raise bad_request(f"{bound.name} must be {bound.describe()}, got {quoted(value)}", param=bound.name,
                                  code="invalid_value")
            own[bound.name] = value
    if text_mode == "sentence" and "min_text_tokens" in own:
        raise bad_request("min_text_tokens applies to text_mode token (sentence mode speaks whole sentences)",
                          param="min_text_tokens", code="invalid_value")
    if "input" in config:
        raise bad_request("input is not a session.config field: send the text in input.text messages",
                          param="input", code="unknown_parameter")
    try:
        body = SpeechBody.model_validate({**config, "input": "-"})
    except ValidationError as e:
        raise invalid_request(e.errors()) from None
    if text_mode == "token" and body.non_streaming_mode:
        raise bad_request("token mode speaks in streaming text mode: non_streaming_mode must be false",
                          param="non_streaming_mode")
    return SessionConfig(body, text_mode, **own)


# The messages a session takes after session.config, by text mode.
CLIENT_MESSAGES = {"token": ("input.text", "input.flush", "input.clear", "input.done"),
                   "sentence": ("input.text", "input.done")}


@dataclass(frozen=True)
class ClientMessage:
    """A message of the client after session.config: its type, and an input.text's text."""

    type: str
    text: str = ""


def client_message(frame: dict, text_mode: str) -> ClientMessage:
    """The client's message in `frame` (an ASGI `websocket.receive` message), or a 400 APIError
    saying what is wrong with it: not a JSON text frame, not an object, no or an unknown type,
    an input.text without a string text."""
    kinds = CLIENT_MESSAGES[text_mode]
    expected = f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    text = frame.get("text")
    if text is None:
        raise bad_request(f"messages are JSON text frames, not binary ones; expected {expected}", param="type",
                          code="invalid_message")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        message = None
    if not isinstance(message, dict):
        raise bad_request(f'a message must be a JSON object {{"type": ...}}; expected {expected}', param="type",
                          code="invalid_message")
    kind = message.get("type")
    if kind is None:
        raise bad_request(f"type is required: one of {expected}", param="type", code="missing_parameter")
    if kind not in kinds:
        raise bad_request(f"unknown message type {quoted(kind)}; expected {expected}"
                          + (" (session.config comes once, first)" if kind == "session.config" else ""),
                          param="type", code="unknown_message_type")
    if kind != "input.text":
        return ClientMessage(kind)
    if "text" not in message:
        raise bad_request("input.text needs its text: a string", param="text", code="missing_parameter")
    piece = message["text"]
    if not isinstance(piece, str):
        raise bad_request(f"text must be a string, got {quoted(piece)}", param="text", code="invalid_value")
    try:
        _unicode_text(piece)
    except ValueError as e:
        raise bad_request(f"text {e}", param="text", code="invalid_value") from None
    return ClientMessage(kind, piece)
