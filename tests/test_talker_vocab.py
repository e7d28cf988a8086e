"""Prompt token ids outside the talker's vocabulary are refused before they reach the engine.

The talker runs without a tokenizer, so vLLM's own id check never ran, and a prompt id past
the codec vocabulary (`POST /v1/completions {"prompt": [999999]}` once did it) made the
worker index past the vocabulary in the repetition penalty: the engine core died. The request
goes here straight to vLLM's `AsyncLLM`, as every route and the Python API do.

The same on a GPU (vLLM 0.26, Model Runner V2) with `pytest -m gpu`; on the CPU build the check runs
in test_engine_cpu.py, on that module's engine.
"""

from __future__ import annotations

import uuid

import pytest

from vllm_qwen3tts.engine import Qwen3TTS, SynthesisParams, SynthesisRequest

pytestmark = pytest.mark.engine

def assert_foreign_prompt_ids_are_refused_and_speech_still_served(tts: Qwen3TTS) -> None:
    """The whole check on a running engine (the CPU case runs on test_engine_cpu's engine, which
    saves CI an engine start; the GPU case below starts its own)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    vocab = tts.config.talker.vocab_size

    async def complete(ids: list[int]):
        # a text completion's request, with the penalty that once indexed the prompt's ids
        params = SamplingParams(max_tokens=5, repetition_penalty=1.3)
        outputs = [o async for o in tts._running.llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                 request_id=f"foreign-{uuid.uuid4().hex[:8]}")]
        return outputs[-1]

    for ids in ([999999], [1, 2, vocab], [5, -1]):
        bad = max(ids) if max(ids) >= vocab else min(ids)
        with pytest.raises(VLLMValidationError, match=rf"prompt token id {bad} is outside the talker's vocabulary "
                                             rf"\[0, {vocab}\)"):
            tts._run(complete(ids))
    # ids inside the vocabulary are not refused (the talker ends such a request at once: it
    # carries no speech)
    assert tts._run(complete([0, 1, vocab - 1])).finished
    assert not tts._running.llm.errored
    # and speech is still served
    result = tts.generate([SynthesisRequest("Still serving.", speaker="ryan", language="English",
                                            params=SynthesisParams(temperature=0.0, max_frames=4))])[0]
    assert result.codes.shape == (4, 16) and result.audio.size == 4 * 1920


@pytest.mark.gpu
def test_prompt_ids_outside_the_talker_vocabulary_are_refused_on_the_gpu(tiny_checkpoint):
    # a small share of the GPU lets the test run beside a server
    with Qwen3TTS(tiny_checkpoint("0.6b-custom_voice"), device="cuda", max_model_len=256, max_num_seqs=4,
                  gpu_memory_utilization=0.2) as tts:
        assert_foreign_prompt_ids_are_refused_and_speech_still_served(tts)


def test_the_prompt_check_hooks_a_validation_step_that_vllm_still_has():
    """The check rides on `InputProcessor._validate_model_input(self, prompt_input, prompt_type)`
    (vLLM 0.26 to 0.32): a vLLM that renames it must fail here, not serve unchecked prompts."""
    import inspect

    from vllm.v1.engine.input_processor import InputProcessor

    import vllm_qwen3tts.talker.plugin as talker_plugin

    talker_plugin.register()
    method = InputProcessor._validate_model_input
    assert getattr(method, "qwen3tts_token_check", False)
    assert list(inspect.signature(method.__wrapped__).parameters) == ["self", "prompt_input", "prompt_type"]
