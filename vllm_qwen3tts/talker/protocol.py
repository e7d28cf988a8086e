"""What travels from the API process to the talker worker with each request.

vLLM carries it in `SamplingParams.extra_args["qwen3_tts"]` (msgpack-serialisable
plain data), and the worker parses it in `add_request`. The prompt token ids
themselves are placeholders (`codec_pad_id` repeated L times): the talker's
inputs are embeddings built from the recipe, and placeholder ids inside the
suppressed range keep vLLM's repetition penalty on generated codes only, as in
the reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..base.params import SUBTALKER_TEMPERATURE, SUBTALKER_TOP_K, SUBTALKER_TOP_P
from ..base.params import PromptError
from ..model.prompt import PromptRecipe

EXTRA_ARGS_KEY = "qwen3_tts"
NUM_CODE_LOGPROBS = 15  # logprobs=15 gives 16 entries per position: code 0 and codes 1..15
# Codebook j travels as id code + j * CODE_ID_STRIDE. Without the offsets a frame whose
# codes repeat a value loses entries: when a client reads a stream more slowly than it is
# produced, vLLM merges the pending outputs through per-position dicts keyed by token id.
CODE_ID_STRIDE = 4096


@dataclass(frozen=True)
class SubtalkerParams:
    """Sampling of the code predictor (codebooks 1..15). temperature 0 = greedy."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0

    def validate(self) -> None:
        """ParamError (a PromptError) unless every field is within its request parameter's bounds."""
        SUBTALKER_TEMPERATURE.check(self.temperature)
        SUBTALKER_TOP_K.check(self.top_k)
        SUBTALKER_TOP_P.check(self.top_p)


@dataclass
class TalkerRequest:
    recipe: PromptRecipe
    subtalker: SubtalkerParams = field(default_factory=SubtalkerParams)
    seed: int | None = None  # code-predictor draws; None: the worker picks one
    # False while more text may come (an incremental request): a frame whose next step would need
    # a text token the recipe does not have yet ends the turn with HOLD instead of stepping on.
    input_closed: bool = True
    # Every turn of an incremental request (`TTSEngine.stream_text`): vLLM moves the frames of
    # earlier turns into the prompt, so the talker's prompt is the recipe's, not vLLM's.
    incremental: bool = False
    # An incremental request's EOS is held back by the talker (`TalkerState.mask_early_eos`) until
    # this frame, not by vLLM's min_tokens: that would hold back its HOLD stop too.
    min_frames: int = 0

    def to_extra_args(self) -> dict[str, Any]:
        return {
            EXTRA_ARGS_KEY: {
                "recipe": self.recipe.to_dict(),
                "subtalker": [self.subtalker.temperature, self.subtalker.top_k, self.subtalker.top_p],
                "seed": self.seed,
                "input_closed": self.input_closed,
                "incremental": self.incremental,
                "min_frames": self.min_frames,
            }
        }

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> "TalkerRequest":
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            raise PromptError("request carries no Qwen3-TTS conditioning (extra_args['qwen3_tts'])")
        d = extra_args[EXTRA_ARGS_KEY]
        try:
            t, k, p = d.get("subtalker", (0.9, 50, 1.0))
            sub = SubtalkerParams(float(t), int(k), float(p))
            seed = d.get("seed")
            return cls(PromptRecipe.from_dict(d["recipe"]), sub, None if seed is None else int(seed),
                       bool(d.get("input_closed", True)), bool(d.get("incremental", False)),
                       int(d.get("min_frames", 0)))
        except PromptError:
            raise
        except Exception as e:  # malformed payload from a client we do not control
            raise PromptError(f"malformed Qwen3-TTS conditioning: {e}") from e

    def cache_salt(self) -> str:
        """Prefix-cache salt: KV blocks depend on the embeddings, which token ids do not show."""
        payload = json.dumps(self.recipe.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


def hold_token_id(talker_cfg) -> int:
    """The token an incremental request's turn ends with when its next frame needs text that has
    not arrived (`TalkerState.hold_mask`): the codec BOS id, a control id the talker never samples
    (suppressed), put in place of the frame's code 0 for vLLM only. It is a stop id of such
    requests, so vLLM pauses their streaming-input session there."""
    return talker_cfg.codec_bos_id


@dataclass(frozen=True)
class Code0Params:
    """Sampling of codebook 0 (done by vLLM). temperature 0 = greedy."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05


def talker_sampling_params(
    req: TalkerRequest, code0: Code0Params, max_frames: int, eos_id: int, seed: int | None = None,
    min_frames: int = 2, hold_id: int | None = None,
):
    """vLLM SamplingParams that reproduce the reference's codebook-0 pipeline.

    min_tokens=2 keeps EOS out of the first two samples (min_frames = max_frames
    forces the length, for benchmarks on random weights); stop on EOS; the
    suppression of other control ids happens inside the model. `max_frames`
    bounds the frames produced (the reference's max_new_tokens minus one: its
    last sample is never expanded into a frame, ours always is).

    `hold_id`: a turn of an incremental request (`TTSEngine.stream_text`), which also stops on
    HOLD, and whose `max_frames` counts this turn's frames only. Such a turn has no min_tokens:
    vLLM would not stop on HOLD before it (a turn may hold at its first frame), so the talker
    keeps EOS back itself (`TalkerRequest.min_frames`) and `min_frames` is ignored here.
    """
    from ..base.vllm_adapter import RequestOutputKind, SamplingParams

    return SamplingParams(
        temperature=code0.temperature,
        top_k=code0.top_k if code0.top_k > 0 else -1,
        top_p=code0.top_p,
        repetition_penalty=code0.repetition_penalty,
        max_tokens=max_frames,
        min_tokens=0 if hold_id is not None else min(max(2, min_frames), max_frames),
        stop_token_ids=[eos_id] if hold_id is None else [eos_id, hold_id],
        # The text tokenizer's EOS (<|im_end|>, 151645) is not a talker id: vLLM would add it
        # to the min_tokens mask of a 3072-entry vocabulary and fail inside the worker.
        ignore_eos=True,
        seed=seed,
        logprobs=NUM_CODE_LOGPROBS,
        flat_logprobs=True,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=req.to_extra_args(),
    )


def codes_as_logprobs(codes, template):
    """Each frame's 16 codes as the 16 sample-logprob token ids of its position
    (codebook j offset by j * CODE_ID_STRIDE; see there)."""
    import torch

    from ..base.vllm_adapter import LogprobsTensors

    dtype = template.logprob_token_ids.dtype if template is not None else torch.int64
    offsets = torch.arange(codes.shape[1], device=codes.device, dtype=codes.dtype) * CODE_ID_STRIDE
    n = codes.shape[0]
    return LogprobsTensors(
        logprob_token_ids=(codes + offsets).to(dtype),
        logprobs=torch.zeros(codes.shape, dtype=torch.float32, device=codes.device),
        selected_token_ranks=torch.zeros(n, dtype=torch.int64, device=codes.device),
    )


def frames_from_output(completion, eos_id: int) -> list[list[int]]:
    """The 16-code frames carried by a (delta) CompletionOutput; the EOS sample is not a frame."""
    lp = completion.logprobs
    if lp is None:
        return []
    frames = []
    for i in range(len(completion.token_ids)):
        ids = lp.token_ids[lp.start_indices[i] : lp.end_indices[i]]
        if len(ids) != NUM_CODE_LOGPROBS + 1:
            raise RuntimeError(f"expected {NUM_CODE_LOGPROBS + 1} codes per frame, got {len(ids)}")
        frame = [int(c) - j * CODE_ID_STRIDE for j, c in enumerate(ids)]
        if frame[0] != eos_id:
            frames.append(frame)
    return frames
