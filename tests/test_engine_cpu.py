"""Speech end to end on the real vLLM CPU engine (Model Runner V1) and a real codec worker.

Greedy decoding makes the talker deterministic, so vLLM's codes must equal the
official implementation's frame for frame, whatever the batching: requests run
together in one engine with chunked prefill on (a 64-token step budget splits
the prompts), and a second engine with a KV cache too small for all of them at
once forces preemption and re-prefill. The VoiceDesign and Base engines also speak their text
arriving in pieces (`stream_text`; the CustomVoice cases are test_engine_text_stream.py's).
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import torch

from oracle import load_official, official_clone_item, official_generate
from vllm_qwen3tts.codec.decoder import CodecDecoder
from vllm_qwen3tts.engine import Qwen3TTS, SynthesisParams, SynthesisRequest

pytestmark = [pytest.mark.engine, pytest.mark.parity]

FRAMES = 24
GREEDY = SynthesisParams(temperature=0.0, max_frames=FRAMES)
WAVE_TOL = 1e-4


def engine_for(path, **options) -> Qwen3TTS:
    options.setdefault("max_model_len", 512)
    options.setdefault("max_num_seqs", 8)
    engine_args = {"max_num_batched_tokens": 64, **options.pop("engine_args", {})}
    return Qwen3TTS(path, device="cpu", engine_args=engine_args, **options)


# The VoiceDesign, Base and preemption engines below run eagerly (`enforce_eager`): vLLM compiles
# the same talker code for every variant, and compiled engines are covered by the CustomVoice one
# here (1.7B), the shared speech server (1.7B) and test_server_hub.py's `vllm serve` (0.6B).
EAGER = dict(enforce_eager=True)


def official_codes(official, method, **kwargs):
    codes, wav = official_generate(official, method, do_sample=False, subtalker_dosample=False,
                                   max_new_tokens=FRAMES + 1, **kwargs)
    return np.asarray(codes), np.asarray(wav)


@pytest.fixture(scope="module")
def custom_voice(custom_voice_engine, tiny_checkpoint):
    return custom_voice_engine, load_official(tiny_checkpoint("1.7b-custom_voice"))


def test_prompt_ids_outside_the_talker_vocabulary_are_refused_and_the_engine_keeps_serving(custom_voice):
    """test_talker_vocab.py's check (a prompt id past the codec vocabulary once killed the engine
    core), on this module's engine."""
    from test_talker_vocab import assert_foreign_prompt_ids_are_refused_and_speech_still_served

    assert_foreign_prompt_ids_are_refused_and_speech_still_served(custom_voice[0])


CUSTOM_VOICE_CASES = [
    dict(text="Hello there, this is the first test.", speaker="ryan", language="English"),
    dict(text="今天天气很好。", speaker="eric", language="Chinese"),  # dialect speaker
    dict(text="Bonjour à tous, ça va ?", speaker="vivian", language="French", instructions="Speak softly."),
    dict(text="Streaming text input mode.", speaker="aiden", language="Auto", non_streaming_mode=False),
]


def as_request(case: dict, params: SynthesisParams = GREEDY) -> SynthesisRequest:
    return SynthesisRequest(params=params, **case)


def official_kwargs(case: dict) -> dict:
    kw = dict(case)
    if "instructions" in kw:
        kw["instruct"] = kw.pop("instructions")
    return kw


def test_custom_voice_batch_matches_official_one_by_one(custom_voice):
    tts, official = custom_voice
    results = tts.generate([as_request(c) for c in CUSTOM_VOICE_CASES])
    for case, result in zip(CUSTOM_VOICE_CASES, results):
        ref_codes, ref_wav = official_codes(official, "generate_custom_voice", **official_kwargs(case))
        assert result.codes.shape == ref_codes.shape == (FRAMES, 16), case
        np.testing.assert_array_equal(result.codes, ref_codes, err_msg=str(case))
        assert result.finish_reason == "length"
        assert result.audio.shape == (FRAMES * 1920,)
        assert np.abs(result.audio - ref_wav).max() <= WAVE_TOL
    assert len({r.codes.tobytes() for r in results}) == len(results), "degenerate: requests produced equal codes"


def test_streamed_chunks_concatenate_to_the_whole_utterance(custom_voice, tiny_checkpoint):
    tts, _ = custom_voice
    req = as_request(CUSTOM_VOICE_CASES[0])
    chunks = list(tts.stream(req))
    assert len(chunks) >= 3 and chunks[0].codes.shape[0] <= 2, "expected a small first chunk, then more"
    codes = np.concatenate([c.codes for c in chunks])
    audio = np.concatenate([c.audio for c in chunks])
    whole = CodecDecoder.from_checkpoint(tiny_checkpoint("1.7b-custom_voice"))
    with torch.no_grad():
        reference = whole(torch.as_tensor(codes)[None])[0].numpy()
    assert np.abs(audio - reference).max() <= WAVE_TOL
    assert chunks[-1].finish_reason == "length"


def test_the_first_chunk_grows_from_one_to_two_frames_as_streams_pile_up(custom_voice):
    from dataclasses import replace

    tts, _ = custom_voice
    engine = tts.engine
    schedule = engine.chunk_schedule
    engine.chunk_schedule = replace(schedule, light_load_streams=2)

    async def first_chunks() -> list[int]:
        async def first(req) -> int:
            sizes = [len(chunk.codes) async for chunk in engine.stream(req)]
            assert sum(sizes) == FRAMES
            return sizes[0]

        # gather starts them in order: each sees the ones before it synthesizing
        return await asyncio.gather(*(first(as_request(c)) for c in CUSTOM_VOICE_CASES[:3]))

    try:
        assert tts._run(first_chunks()) == [1, 1, 2]
        assert engine.active_streams == 0
    finally:
        engine.chunk_schedule = schedule


LONG_TEXT = ("This sentence is long on purpose, so that its prompt needs more than one engine step: the "
             "sixty-four token budget of these engines splits it, and a seeded request whose prefill is split "
             "must still draw exactly what it draws when it runs alone, whichever step its prompt ends in and "
             "whatever else runs beside it.")


def test_seeded_sampling_is_reproducible_and_seed_dependent(custom_voice):
    tts, _ = custom_voice
    case = CUSTOM_VOICE_CASES[0]
    a, b, c = tts.generate([
        as_request(case, SynthesisParams(seed=7, max_frames=FRAMES)),
        as_request(case, SynthesisParams(seed=7, max_frames=FRAMES)),
        as_request(case, SynthesisParams(seed=8, max_frames=FRAMES)),
    ])
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)


def test_seeded_requests_split_by_chunked_prefill_draw_as_when_alone(custom_voice):
    """vLLM's V1 runner rewinds a split prefill's generator by an offset, which CPU generators do
    not have: before the V1 driver restored their state instead, this killed the engine."""
    tts, _ = custom_voice
    case = dict(CUSTOM_VOICE_CASES[0], text=LONG_TEXT)
    seeded = as_request(case, SynthesisParams(seed=11, max_frames=FRAMES))
    assert len(tts.engine.prepare(seeded)[0]["prompt_token_ids"]) > 64
    alone = tts.generate([seeded])[0]
    together = tts.generate([seeded, as_request(case, SynthesisParams(seed=12, max_frames=FRAMES)), seeded])
    np.testing.assert_array_equal(together[0].codes, alone.codes)
    np.testing.assert_array_equal(together[2].codes, alone.codes)
    assert not np.array_equal(together[1].codes, alone.codes)


def test_abort_mid_stream_frees_engine_and_codec_state(custom_voice):
    tts, _ = custom_voice
    stream = tts.stream(as_request(CUSTOM_VOICE_CASES[0], SynthesisParams(temperature=0.0, max_frames=400)))
    first = next(stream)
    assert first.audio.size > 0
    stream.close()  # the client went away

    async def idle():
        for _ in range(100):
            stats = await tts.engine.codec.stats()
            if stats.active_streams == 0 and tts._running.llm.output_processor.get_num_unfinished_requests() == 0:
                return stats
            await asyncio.sleep(0.1)
        raise AssertionError(f"state left behind: {stats}")

    asyncio.run_coroutine_threadsafe(idle(), tts._loop).result()
    # the engine still serves
    assert tts.generate([as_request(CUSTOM_VOICE_CASES[3])])[0].codes.shape == (FRAMES, 16)


def test_a_request_whose_codec_stream_cannot_open_fails_and_leaves_nothing_running(custom_voice):
    from vllm_qwen3tts.codec.client import CodecError

    tts, _ = custom_voice
    codec = tts.engine.codec
    fillers = [f"filler-{i}" for i in range(tts._run(codec.stats()).max_streams)]
    for stream_id in fillers:  # every codec stream slot taken
        tts._run(codec.open_stream(stream_id))
    try:
        with pytest.raises(CodecError, match="stream"):
            tts.generate([as_request(CUSTOM_VOICE_CASES[0])])
        assert tts._running.llm.output_processor.get_num_unfinished_requests() == 0
        assert tts._run(codec.stats()).active_streams == len(fillers)
    finally:
        for stream_id in fillers:
            tts._run(codec.close_stream(stream_id))
    assert tts.generate([as_request(CUSTOM_VOICE_CASES[0])])[0].codes.shape == (FRAMES, 16)


# ------------------------------------------------------------------ text in pieces (stream_text)


def pieces_of(text: str, rng: random.Random, max_piece: int = 4, max_delay_s: float = 0.0):
    """`text` cut at random into pieces of 1..max_piece characters, each after a random delay."""
    i = 0
    while i < len(text):
        n = rng.randint(1, max_piece)
        if max_delay_s:
            time.sleep(rng.random() * max_delay_s)
        yield text[i:i + n]
        i += n


def codes_in_pieces(tts: Qwen3TTS, req: SynthesisRequest, rng: random.Random, **cut) -> np.ndarray:
    chunks = list(tts.stream_text(req, pieces_of(req.text, rng, **cut)))
    assert chunks[-1].finish_reason in ("stop", "length")
    return np.concatenate([c.codes for c in chunks])


def streaming_text(case: dict) -> SynthesisRequest:
    return as_request({**case, "non_streaming_mode": False})


def test_voice_design_matches_official(tiny_checkpoint):
    path = tiny_checkpoint("1.7b-voice_design")
    cases = [
        dict(text="A calm evening voice.", instructions="A deep, slow male voice.", language="English"),
        dict(text="Guten Morgen!", instructions="", language="German", non_streaming_mode=False),
    ]
    official = load_official(path)
    with engine_for(path, **EAGER) as tts:
        results = tts.generate([as_request(c) for c in cases])
        in_pieces = codes_in_pieces(tts, as_request(cases[1]), random.Random(5))
    for case, result in zip(cases, results):
        kw = official_kwargs(case)
        ref, _ = official_codes(official, "generate_voice_design", **kw)
        np.testing.assert_array_equal(result.codes, ref, err_msg=str(case))
    np.testing.assert_array_equal(in_pieces, results[1].codes)  # streaming text mode: the text in pieces


def reference_audio(seconds: float, seed: int) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * 24000)) / 24000
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    return wav.astype(np.float32), 24000


def test_base_voice_clone_matches_official(tiny_checkpoint):
    path = tiny_checkpoint("0.6b-base")
    official = load_official(path)
    with engine_for(path, **EAGER) as tts:
        icl = tts.clone_voice(reference_audio(2.0, 1), "This is the reference voice.")
        xvec = tts.clone_voice(reference_audio(1.5, 2), x_vector_only=True)
        cases = [
            (dict(text="Cloned with its transcript.", language="English"), icl),
            (dict(text="Cloned from the speaker vector only.", language="Auto"), xvec),
        ]
        results = tts.generate([SynthesisRequest(voice=voice, params=GREEDY, **case) for case, voice in cases])
        # the same clones in streaming text mode, their text in pieces (ICL starts once its text
        # is longer than its reference)
        streaming = [SynthesisRequest(voice=voice, params=GREEDY, non_streaming_mode=False, **case)
                     for case, voice in cases]
        for req, seed in zip(streaming, (7, 8)):
            np.testing.assert_array_equal(codes_in_pieces(tts, req, random.Random(seed)),
                                          tts.generate([req])[0].codes, err_msg=req.text)
    for (case, voice), result in zip(cases, results):
        ref, ref_wav = official_codes(official, "generate_voice_clone", voice_clone_prompt=[official_clone_item(voice)],
                                      **case)
        if voice.ref_codes:  # the official decodes reference + generated codes
            np.testing.assert_array_equal(ref[: len(voice.ref_codes)], voice.ref_codes)
            ref = ref[len(voice.ref_codes):]
        np.testing.assert_array_equal(result.codes, ref, err_msg=str(case))
        # ICL: the official decodes reference + generated codes and cuts the reference off
        assert np.abs(result.audio - ref_wav[-result.audio.shape[0]:]).max() <= WAVE_TOL


def test_forced_preemption_keeps_every_frame(tiny_checkpoint, custom_voice):
    """A KV cache of 9 blocks of 32 tokens cannot hold 6 requests of ~60 tokens: vLLM preempts
    and later re-prefills prompt + generated tokens, whose inputs need the kept residual codes."""
    from prometheus_client import REGISTRY

    tts_ref, _ = custom_voice
    requests = [as_request(c) for c in CUSTOM_VOICE_CASES + CUSTOM_VOICE_CASES[:2]]
    expected = tts_ref.generate(requests)

    def preemptions() -> float:
        return sum(s.value for m in REGISTRY.collect() if m.name == "vllm:num_preemptions" for s in m.samples
                   if s.name.endswith("_total"))

    before = preemptions()
    with engine_for(tiny_checkpoint("1.7b-custom_voice"), max_model_len=256, **EAGER,
                    engine_args={"num_gpu_blocks_override": 9, "block_size": 32}) as tts:
        results = tts.generate(requests)
    assert preemptions() > before, "the test did not force any preemption"
    for want, got in zip(expected, results):
        np.testing.assert_array_equal(got.codes, want.codes)
