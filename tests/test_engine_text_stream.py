"""Text that arrives in pieces while the request speaks (`Qwen3TTS.stream_text`), on the real vLLM
CPU engine: the codes are those of the whole text spoken at once in streaming text mode, however
the pieces are cut and timed, and speech starts before the text is complete. (VoiceDesign and
Base clones are checked the same way in test_engine_cpu.py, on that module's engines.)
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from test_engine_cpu import (CUSTOM_VOICE_CASES, FRAMES, WAVE_TOL, as_request, codes_in_pieces, streaming_text)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def custom_voice(custom_voice_engine):
    return custom_voice_engine, None  # the session's engine (conftest.py), test_engine_cpu.py's too


@pytest.mark.parametrize("case", CUSTOM_VOICE_CASES[:3], ids=["english", "chinese", "french-instructed"])
def test_text_in_pieces_gives_the_codes_of_the_whole_text(custom_voice, case):
    """Whatever the cuts (one character at a time, a few at a time, with delays longer than a
    frame), the codes are those of the whole text in streaming text mode."""
    tts, _ = custom_voice
    req = streaming_text(case)
    whole = tts.generate([req])[0]
    for seed, cut in enumerate([dict(max_piece=1), dict(max_piece=4, max_delay_s=0.03), dict(max_piece=9)]):
        np.testing.assert_array_equal(codes_in_pieces(tts, req, random.Random(seed), **cut), whole.codes,
                                      err_msg=f"{case['text']!r} cut {cut}")


def test_speech_starts_before_the_text_is_complete_and_waits_for_it(custom_voice, tiny_checkpoint):
    """The text's second half is written only after the first audio has arrived (a deadlock if
    the request waited for the whole text); the held request then goes on as the text comes, its
    audio the whole text's, and a request beside it is unaffected."""
    tts, _ = custom_voice
    req = streaming_text(CUSTOM_VOICE_CASES[0])
    first, second = req.text[:12], req.text[12:]
    heard = threading.Event()

    def writer():
        yield first
        assert heard.wait(120), "no audio before the rest of the text"
        time.sleep(0.3)  # a pause of many frames: the request holds
        yield from second.split(" ")[:1]
        for word in second.split(" ")[1:]:
            yield " " + word

    chunks = []
    beside: list = []
    other = as_request(CUSTOM_VOICE_CASES[1])
    running_beside = threading.Thread(target=lambda: beside.append(tts.generate([other])[0]))
    for chunk in tts.stream_text(req, writer()):
        chunks.append(chunk)
        if not heard.is_set() and chunk.audio.size:
            heard.set()
            running_beside.start()
    running_beside.join(120)
    whole = tts.generate([req])[0]
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]), whole.codes)
    assert np.abs(np.concatenate([c.audio for c in chunks]) - whole.audio).max() <= WAVE_TOL
    np.testing.assert_array_equal(beside[0].codes, tts.generate([other])[0].codes)


@pytest.mark.parametrize("forced", [False, True], ids=["eos-free", "length-forced"])
def test_a_request_may_hold_at_its_first_frame_whatever_its_minimum_length(custom_voice, forced):
    """The request starts with one text token, the prompt's, and none for its trailing track, then
    the text pauses: its first frame already holds. With the length forced (min frames = max
    frames) every turn holds as text comes. EOS is still kept out of the first frames, and the codes
    are the whole text's."""
    import dataclasses

    tts, _ = custom_voice
    req = streaming_text(CUSTOM_VOICE_CASES[0])
    if forced:
        req = dataclasses.replace(req, params=dataclasses.replace(req.params, min_frames=FRAMES, max_frames=FRAMES))
    first, rest = req.text.split(" ", 1)

    def writer():
        yield first
        yield " "  # "Hello" is final now: the request starts with it and nothing after it
        time.sleep(0.3)  # many frames' time: the first frame holds
        for word in rest.split(" "):
            yield word + " " if word != rest.split(" ")[-1] else word
            time.sleep(0.02)

    chunks = list(tts.stream_text(req, writer()))
    whole = tts.generate([req])[0]
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]), whole.codes)
    if forced:
        assert whole.codes.shape[0] == FRAMES


def test_min_text_tokens_waits_for_a_lead_of_text_before_speaking(custom_voice):
    """With `min_text_tokens`, speech starts only once that many text tokens are final, although
    the writer pauses after every word for longer than a first frame takes; the codes are still
    the whole text's."""
    from vllm_qwen3tts.model.incremental_text import IncrementalTokenizer

    tts, _ = custom_voice
    req = streaming_text(CUSTOM_VOICE_CASES[0])
    words = req.text.split(" ")
    heard = threading.Event()
    lead = 6

    def committed(text: str) -> int:
        tokens = IncrementalTokenizer(tts.engine.tokenizer)
        tokens.append(text)
        return len(tokens.ids)

    for min_text_tokens in (0, lead):
        heard.clear()
        written: list[str] = []

        def writer():
            for i, word in enumerate(words):
                written.append(word if i == 0 else " " + word)
                yield written[-1]
                heard.wait(1.5)  # without a lead, speech starts within this pause

        chunks, at_first_audio = [], None
        for chunk in tts.stream_text(req, writer(), min_text_tokens=min_text_tokens):
            chunks.append(chunk)
            if at_first_audio is None and chunk.audio.size:
                at_first_audio = committed("".join(written))
                heard.set()
        np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]), tts.generate([req])[0].codes)
        if min_text_tokens:
            assert at_first_audio >= lead, f"speech started with {at_first_audio} tokens final"
        else:
            assert at_first_audio < lead, "without a lead, speech should start at the first words"


def test_text_in_pieces_refuses_non_streaming_mode_and_empty_text(custom_voice):
    tts, _ = custom_voice
    with pytest.raises(Exception, match="streaming text mode"):
        list(tts.stream_text(as_request({**CUSTOM_VOICE_CASES[0], "non_streaming_mode": True}), ["Hi."]))
    with pytest.raises(Exception, match="input text is empty"):
        list(tts.stream_text(streaming_text(CUSTOM_VOICE_CASES[0]), ["", "  "]))
    assert tts.generate([as_request(CUSTOM_VOICE_CASES[0])])[0].codes.shape == (FRAMES, 16)  # still serving
