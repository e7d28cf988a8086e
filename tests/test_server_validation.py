"""One validation: every request parameter has one set of bounds (`vllm_qwen3tts.base.params`), which the
HTTP schema, SSE, the WebSocket's session.config and the Python API (`TTSEngine.resolve_params`) all
apply. Every refusal is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a string
code and the right status; its message names the parameter and what it must be, quotes at most a
short prefix of the value, and says nothing of the code that found it.

The first tests need no server; the rest call the shared `speech_server` (a CustomVoice 1.7B
checkpoint, `--max-model-len 512`, `--max-frames 40`)."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import websockets
from pydantic import ValidationError

from vllm_qwen3tts.engine import SynthesisParams, SynthesisRequest, TTSEngine
from vllm_qwen3tts.base.params import BOUNDS, QUOTE_CHARS, ParamError, PromptTooLong
from vllm_qwen3tts.server.schemas import EMBEDDING_PATTERN, APIError, SpeechBody, invalid_request, session_config
from vllm_qwen3tts.server.service import decode_inline_audio

# What a message must never show: Python's own words for its failures, pydantic's error dicts.
INTERNALS = ("object has no attribute", "got multiple values", "Traceback", "SpeechBody(", "pydantic",
             "{'type'", "list index", "KeyError", "NoneType", "errors.pydantic.dev")


def assert_clean_error(error: dict, param: str | None = None) -> None:
    """An error object of our shape, naming `param`, short and free of internals."""
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str), error
    assert not any(word in error["message"] for word in INTERNALS), error["message"]
    assert len(error["message"]) < 600, len(error["message"])
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"], error["message"]


# ---------------------------------------------------------------------------------- no server


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    # resolve_params and prepare need neither vLLM nor the codec worker
    return TTSEngine(engine_client=None, codec=None, model_dir=tiny_checkpoint("1.7b-custom_voice"), max_model_len=512)


def inside_and_beyond(bound) -> tuple[list, list]:
    """Values at the ends of a bound's range, and the nearest ones just outside it."""
    if bound.kind is int:
        return [bound.lo, bound.hi], [bound.lo - 1, bound.hi + 1]
    lo_in = math.nextafter(bound.lo, math.inf) if bound.lo_open else bound.lo
    lo_out = bound.lo if bound.lo_open else math.nextafter(bound.lo, -math.inf)
    return [lo_in, bound.hi], [lo_out, math.nextafter(bound.hi, math.inf)]


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_the_schema_and_the_python_api_accept_each_bound_and_refuse_just_beyond_it(engine, name):
    bound = BOUNDS[name]
    inside, beyond = inside_and_beyond(bound)
    for value in inside:
        SpeechBody.model_validate({"input": "Hi.", name: value})
    for value in beyond:
        with pytest.raises(ValidationError) as refused:
            SpeechBody.model_validate({"input": "Hi.", name: value})
        error = invalid_request(refused.value.errors()).to_json()["error"]
        assert_clean_error(error, name)
        assert bound.describe() in error["message"]
    if name in ("speed", "initial_codec_chunk_frames"):
        return  # server-side only: the time stretch, and the HTTP spelling of first_chunk_frames (0: unset)
    field = bound.engine_name or name
    for value in inside:
        engine.resolve_params(SynthesisParams(**{field: value}))
    for value in beyond:
        with pytest.raises(ParamError) as refused:
            engine.resolve_params(SynthesisParams(**{field: value}))
        assert refused.value.param == name and field in str(refused.value) and bound.describe() in str(refused.value)


def test_the_python_api_checks_the_first_chunk_as_the_schema_does(engine):
    largest = BOUNDS["initial_codec_chunk_frames"].hi
    engine.prepare(SynthesisRequest("Hi.", speaker="ryan", first_chunk_frames=largest))
    with pytest.raises(ParamError) as refused:
        engine.prepare(SynthesisRequest("Hi.", speaker="ryan", first_chunk_frames=largest + 1))
    assert refused.value.param == "initial_codec_chunk_frames"


def test_one_frame_is_a_request_the_engine_takes(engine):
    """max_new_tokens 1 (one frame, 80 ms) was refused as "input too long". The reference's
    minimum of two new tokens keeps EOS out of the first two samples; one frame needs one sample."""
    _, sp = engine.prepare(SynthesisRequest("Hello there.", speaker="ryan", params=SynthesisParams(max_frames=1)))
    assert sp.max_tokens == 1 and sp.min_tokens == 1


def test_a_prompt_with_no_room_says_so_and_names_its_positions(engine):
    with pytest.raises(PromptTooLong, match="input too long") as refused:
        engine.prepare(SynthesisRequest(" ".join(["word"] * 600), speaker="ryan"))
    assert refused.value.positions > refused.value.most == 511 and refused.value.param == "input"


def test_an_integer_parameter_takes_a_whole_float_as_json_schema_does():
    assert SpeechBody.model_validate({"input": "Hi.", "top_k": 19.0, "seed": 7.0}).top_k == 19
    for value in (19.5, "19", True):
        with pytest.raises(ValidationError):
            SpeechBody.model_validate({"input": "Hi.", "top_k": value})


@pytest.mark.parametrize("body,param,code", [
    ({"input": ""}, "input", "invalid_value"),
    ({"input": " \n\u3000\x1c"}, "input", "invalid_value"),  # only whitespace, as str.strip() sees it
    ({}, "input", "missing_parameter"),
    ({"input": "x" * 20_001}, "input", "invalid_value"),
    ({"input": "Hi.", "temperature": 10}, "temperature", "invalid_value"),
    ({"input": "Hi.", "temperature": "0.5"}, "temperature", "invalid_value"),  # strict: a string is no number
    ({"input": "Hi.", "stream": 1}, "stream", "invalid_value"),  # nor 1 a boolean
    ({"input": "Hi.", "voice": "v" * 1_000_000}, "voice", "invalid_value"),
    ({"input": "Hi.", "voice": {"id": "ryan", "x": 1}}, "voice", "invalid_value"),
    ({"input": "Hi.", "voice": ["ryan"]}, "voice", "invalid_value"),
    ({"input": "Hi.", "response_format": "ogg"}, "response_format", "invalid_value"),
    ({"input": "Hi.", "k" * 100_000: 1}, "k" * 64, "unknown_parameter"),
    ({"input": "Hi.", "instructions": "i" * 2001}, "instructions", "invalid_value"),
    ({"input": "Hi.", "ref_text": "r" * 2001}, "ref_text", "invalid_value"),
    ({"input": "\ud800"}, "input", "invalid_value"),  # a lone surrogate is no text
])
def test_each_invalid_body_is_one_short_error_naming_its_parameter(body, param, code):
    with pytest.raises(ValidationError) as refused:
        SpeechBody.model_validate(body)
    error = invalid_request(refused.value.errors()).to_json()["error"]
    assert_clean_error(error)
    assert (error["param"], error["code"]) == (param, code)
    assert len(error["message"]) < 200 + QUOTE_CHARS


@pytest.mark.parametrize("message,param", [
    ('[{"type": "session.config"}]', "type"),  # a list, not an object
    ('{"type": "session.config", "input": "again"}', "input"),  # a field given twice (input comes later)
    ('{"type": "session.config", "colour": "blue"}', "colour"),
    ('{"type": "session.config", "temperature": "hot"}', "temperature"),
    ('{"type": "session.config", "voice": [1]}', "voice"),
    ('{"type": "session.config", "speed": 99}', "speed"),
    ("not json", "type"),
    ('{"type": "input.text", "text": "too soon"}', "type"),
    ("[" * 100_000, "type"),  # nesting beyond the parser's recursion limit
    ('{"type": "session.config", "text_mode": "words"}', "text_mode"),
    ('{"type": "session.config", "text_mode": ["token"]}', "text_mode"),
    ('{"type": "session.config", "text_mode": "token", "non_streaming_mode": true}', "non_streaming_mode"),
    ('{"type": "session.config", "non_streaming_mode": true}', "non_streaming_mode"),  # token mode by default
    ('{"type": "session.config", "min_text_tokens": 65}', "min_text_tokens"),
    ('{"type": "session.config", "min_text_tokens": -1}', "min_text_tokens"),
    ('{"type": "session.config", "min_text_tokens": "8"}', "min_text_tokens"),
    ('{"type": "session.config", "min_text_tokens": true}', "min_text_tokens"),
    ('{"type": "session.config", "min_text_tokens": 2.5}', "min_text_tokens"),
    ('{"type": "session.config", "text_mode": "sentence", "min_text_tokens": 4}', "min_text_tokens"),
    ('{"type": "session.config", "idle_timeout_s": 0}', "idle_timeout_s"),
    ('{"type": "session.config", "idle_timeout_s": "60"}', "idle_timeout_s"),
    ('{"type": "session.config", "idle_timeout_s": 1e9}', "idle_timeout_s"),
])
def test_a_bad_session_config_is_a_400_naming_the_parameter(message, param):
    with pytest.raises(APIError) as refused:
        session_config(message)
    assert refused.value.status == 400
    assert_clean_error(refused.value.to_json()["error"], param)


def test_a_session_config_takes_a_lead_and_an_idle_timeout_within_their_bounds():
    config = session_config('{"type": "session.config", "min_text_tokens": 8.0, "idle_timeout_s": 1.5}')
    assert (config.text_mode, config.min_text_tokens, config.idle_timeout_s) == ("token", 8, 1.5)
    assert session_config('{"type": "session.config", "text_mode": "sentence"}').text_mode == "sentence"


@pytest.mark.parametrize("ref", ["data:audio/wav;base64", "data:audio/wav,UklGRg==", "%%% not base64 %%%"])
def test_inline_reference_audio_that_is_not_base64_is_a_400(ref):
    """`data:audio/wav;base64` without its comma was a 500 ("list index out of range")."""
    with pytest.raises(APIError) as refused:
        decode_inline_audio(ref, 1000)
    assert refused.value.status == 400
    assert_clean_error(refused.value.to_json()["error"], "ref_audio")
    assert decode_inline_audio("data:audio/wav;base64,UklGRg==", 1000) == b"RIFF"


def test_a_speaker_embedding_is_a_json_list_of_plain_finite_numbers():
    import re

    for good in ("[1, -2.5, 3e-5]", "[ 0 ,\n1E+10 ]"):
        assert re.fullmatch(EMBEDDING_PATTERN, good) and all(math.isfinite(v) for v in json.loads(good))
    for bad in ("[true, false]", "[1, null]", "[NaN]", "[1e999]", "[]", '["1"]', "[1,]", "{}", "1"):
        assert re.fullmatch(EMBEDDING_PATTERN, bad) is None, bad


def test_the_voice_store_refuses_overlong_texts_whoever_calls_it(tmp_path):
    from vllm_qwen3tts.engine import VoiceProfile
    from vllm_qwen3tts.server.voices import InvalidVoiceMetadata, InvalidVoiceProfile, VoiceMetadata, VoiceStore

    store = VoiceStore(tmp_path)
    profile = VoiceProfile(xvector=[0.5] * 8)
    for field in ("description", "consent"):
        with pytest.raises(InvalidVoiceMetadata, match=field):
            store.create("alice", "v", profile, VoiceMetadata(**{field: "x" * 2001}))
    with pytest.raises(InvalidVoiceProfile, match="ref_text"):
        store.create("alice", "v", VoiceProfile(xvector=[0.5] * 8, ref_codes=[[1] * 16], ref_text="r" * 2001))
    with pytest.raises(InvalidVoiceProfile):
        store.create("alice", "v", VoiceProfile(xvector=[True] * 8))
    assert store.list("alice") == []
    store.create("alice", "v", profile, VoiceMetadata(description="x" * 2000))


# ---------------------------------------------------------------------------------- the server

AUTH = {"Authorization": "Bearer alice-key"}


@pytest.fixture(scope="module")
def server(speech_server):
    return speech_server.base


def speech(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server}/v1/audio/speech", json=body, headers=AUTH, timeout=300, **kw)


FAST = {"voice": "ryan", "response_format": "pcm", "temperature": 0, "max_new_tokens": 2}


@pytest.mark.engine
@pytest.mark.parametrize("body,status,param,code", [
    ({"input": "Hi.", "temperature": 2.5}, 400, "temperature", "invalid_value"),  # the schema said <= 10
    ({"input": "Hi.", "subtalker_temperature": 10}, 400, "subtalker_temperature", "invalid_value"),
    ({"input": "Hi.", "repetition_penalty": 0.0001}, 400, "repetition_penalty", "invalid_value"),
    ({"input": "Hi.", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"input": "Hi.", "max_new_tokens": 0}, 400, "max_new_tokens", "invalid_value"),
    ({"input": "   "}, 400, "input", "invalid_value"),  # valid by the old schema, then refused
    ({"input": ""}, 400, "input", "invalid_value"),
    ({"input": "Hi.", "language": "klingon"}, 400, "language", "unsupported_language"),
    ({"input": "Hi.", "language": " English"}, 400, "language", "unsupported_language"),
    ({"input": "Hi.", "voice": "nobody"}, 400, "voice", "voice_not_found"),
    ({"input": "Hi.", "task_type": "Base"}, 400, "task_type", "unsupported_task_type"),
    ({"input": "Hi.", "ref_audio": "data:audio/wav;base64"}, 400, "ref_audio", "unsupported_task_type"),
    ({"input": "Hi.", "model": "m" * 100_000}, 404, "model", "model_not_found"),
    ({"input": "Hi.", "seed": "1"}, 400, "seed", "invalid_value"),
    ({"input": "Hi.", "x_vector_only_mode": 1}, 400, "x_vector_only_mode", "invalid_value"),
    ({"input": "Hi.", "nonsense": True}, 400, "nonsense", "unknown_parameter"),
])
def test_invalid_requests_get_the_documented_error_shape_and_status(server, body, status, param, code):
    for streaming in ({}, {"stream_format": "sse"}):  # refused before any audio, SSE or not
        r = speech(server, {**FAST, **body, **streaming})
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert_clean_error(r.json()["error"], param)
        assert r.json()["error"]["code"] == code


@pytest.mark.engine
def test_an_unknown_megabyte_voice_is_not_echoed(server):
    r = speech(server, {**FAST, "input": "Hi.", "voice": "v" * 1_000_000})
    assert r.status_code == 400 and len(r.content) < 1000
    assert_clean_error(r.json()["error"], "voice")
    r = speech(server, {**FAST, "input": "Hi.", "voice": "v" * 60})  # within the length: unknown, quoted short
    assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found" and len(r.content) < 1000


@pytest.mark.engine
@pytest.mark.parametrize("raw,param,code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_body"),
    (b"", None, "invalid_body"),
])
def test_a_body_that_is_no_json_object_gets_our_error_shape_not_fastapis(server, raw, param, code):
    r = httpx.post(f"{server}/v1/audio/speech", content=raw, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and "detail" not in r.json(), r.text
    assert_clean_error(r.json()["error"], param)
    assert r.json()["error"]["code"] == code


@pytest.mark.engine
def test_an_unsupported_method_is_405_listing_the_allowed_ones(server):
    r = httpx.put(f"{server}/v1/audio/speech", headers=AUTH, timeout=60)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert_clean_error(r.json()["error"])
    r = httpx.put(f"{server}/v1/audio/voices", headers=AUTH, timeout=60)
    assert r.status_code == 405 and {"GET", "POST"} <= {m.strip() for m in r.headers["allow"].split(",")}


@pytest.mark.engine
def test_one_frame_of_audio_for_max_new_tokens_one(server):
    r = speech(server, {**FAST, "input": "Hello there.", "max_new_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(r.content) == 1920 * 2  # one frame: 80 ms of 16-bit PCM at 24 kHz


@pytest.mark.engine
def test_a_minimum_above_the_maximum_is_the_maximum(server):
    """The schema cannot state that min_new_tokens <= max_new_tokens, so the server takes any pair."""
    r = speech(server, {**FAST, "input": "Hello there.", "max_new_tokens": 3, "min_new_tokens": 9})
    assert r.status_code == 200 and len(r.content) == 3 * 1920 * 2


@pytest.mark.engine
def test_input_within_the_limits_is_spoken_even_where_one_word_exceeds_the_model(server):
    """A 900-digit "word" (a token per digit) has no room in a 512-position model; it is cut
    until each piece fits (it was a 400 "input too long")."""
    r = speech(server, {**FAST, "input": "7" * 900, "max_new_tokens": 1})
    assert r.status_code == 200, r.text
    pieces = int(r.headers["x-output-tokens"])
    assert pieces >= 2 and len(r.content) == pieces * 1920 * 2


@pytest.mark.engine
def test_instructions_up_to_what_the_model_leaves_room_for(server):
    doc = httpx.get(f"{server}/openapi.json", timeout=60).json()
    props = doc["components"]["schemas"]["SpeechBody"]["properties"]
    limit = next(b["maxLength"] for b in props["instructions"]["anyOf"] if b.get("type") == "string")
    assert 0 < limit < 2000
    r = speech(server, {**FAST, "input": "Hi.", "instructions": "\U0001F600" * limit, "max_new_tokens": 1})
    assert r.status_code == 200, r.text
    r = speech(server, {**FAST, "input": "Hi.", "instructions": "i" * (limit + 1)})
    assert r.status_code == 400 and str(limit) in r.json()["error"]["message"]


@pytest.mark.engine
def test_the_openapi_document_states_the_bounds_the_server_applies(server):
    doc = httpx.get(f"{server}/openapi.json", timeout=60).json()
    props = doc["components"]["schemas"]["SpeechBody"]["properties"]
    for name, bound in BOUNDS.items():
        number = next(b for b in props[name].get("anyOf", [props[name]]) if b.get("type") in ("number", "integer"))
        assert number["maximum"] == bound.hi, name
        assert number["exclusiveMinimum" if bound.lo_open else "minimum"] == bound.lo, name
    assert props["task_type"]["anyOf"][0]["enum"] == ["CustomVoice"]
    for path in ("/v1/audio/speech", "/v1/audio/voices", "/v1/audio/voices/{name}"):
        for operation in doc["paths"][path].values():
            assert "422" not in operation["responses"]
            error = operation["responses"]["400"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}
            assert "Retry-After" in operation["responses"]["503"]["headers"]


# WebSocket session.config: the same checks as the HTTP body, the same error, and no internals.
@pytest.mark.engine
@pytest.mark.parametrize("config,param", [
    ([{"type": "session.config"}], "type"),
    ({"type": "session.config", "input": "twice"}, "input"),
    ({"type": "session.config", "colour": "blue"}, "colour"),
    ({"type": "session.config", "temperature": "hot"}, "temperature"),
    ({"type": "session.config", "temperature": 3}, "temperature"),
    ({"type": "session.config", "voice": {"id": 7}}, "voice"),
    ({"type": "session.config", "response_format": ["wav"]}, "response_format"),
    ({"type": "session.config", "min_text_tokens": 65}, "min_text_tokens"),
    ({"type": "session.config", "idle_timeout_s": 301}, "idle_timeout_s"),  # above the server's (300 s)
])
def test_a_bad_websocket_config_gets_an_error_message_naming_the_parameter(server, config, param):
    async def run():
        url = server.replace("http", "ws", 1) + "/v1/audio/speech/stream?api_key=alice-key"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps(config))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 60)
            return reply

    reply = asyncio.run(run())
    assert reply["type"] == "error"
    assert_clean_error(reply["error"], param)


@pytest.mark.engine
def test_a_websocket_config_within_the_bounds_is_accepted(server):
    async def run():
        url = server.replace("http", "ws", 1) + "/v1/audio/speech/stream?api_key=alice-key"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "session.config", **FAST, "temperature": 2}))
            return json.loads(await asyncio.wait_for(ws.recv(), 60))

    assert asyncio.run(run())["type"] == "session.created"


# The voice upload (a multipart form): its limits hold whatever the checkpoint (this one saves no voices).
@pytest.mark.engine
@pytest.mark.parametrize("form,param", [
    ({"name": "v", "speaker_embedding": "[true, false]"}, "speaker_embedding"),  # json true was taken as 1.0
    ({"name": "v", "speaker_embedding": "[1, 2"}, "speaker_embedding"),
    ({"name": "v", "speaker_embedding": "[1e999]"}, "speaker_embedding"),
    ({"name": "v", "speaker_embedding": "[1, 2]", "description": "d" * 2001}, "description"),
    ({"name": "v", "speaker_embedding": "[1, 2]", "consent": "c" * 2001}, "consent"),
    ({"name": "v", "speaker_embedding": "[1, 2]", "ref_text": "r" * 2001}, "ref_text"),
    ({"name": "no spaces", "speaker_embedding": "[1, 2]"}, "name"),
    ({"speaker_embedding": "[1, 2]"}, "name"),
    ({"name": "v"}, "audio_sample"),  # neither audio nor an embedding
    ({"name": "v", "speaker_embedding": "[1, 2]"}, "speaker_embedding"),  # not the talker's hidden size
])
def test_a_bad_voice_upload_is_a_400_naming_the_field(server, form, param):
    r = httpx.post(f"{server}/v1/audio/voices", data=form, files={"unused": ("x", b"")}, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    assert_clean_error(r.json()["error"], param)


@pytest.mark.engine
def test_a_valid_voice_upload_on_a_checkpoint_that_cannot_clone_is_404(server):
    doc = httpx.get(f"{server}/openapi.json", timeout=60).json()
    form = doc["components"]["schemas"]["Body_create_voice_v1_audio_voices_post"]
    size = form["properties"]["speaker_embedding"]["description"].split("list of ")[1].split(" ")[0]
    r = httpx.post(f"{server}/v1/audio/voices", data={"name": "v", "speaker_embedding": json.dumps([0.5] * int(size))},
                   headers=AUTH, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_task_type"


@pytest.mark.engine
@pytest.mark.parametrize("message", ['["input.text", "Hello."]', json.dumps({"type": "t" * 100_000})])
def test_a_bad_message_after_the_config_gets_an_error_without_internals(server, message):
    async def run():
        url = server.replace("http", "ws", 1) + "/v1/audio/speech/stream?api_key=alice-key"
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.config", **FAST}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "session.created"
            await ws.send(message)
            return json.loads(await asyncio.wait_for(ws.recv(), 60))

    reply = asyncio.run(run())
    assert reply["type"] == "error"
    assert_clean_error(reply["error"], "type")
