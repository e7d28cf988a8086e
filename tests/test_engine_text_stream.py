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

from test_engine_cpu import (CUSTOM_VOICE_CASES, FRAMES, WAVE_TOL, as_request, codes_in_pieces, engine_for,
                             streaming_text)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def custom_voice(tiny_checkpoint):
    with engine_for(tiny_checkpoint("1.7b-custom_voice")) as tts:
        yield tts, None


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


def test_text_in_pieces_refuses_non_streaming_mode_and_empty_text(custom_voice):
    tts, _ = custom_voice
    with pytest.raises(Exception, match="streaming text mode"):
        list(tts.stream_text(as_request({**CUSTOM_VOICE_CASES[0], "non_streaming_mode": True}), ["Hi."]))
    with pytest.raises(Exception, match="input text is empty"):
        list(tts.stream_text(streaming_text(CUSTOM_VOICE_CASES[0]), ["", "  "]))
    assert tts.generate([as_request(CUSTOM_VOICE_CASES[0])])[0].codes.shape == (FRAMES, 16)  # still serving
