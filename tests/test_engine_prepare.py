"""How a synthesis request becomes the talker's prompt and vLLM sampling parameters."""

from __future__ import annotations

import pytest

from vllm_qwen3tts.engine import SynthesisParams, SynthesisRequest, TTSEngine
from vllm_qwen3tts.base.params import PromptError
from vllm_qwen3tts.talker.protocol import EXTRA_ARGS_KEY, NUM_CODE_LOGPROBS, TalkerRequest


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    # prepare() needs neither vLLM nor the codec worker
    return TTSEngine(engine_client=None, codec=None, model_dir=tiny_checkpoint("1.7b-custom_voice"), max_model_len=512)


def prepare(engine, text="Hello there.", **params):
    return engine.prepare(SynthesisRequest(text, speaker="ryan", params=SynthesisParams(**params)))


def test_checkpoint_defaults_and_the_output_channel(engine):
    prompt, sp = prepare(engine)
    g = engine.config.generation
    assert (sp.temperature, sp.top_k, sp.repetition_penalty) == (g.temperature, g.top_k, g.repetition_penalty)
    assert sp.logprobs == NUM_CODE_LOGPROBS and sp.flat_logprobs and not sp.detokenize
    assert sp.stop_token_ids == [engine.config.talker.codec_eos_id] and sp.min_tokens == 2 and sp.ignore_eos
    assert set(prompt["prompt_token_ids"]) == {engine.config.talker.codec_pad_id}
    request = TalkerRequest.from_extra_args(sp.extra_args)
    assert len(request.recipe) == len(prompt["prompt_token_ids"])
    assert request.subtalker.temperature == g.subtalker_temperature


def test_temperature_zero_is_greedy_for_the_code_predictor_too_unless_it_says_otherwise(engine):
    _, sp = prepare(engine, temperature=0.0)
    assert sp.temperature == 0.0 and sp.extra_args[EXTRA_ARGS_KEY]["subtalker"][0] == 0.0
    _, sp = prepare(engine, temperature=0.0, subtalker_temperature=0.7)
    assert sp.extra_args[EXTRA_ARGS_KEY]["subtalker"][0] == 0.7


def test_frame_budget_defaults_to_the_text_length_and_never_exceeds_the_context(engine):
    short = prepare(engine, "Hi.")[1].max_tokens
    long_text = " ".join(["word"] * 20)
    long_ = prepare(engine, long_text)[1].max_tokens
    assert short == 100  # the floor
    assert 100 < long_ <= 512 - 40
    assert prepare(engine, max_frames=7)[1].max_tokens == 7
    prompt, sp = prepare(engine, max_frames=10_000)
    assert sp.max_tokens == 512 - len(prompt["prompt_token_ids"])
    forced = prepare(engine, max_frames=30, min_frames=30)[1]
    assert forced.min_tokens == forced.max_tokens == 30


def test_conditioning_salts_the_prefix_cache(engine):
    a = engine.prepare(SynthesisRequest("Same text.", speaker="ryan"))[0]["cache_salt"]
    b = engine.prepare(SynthesisRequest("Same text.", speaker="vivian"))[0]["cache_salt"]
    assert a != b and a == engine.prepare(SynthesisRequest("Same text.", speaker="ryan"))[0]["cache_salt"]


@pytest.mark.parametrize("params,message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(subtalker_top_p=1.5), "top_p"),
    (dict(max_frames=0), "max_frames"),
])
def test_bad_sampling_parameters_are_prompt_errors(engine, params, message):
    with pytest.raises(PromptError, match=message):
        prepare(engine, **params)


def test_a_prompt_that_leaves_no_room_is_refused(engine):
    with pytest.raises(PromptError, match="input too long"):
        prepare(engine, " ".join(["word"] * 600))


def test_chunk_schedule_starts_small_grows_and_names_every_size_it_sends():
    import itertools

    from vllm_qwen3tts.engine import ChunkSchedule

    default = ChunkSchedule()
    assert list(itertools.islice(default.sizes(), 7)) == [2, 4, 8, 16, 25, 25, 25]
    assert default.distinct_sizes() == (2, 4, 8, 16, 25)  # the codec worker's graph lengths
    slow = ChunkSchedule(first=3, growth=1.5, largest=20)
    assert set(itertools.islice(slow.sizes(), 50)) == set(slow.distinct_sizes())


def test_a_request_may_start_the_schedule_with_another_first_chunk():
    import itertools

    from vllm_qwen3tts.engine import ChunkSchedule

    default = ChunkSchedule()
    assert list(itertools.islice(default.starting_at(1).sizes(), 7)) == [1, 2, 4, 8, 16, 25, 25]
    assert list(itertools.islice(default.starting_at(25).sizes(), 2)) == [25, 25]
    assert default.starting_at(None) is default
    for bad in (0, 26):
        with pytest.raises(ValueError, match="between 1 and 25"):
            default.starting_at(bad)


def test_the_first_chunk_is_one_frame_while_few_streams_run_and_two_beyond():
    import itertools

    from vllm_qwen3tts.engine import ChunkSchedule

    default = ChunkSchedule()
    assert list(itertools.islice(default.for_load(1).sizes(), 3)) == [1, 2, 4]
    assert default.for_load(32).first == 1 and default.for_load(33).first == 2
    assert ChunkSchedule(light_load_streams=0).for_load(1).first == 2  # 0: never a 1-frame first chunk
    # every size it sends is still one the codec worker has a CUDA graph for (1 frame runs padded to 2)
    assert set(default.for_load(1).distinct_sizes()) - set(default.distinct_sizes()) == {1}


def test_a_first_chunk_outside_the_schedule_is_a_prompt_error(engine):
    from vllm_qwen3tts.engine import SynthesisRequest

    with pytest.raises(PromptError, match="first chunk"):
        engine.prepare(SynthesisRequest("Hello.", speaker="ryan", first_chunk_frames=26))
