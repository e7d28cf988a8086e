"""The bounds of every numeric request parameter, in one place.

The HTTP schema (`server.schemas.SpeechBody`, and through it the OpenAPI document, SSE and the
WebSocket's session.config) takes its `Field` limits from here, and the engine
(`TTSEngine.resolve_params`, `SubtalkerParams.validate`) checks the same limits for callers of the
Python API, so a value one side accepts the other accepts too, and every refusal names the
parameter and its range the same way.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


class PromptError(ValueError):
    """The request cannot be expressed for this checkpoint (bad voice, language, mode...)."""


# What a message may quote of a caller's value: enough to recognise it, never megabytes.
QUOTE_CHARS = 64


class ParamError(PromptError):
    """A request parameter outside its bounds; `param` names it (the HTTP name)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLong(ParamError):
    """The prompt leaves the model no position for a frame: `positions` needed, `most` possible."""

    def __init__(self, message: str, positions: int, most: int):
        super().__init__(message, param="input")
        self.positions = positions
        self.most = most


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr` of a caller's value for an error message, cut to `limit` characters."""
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, (dict, list, tuple, set)):
        noun = "an object" if isinstance(value, dict) else "a list"
        return f"{noun} of {len(value)} item{'' if len(value) == 1 else 's'}"
    try:
        text = repr(value[: limit + 1] if isinstance(value, str) else value)
    except Exception:  # noqa: BLE001 - e.g. an int too large to print
        return "a number" if isinstance(value, int) else "a value"
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Bound:
    """A closed (or, with `lo_open`, left-open) range of an int or float parameter."""

    name: str  # the request parameter (HTTP, WebSocket)
    kind: type  # int or float
    lo: float
    hi: float
    lo_open: bool = False
    engine_name: str | None = None  # the `SynthesisParams` field, where it is named otherwise

    @property
    def field(self) -> dict[str, float]:
        """pydantic `Field` keyword arguments stating this range."""
        return {"gt" if self.lo_open else "ge": self.lo, "le": self.hi}

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    def check(self, value: Any, name: str | None = None) -> None:
        """ParamError naming the parameter (`name`, default the request's) unless `value` is in range."""
        if not self.contains(value):
            raise ParamError(f"{name or self.name} must be {self.describe()}, got {quoted(value)}", param=self.name)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


TALKER_VOCAB = 3072  # codebook 0 plus the talker's control ids: top_k beyond it changes nothing
CODEBOOK_SIZE = 2048  # codebooks 1..15
MAX_FRAMES = 32768  # the talker's position table; the model's room (max_model_len - prompt) caps lower
LARGEST_CHUNK_FRAMES = 25  # ChunkSchedule.largest

TEMPERATURE = Bound("temperature", float, 0.0, 2.0)  # vLLM's own limit for codebook 0
TOP_K = Bound("top_k", int, 0, TALKER_VOCAB)  # 0: no top-k
TOP_P = Bound("top_p", float, 0.0, 1.0, lo_open=True)
# A penalty near 0 multiplies logits towards infinity (NaN probabilities); beyond 10 nothing repeats.
REPETITION_PENALTY = Bound("repetition_penalty", float, 0.01, 10.0)
SUBTALKER_TEMPERATURE = Bound("subtalker_temperature", float, 0.0, 2.0)
SUBTALKER_TOP_K = Bound("subtalker_top_k", int, 0, CODEBOOK_SIZE)
SUBTALKER_TOP_P = Bound("subtalker_top_p", float, 0.0, 1.0, lo_open=True)
MAX_NEW_TOKENS = Bound("max_new_tokens", int, 1, MAX_FRAMES, engine_name="max_frames")
MIN_NEW_TOKENS = Bound("min_new_tokens", int, 1, MAX_FRAMES, engine_name="min_frames")
SEED = Bound("seed", int, 0, 2**53 - 1)  # exact as a JSON number everywhere (a double)
SPEED = Bound("speed", float, 0.25, 4.0)
INITIAL_CODEC_CHUNK_FRAMES = Bound("initial_codec_chunk_frames", int, 0, LARGEST_CHUNK_FRAMES)
# The WebSocket's session.config only (not fields of a speech request):
MIN_TEXT_TOKENS = Bound("min_text_tokens", int, 0, 64)  # token mode: text tokens buffered before a request starts
IDLE_TIMEOUT_S = Bound("idle_timeout_s", float, 0.0, 86_400.0, lo_open=True)  # the server's setting caps it lower

# Every bound, by request parameter name.
BOUNDS: dict[str, Bound] = {b.name: b for b in (
    TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY, SUBTALKER_TEMPERATURE, SUBTALKER_TOP_K, SUBTALKER_TOP_P,
    MAX_NEW_TOKENS, MIN_NEW_TOKENS, SEED, SPEED, INITIAL_CODEC_CHUNK_FRAMES,
)}

# Text lengths, in characters.
MAX_INPUT_CHARS = 20_000  # per request (the server's QWEN3TTS_MAX_INPUT_CHARS may lower it)
MAX_INSTRUCTIONS_CHARS = 2_000  # a server whose model length is shorter states less (its OpenAPI document)
MAX_REF_TEXT_CHARS = 2_000
MAX_DESCRIPTION_CHARS = 2_000  # a saved voice's description
MAX_CONSENT_CHARS = 2_000  # a saved voice's consent record
MAX_NAME_CHARS = 64  # voice names, and any name quoted back in a message
MAX_EMBEDDING_CHARS = 200_000  # a saved voice's speaker embedding as JSON text (thousands of numbers)

# Python's str.isspace() characters, spelt out so that JSON Schema, pydantic (Rust regex) and Python's
# `re` agree on them (their `\s` differ: U+001C..U+001F, U+0085, U+FEFF).
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
              "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# Text with something to speak: at least one character that is not whitespace (search, not match).
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(c):04x}" for c in WHITESPACE) + "]"


def is_blank(text: str) -> bool:
    """True when `text` is empty or only whitespace (the complement of `NOT_BLANK_PATTERN`)."""
    return not text.strip(WHITESPACE)


__all__ = ["BOUNDS", "Bound", "ParamError", "PromptTooLong", "QUOTE_CHARS", "is_blank", "quoted"] + [
    "TEMPERATURE", "TOP_K", "TOP_P", "REPETITION_PENALTY", "SUBTALKER_TEMPERATURE", "SUBTALKER_TOP_K",
    "SUBTALKER_TOP_P", "MAX_NEW_TOKENS", "MIN_NEW_TOKENS", "SEED", "SPEED", "INITIAL_CODEC_CHUNK_FRAMES",
    "MAX_INPUT_CHARS", "MAX_INSTRUCTIONS_CHARS", "MAX_REF_TEXT_CHARS", "MAX_DESCRIPTION_CHARS",
    "MAX_CONSENT_CHARS", "MAX_EMBEDDING_CHARS", "MAX_NAME_CHARS", "NOT_BLANK_PATTERN", "WHITESPACE"]
