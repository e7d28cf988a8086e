"""How frames travel out of vLLM: 16 codes per position in the sample-logprobs channel."""

from __future__ import annotations

import itertools

import torch
from vllm.logprobs import FlatLogprobs, append_logprobs_for_next_position
from vllm.outputs import CompletionOutput, RequestOutput

from vllm_qwen3tts.talker.protocol import NUM_CODE_LOGPROBS, codes_as_logprobs, frames_from_output

EOS = 2150


def delta_output(frames: list[list[int]], finished: bool = False) -> RequestOutput:
    """A DELTA RequestOutput built the way vLLM's output processor builds it."""
    tensors = codes_as_logprobs(torch.tensor(frames), None)
    lp = FlatLogprobs()
    for ids in tensors.logprob_token_ids.tolist():
        append_logprobs_for_next_position(lp, ids, [0.0] * len(ids), itertools.repeat(None), 0, NUM_CODE_LOGPROBS)
    completion = CompletionOutput(index=0, text="", token_ids=[f[0] for f in frames], cumulative_logprob=0.0,
                                  logprobs=lp, finish_reason="stop" if finished else None)
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[0], prompt_logprobs=None,
                         outputs=[completion], finished=finished)


def test_frames_round_trip_including_repeated_codes():
    frames = [[7] * 16, list(range(16)), [3, 3, 9, 9] * 4]
    assert frames_from_output(delta_output(frames).outputs[0], EOS) == frames


def test_frames_survive_vllm_merging_deltas_the_client_has_not_read_yet():
    """AsyncLLM merges pending DELTA outputs through per-position dicts keyed by token id;
    a frame like [5, 5, ...] would collapse to one entry without the per-codebook offsets."""
    first, second = [[5] * 16], [[1, 2, 1, 2] * 4, [9] * 16]
    merged = delta_output(first)
    merged.add(delta_output(second), aggregate=True)
    assert frames_from_output(merged.outputs[0], EOS) == first + second


def test_the_eos_sample_is_not_a_frame():
    frames = [[11] * 16, [EOS] + [0] * 15]
    assert frames_from_output(delta_output(frames, finished=True).outputs[0], EOS) == frames[:1]
