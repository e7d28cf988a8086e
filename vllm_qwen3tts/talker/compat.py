"""Everything that differs between the vLLM versions we support, in one place.

Supported: 0.26 (the CUDA build on the GPU machine, Model Runner V2) through
0.32 (the CPU build in CI, Model Runner V1 only: V2 needs Triton kernels). The
MRv2 hooks we override (`DefaultModelState.add_request/remove_request/
prepare_inputs/prepare_dummy_inputs/custom_sampler`) kept their signatures over
that range; `tests/test_vllm_interface.py` checks them against the installed
vLLM so a version bump that moves them fails loudly.
"""

from __future__ import annotations

import re

TESTED_MINOR_VERSIONS = ((0, 26), (0, 32))


def vllm_version() -> tuple[int, int]:
    import vllm

    m = re.match(r"(\d+)\.(\d+)", vllm.__version__)
    if not m:
        raise RuntimeError(f"cannot parse vLLM version {vllm.__version__!r}")
    return int(m.group(1)), int(m.group(2))


def check_vllm_version() -> None:
    version = vllm_version()
    lo, hi = TESTED_MINOR_VERSIONS[0], TESTED_MINOR_VERSIONS[-1]
    if not (lo <= version <= hi):
        import warnings

        warnings.warn(
            f"vllm-qwen3tts is tested with vLLM {lo[0]}.{lo[1]} through {hi[0]}.{hi[1]}; found "
            f"{version[0]}.{version[1]}. The talker relies on Model Runner V2 internals "
            "(DefaultModelState, InputBatch, SamplerOutput.logprobs_tensors).",
            stacklevel=2,
        )


def uses_model_runner_v2(vllm_config) -> bool:
    # 0.26 and 0.32 both record the choice on VllmConfig.
    return bool(getattr(vllm_config, "use_v2_model_runner", False))


def engine_errored(engine_client) -> bool:
    """Whether vLLM's engine client can no longer serve: its engine core process died, or it was
    shut down. `EngineClient.errored` on 0.26 and 0.32 alike (AsyncLLM: the core marked dead, or
    its output handler ended)."""
    return bool(engine_client.errored)


def vllm_api_key_middleware_tokens(middleware) -> list[str] | None:
    """The keys of vLLM's API-key middleware (`AuthenticationMiddleware(app, tokens)`, added for
    `--api-key` / VLLM_API_KEY; in `vllm.entrypoints.serve.utils.server_utils` in 0.26,
    `vllm.entrypoints.serve.middleware.authenticate` in 0.32) if `middleware` (a Starlette
    `Middleware` entry) is it, else None."""
    cls = middleware.cls
    if getattr(cls, "__name__", "") != "AuthenticationMiddleware" or not cls.__module__.startswith("vllm."):
        return None
    tokens = middleware.kwargs.get("tokens")
    if tokens is None:
        raise RuntimeError(f"vLLM's {cls.__module__}.AuthenticationMiddleware no longer takes tokens=; "
                           "update vllm_qwen3tts.talker.compat for this vLLM version")
    return [tokens] if isinstance(tokens, str) else list(tokens)


def install_prompt_token_check(check) -> None:
    """Have vLLM's input processor run `check(prompt_token_ids, vocab_size)` on every prompt of
    a Qwen3-TTS model, in the process that submits it, before it reaches the engine: whatever
    the route or API, a refused prompt is an error of that request (HTTP 400 on vLLM's
    routes). vLLM's own id check needs a tokenizer, which the talker runs without.
    0.26 and 0.32 both validate each prompt in `InputProcessor._validate_model_input(self,
    prompt_input, prompt_type)`; idempotent."""
    import functools

    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_model_input
    if getattr(original, "qwen3tts_token_check", False):
        return

    @functools.wraps(original)
    def _validate_model_input(self, prompt_input, prompt_type):
        original(self, prompt_input, prompt_type)
        if getattr(self.model_config.hf_config, "model_type", None) == "qwen3_tts":
            token_ids = prompt_input.get("prompt_token_ids")
            if token_ids:
                check(token_ids, self.model_config.get_vocab_size())

    _validate_model_input.qwen3tts_token_check = True
    InputProcessor._validate_model_input = _validate_model_input
