"""Prefill and decode-step input embeddings equal the official implementation's, in every mode.

The official wrappers are run up to the point where they hand the embeddings to
the talker (tests/oracle.py); ours come from a prompt recipe turned into
embeddings by TalkerEmbeddings. fp32 on the CPU; same operation order, so the
tolerance is a few float32 ulps.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from oracle import official_generate_trace, official_prefill, qwen_tts
from vllm_qwen3tts.base.params import PromptError
from vllm_qwen3tts.model.prompt import SpeechRequest, build_prompt
from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer
from vllm_qwen3tts.tools.talker_parts import load_talker_components

pytestmark = pytest.mark.parity
ATOL = 2e-6
TEXT = "Hello there, 你好 world! It's 3.14 o'clock."


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tiny_checkpoint(variant)
            cache[variant] = (load_talker_components(path), load_text_tokenizer(path))
        return cache[variant]

    return get


def assert_same_prefill(ours_variant, req: SpeechRequest, official_embeds, official_trailing):
    comp, tok = ours_variant
    recipe = build_prompt(comp.config, tok, req)
    with torch.no_grad():
        mine = comp.embeddings.prefill(recipe)
        trailing = comp.embeddings.text(torch.tensor(recipe.trailing_text_ids))
    assert mine.shape == official_embeds.shape
    assert trailing.shape == official_trailing.shape
    torch.testing.assert_close(mine, official_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(trailing, official_trailing, atol=ATOL, rtol=0)
    return recipe


@pytest.mark.parametrize(
    "variant,non_streaming,language,speaker,instruct",
    [
        (v, nsm, lang, spk, ins)
        for v in ("0.6b-custom_voice", "1.7b-custom_voice")
        for nsm, lang, spk, ins in itertools.product(
            (True, False), ("English", "Auto", "Chinese"), ("ryan", "Dylan", "eric"), (None, "Speak slowly and warmly.")
        )
        if not (v.startswith("0.6b") and ins)
    ],
)
def test_custom_voice(variant, non_streaming, language, speaker, instruct, official, ours):
    ref = official_prefill(
        official(variant), "generate_custom_voice", text=TEXT, speaker=speaker, language=language,
        instruct=instruct, non_streaming_mode=non_streaming,
    )
    req = SpeechRequest(text=TEXT, speaker=speaker, language=language, instructions=instruct, non_streaming_mode=non_streaming)
    recipe = assert_same_prefill(ours(variant), req, *ref)
    dialect = speaker.lower() in ("dylan", "eric") and language in ("Auto", "Chinese")
    assert recipe.language_id == ({"dylan": 2074, "eric": 2062}[speaker.lower()] if dialect else
                                  {"English": 2050, "Chinese": 2055, "Auto": None}[language])


@pytest.mark.parametrize(
    "non_streaming,language,instruct",
    list(itertools.product((True, False), ("English", "Auto", "Japanese"), ("A deep, calm male voice.", ""))),
)
def test_voice_design(non_streaming, language, instruct, official, ours):
    ref = official_prefill(
        official("1.7b-voice_design"), "generate_voice_design", text=TEXT, instruct=instruct, language=language,
        non_streaming_mode=non_streaming,
    )
    req = SpeechRequest(text=TEXT, language=language, instructions=instruct, non_streaming_mode=non_streaming)
    assert_same_prefill(ours("1.7b-voice_design"), req, *ref)


def _clone_item(hidden: int, ref_frames: int | None, seed: int):
    item_cls = qwen_tts().inference.qwen3_tts_model.VoiceClonePromptItem
    g = torch.Generator().manual_seed(seed)
    xvec = torch.randn(hidden, generator=g)
    codes = None if ref_frames is None else torch.randint(0, 2048, (ref_frames, 16), generator=g)
    return item_cls(ref_code=codes, ref_spk_embedding=xvec, x_vector_only_mode=codes is None,
                    icl_mode=codes is not None, ref_text=None if codes is None else "This is the reference, 参考。")


@pytest.mark.parametrize(
    "variant,non_streaming,language,ref_frames",
    list(itertools.product(
        ("0.6b-base", "1.7b-base"), (False, True), ("Auto", "English"),
        (None, 3, 40),  # x-vector only; ICL with text longer than the reference codes; and shorter
    )),
)
def test_voice_clone(variant, non_streaming, language, ref_frames, official, ours):
    off = official(variant)
    item = _clone_item(off.model.config.talker_config.hidden_size, ref_frames, seed=7)
    ref = official_prefill(off, "generate_voice_clone", text=TEXT, language=language, voice_clone_prompt=[item],
                           non_streaming_mode=non_streaming)
    req = SpeechRequest(
        text=TEXT, language=language, xvector=item.ref_spk_embedding.tolist(), ref_text=item.ref_text,
        ref_codes=None if item.ref_code is None else item.ref_code.tolist(), non_streaming_mode=non_streaming,
    )
    recipe = assert_same_prefill(ours(variant), req, *ref)
    assert recipe.mode == ("base_xvector" if ref_frames is None else "base_icl")


@pytest.mark.parametrize("variant,method,kwargs,req", [
    ("1.7b-custom_voice", "generate_custom_voice", dict(speaker="vivian", language="English", non_streaming_mode=False),
     SpeechRequest(text=TEXT, speaker="vivian", language="English", non_streaming_mode=False)),
    ("1.7b-custom_voice", "generate_custom_voice", dict(speaker="vivian", language="English", non_streaming_mode=True),
     SpeechRequest(text=TEXT, speaker="vivian", language="English", non_streaming_mode=True)),
    ("1.7b-voice_design", "generate_voice_design", dict(instruct="bright", language="Auto", non_streaming_mode=False),
     SpeechRequest(text=TEXT, instructions="bright", language="Auto", non_streaming_mode=False)),
])
def test_decode_step_inputs_follow_the_text_track(variant, method, kwargs, req, official, ours):
    """Every decode forward's input = S(previous frame) + P(trailing text[k] or PAD)."""
    codes, steps = official_generate_trace(
        official(variant), method, text=TEXT, do_sample=False, subtalker_dosample=False, max_new_tokens=24, **kwargs,
    )
    comp, tok = ours(variant)
    recipe = build_prompt(comp.config, tok, req)
    assert len(steps) >= 20
    frames = torch.stack([s["codes"] for s in steps])
    text_ids = torch.tensor([recipe.text_addend_id(k) for k in range(len(steps))])
    with torch.no_grad():
        mine = comp.embeddings.decode_input(frames, text_ids)
    torch.testing.assert_close(mine, torch.stack([s["inputs_embeds"] for s in steps]), atol=ATOL, rtol=0)
    assert torch.equal(frames[: codes.shape[0]], codes)


def test_requests_a_checkpoint_cannot_serve_are_refused(ours):
    cv06, tok = ours("0.6b-custom_voice")
    with pytest.raises(PromptError, match="does not support instructions"):
        build_prompt(cv06.config, tok, SpeechRequest(text="hi", speaker="ryan", instructions="whisper"))
    with pytest.raises(PromptError, match="unknown speaker 'alloy'"):
        build_prompt(cv06.config, tok, SpeechRequest(text="hi", speaker="alloy"))
    with pytest.raises(PromptError, match="unsupported language 'klingon'"):
        build_prompt(cv06.config, tok, SpeechRequest(text="hi", speaker="ryan", language="klingon"))
    with pytest.raises(PromptError, match="unsupported language 'sichuan_dialect'"):
        build_prompt(cv06.config, tok, SpeechRequest(text="hi", speaker="ryan", language="sichuan_dialect"))
    with pytest.raises(PromptError, match="empty"):
        build_prompt(cv06.config, tok, SpeechRequest(text="   ", speaker="ryan"))
    base, tok = ours("0.6b-base")
    with pytest.raises(PromptError, match="reference voice"):
        build_prompt(base.config, tok, SpeechRequest(text="hi"))
    with pytest.raises(PromptError, match="x-vector has 3 values"):
        build_prompt(base.config, tok, SpeechRequest(text="hi", xvector=[0.0, 1.0, 2.0]))
    h = base.config.talker.decoder.hidden_size
    with pytest.raises(PromptError, match="ref_text"):
        build_prompt(base.config, tok, SpeechRequest(text="hi", xvector=[0.0] * h, ref_codes=[[0] * 16]))
    vd, tok = ours("1.7b-voice_design")
    with pytest.raises(PromptError, match="no preset speakers"):
        build_prompt(vd.config, tok, SpeechRequest(text="hi", speaker="ryan"))
