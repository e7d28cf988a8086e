"""One set of bounds for every numeric request parameter (`vllm_qwen3tts.base.params.BOUNDS`): the HTTP
schema states exactly those (walked here through its JSON Schema, which is also what the OpenAPI
document, SSE and the WebSocket's session.config validate against), and the engine checks exactly
those, with no limit of its own. No checkpoint and no server: `tests/test_server_validation.py`
sends the values at and beyond each bound through both sides."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from vllm_qwen3tts.synthesis import ENGINE_BOUNDS, ChunkSchedule, SynthesisParams
from vllm_qwen3tts.base.params import BOUNDS, Bound, ParamError
from vllm_qwen3tts.server import speed
from vllm_qwen3tts.server.schemas import SpeechBody
from vllm_qwen3tts.talker.protocol import SubtalkerParams

# Request parameters the server applies itself rather than the engine: the time stretch, and the
# first chunk (the engine takes it as `SynthesisRequest.first_chunk_frames`, 0 meaning unset).
SERVER_ONLY = {"speed", "initial_codec_chunk_frames"}


def numeric_schema(prop: dict) -> dict | None:
    """The integer / number alternative of a JSON Schema property (None if it has none)."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") in ("integer", "number"):
            return option
    return None


def schema_limits(bound: Bound) -> dict:
    """What the JSON Schema of a parameter within `bound` states."""
    return {"type": "integer" if bound.kind is int else "number",
            "exclusiveMinimum" if bound.lo_open else "minimum": bound.lo, "maximum": bound.hi}


def test_every_numeric_field_of_the_schema_states_exactly_its_bound():
    properties = SpeechBody.model_json_schema()["properties"]
    numeric = {name: numeric_schema(prop) for name, prop in properties.items() if numeric_schema(prop)}
    assert set(numeric) == set(BOUNDS), "a numeric request parameter without a bound, or a bound the schema lacks"
    for name, stated in numeric.items():
        limits = {k: v for k, v in stated.items() if k in ("type", "minimum", "exclusiveMinimum", "maximum")}
        assert limits == schema_limits(BOUNDS[name]), name


def test_the_engine_checks_the_same_bound_objects_and_every_sampling_field():
    for bound in ENGINE_BOUNDS:
        assert BOUNDS[bound.name] is bound, f"the engine checks a {bound.name} bound of its own"
    assert {b.name for b in ENGINE_BOUNDS} == set(BOUNDS) - SERVER_ONLY
    hints = typing.get_type_hints(SynthesisParams)
    numeric = {f.name for f in dataclasses.fields(SynthesisParams)
               if set(typing.get_args(hints[f.name]) or (hints[f.name],)) & {int, float}}
    assert {b.engine_name or b.name for b in ENGINE_BOUNDS} == numeric


def test_the_server_only_parameters_end_where_their_bounds_do():
    assert (speed.MIN_SPEED, speed.MAX_SPEED) == (BOUNDS["speed"].lo, BOUNDS["speed"].hi)
    speed.check_speed(BOUNDS["speed"].hi)
    with pytest.raises(ValueError):
        speed.check_speed(math.nextafter(BOUNDS["speed"].hi, math.inf))
    largest = BOUNDS["initial_codec_chunk_frames"].hi
    assert ChunkSchedule().largest == largest
    ChunkSchedule().starting_at(largest)
    with pytest.raises(ValueError):
        ChunkSchedule().starting_at(largest + 1)


@pytest.mark.parametrize("field, name", [("temperature", "subtalker_temperature"), ("top_k", "subtalker_top_k"),
                                         ("top_p", "subtalker_top_p")])
def test_the_talker_request_checks_the_code_predictor_bounds(field, name):
    """`SubtalkerParams.validate` (what travels to the talker worker) refuses exactly beyond them."""
    bound = BOUNDS[name]
    lo = math.nextafter(bound.lo, math.inf) if bound.lo_open else bound.lo
    for value in (lo, bound.hi):
        SubtalkerParams(**{field: value}).validate()
    beyond_hi = bound.hi + 1 if bound.kind is int else math.nextafter(bound.hi, math.inf)
    beyond_lo = bound.lo if bound.lo_open else (bound.lo - 1 if bound.kind is int else math.nextafter(bound.lo, -math.inf))
    for value in (beyond_lo, beyond_hi):
        with pytest.raises(ParamError) as refused:
            SubtalkerParams(**{field: value}).validate()
        assert refused.value.param == name and bound.describe() in str(refused.value)


GENERATION_CONFIGS = [
    {},  # none given: the official hard defaults
    {"do_sample": True, "temperature": 0.7, "top_k": 30, "top_p": 0.8, "repetition_penalty": 1.2,
     "subtalker_dosample": True, "subtalker_temperature": 0.6, "subtalker_top_k": 20, "subtalker_top_p": 0.9,
     "max_new_tokens": 500},
    {"do_sample": False, "subtalker_dosample": True, "subtalker_temperature": 0.5},  # greedy code 0 only
    {"do_sample": True, "subtalker_dosample": False, "temperature": 1.1},  # greedy code predictor only
]


@pytest.mark.parametrize("generation", GENERATION_CONFIGS)
def test_generation_config_defaults_apply_as_the_official_code_applies_them(generation):
    """What a request that names no sampling parameter gets from a checkpoint's
    generation_config.json is what the official code's merge gives (`do_sample: false` is a
    temperature of 0 here); a value the request names wins in both."""
    from types import SimpleNamespace

    from oracle import qwen_tts

    qwen_tts()  # the official package, importable without its 25 Hz tokenizer's dependencies
    from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel

    from vllm_qwen3tts.base.config import GenerationDefaults
    from vllm_qwen3tts.synthesis import sampling_with_defaults

    def official(**given):
        return Qwen3TTSModel._merge_generate_kwargs(SimpleNamespace(generate_defaults=generation), **given)

    def ours(**given):
        code0, sub, frames = sampling_with_defaults(SynthesisParams(**given), GenerationDefaults.from_dict(generation))
        return code0, sub, frames

    o = official()
    code0, sub, frames = ours()
    assert code0.temperature == (o["temperature"] if o["do_sample"] else 0.0)
    assert (code0.top_k, code0.top_p, code0.repetition_penalty) == (o["top_k"], o["top_p"], o["repetition_penalty"])
    assert sub.temperature == (o["subtalker_temperature"] if o["subtalker_dosample"] else 0.0)
    assert (sub.top_k, sub.top_p) == (o["subtalker_top_k"], o["subtalker_top_p"])
    assert frames == o["max_new_tokens"] - 1  # the official count includes its final, unexpanded sample
    o = official(top_k=7, subtalker_top_p=0.5, max_new_tokens=40)
    code0, sub, frames = ours(top_k=7, subtalker_top_p=0.5, max_frames=39)
    assert (code0.top_k, sub.top_p, frames) == (o["top_k"], o["subtalker_top_p"], o["max_new_tokens"] - 1)


def test_a_server_without_text_streaming_defaults_the_websocket_to_sentences_and_refuses_token_mode():
    """Where `TTSEngine.supports_text_streaming` is False (GPUs, for now), a session that names no
    text mode gets sentence mode, and one that asks for token mode a 400 naming text_mode."""
    from vllm_qwen3tts.server.schemas import APIError, session_config

    assert session_config('{"type": "session.config"}', token_mode=False).text_mode == "sentence"
    assert session_config('{"type": "session.config"}', token_mode=True).text_mode == "token"
    with pytest.raises(APIError) as refused:
        session_config('{"type": "session.config", "text_mode": "token"}', token_mode=False)
    assert refused.value.status == 400 and refused.value.body.error.param == "text_mode"
