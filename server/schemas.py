"""Request and response bodies of the speech API, and OpenAI-style errors.

`SpeechBody` accepts OpenAI's `/v1/audio/speech` fields unchanged and the Qwen
extras (sent by the OpenAI SDK through `extra_body`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import ChunkSchedule

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
}


class VoiceRef(BaseModel):
    id: str


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- OpenAI
    model: str | None = Field(None, description="Served model name; optional")
    input: str = Field(..., description="Text to speak", max_length=100_000)
    voice: str | VoiceRef | None = Field(
        None, description="CustomVoice speaker, OpenAI voice name (mapped), or a saved cloned voice")
    instructions: str | None = Field(None, max_length=2000, description="Style (CustomVoice 1.7B) or voice description (VoiceDesign)")
    response_format: ResponseFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["sse", "audio"] | None = Field(
        None, description="Stream while generating: raw audio bytes or server-sent events. Unset: one complete file")
    # --- Qwen3-TTS extras
    stream: bool | None = Field(None, description="true: stream (as stream_format, default audio)")
    language: str | None = Field(None, description="Auto (default), Chinese, English, Japanese, Korean, German, ...")
    task_type: Literal["CustomVoice", "VoiceDesign", "Base"] | None = Field(
        None, description="Must match the served checkpoint if given")
    ref_audio: str | None = Field(None, description="Reference audio to clone: base64, data: URI, or http(s) URL (if enabled)")
    ref_text: str | None = Field(None, max_length=2000, description="Transcript of ref_audio (in-context cloning)")
    x_vector_only_mode: bool = Field(False, description="Clone from the speaker embedding only")
    non_streaming_mode: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    max_new_tokens: int | None = Field(None, ge=1, le=32768, description="At most this many frames (12.5 per second)")
    min_new_tokens: int | None = Field(
        None, ge=1, le=32768, description="At least this many frames: end-of-speech is suppressed until then "
        "(with max_new_tokens equal, a fixed length, e.g. for benchmarks)")
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_k: int | None = Field(None, ge=0, le=3072)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    subtalker_temperature: float | None = Field(None, ge=0.0, le=10.0)
    subtalker_top_k: int | None = Field(None, ge=0, le=2048)
    subtalker_top_p: float | None = Field(None, gt=0.0, le=1.0)
    initial_codec_chunk_frames: int | None = Field(
        None, ge=0, le=ChunkSchedule.largest, description="Streaming: frames (80 ms each) in the first audio "
        "chunk of each sentence; later chunks double up to 25 frames. 0 or unset: the server's choice by load "
        "(1 while at most 32 streams are being synthesized, else 2). Smaller comes sooner (one talker step per "
        "frame); vllm-omni's field of the same name")

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
