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

from ..prompt import PromptError, PromptRecipe

EXTRA_ARGS_KEY = "qwen3_tts"
NUM_CODE_LOGPROBS = 15  # logprobs=15 gives 16 entries per position: code 0 and codes 1..15


@dataclass(frozen=True)
class SubtalkerParams:
    """Sampling of the code predictor (codebooks 1..15). temperature 0 = greedy."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0

    def validate(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise PromptError(f"subtalker temperature {self.temperature} out of range [0, 100]")
        if self.top_k < 0:
            raise PromptError(f"subtalker top_k {self.top_k} must be >= 0 (0 disables)")
        if not (0.0 < self.top_p <= 1.0):
            raise PromptError(f"subtalker top_p {self.top_p} must be in (0, 1]")


@dataclass
class TalkerRequest:
    recipe: PromptRecipe
    subtalker: SubtalkerParams = field(default_factory=SubtalkerParams)
    seed: int | None = None  # code-predictor draws; None: the worker picks one

    def to_extra_args(self) -> dict[str, Any]:
        return {
            EXTRA_ARGS_KEY: {
                "recipe": self.recipe.to_dict(),
                "subtalker": [self.subtalker.temperature, self.subtalker.top_k, self.subtalker.top_p],
                "seed": self.seed,
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
            return cls(PromptRecipe.from_dict(d["recipe"]), sub, None if seed is None else int(seed))
        except PromptError:
            raise
        except Exception as e:  # malformed payload from a client we do not control
            raise PromptError(f"malformed Qwen3-TTS conditioning: {e}") from e

    def cache_salt(self) -> str:
        """Prefix-cache salt: KV blocks depend on the embeddings, which token ids do not show."""
        payload = json.dumps(self.recipe.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()
