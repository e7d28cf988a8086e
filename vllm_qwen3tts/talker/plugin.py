"""`vllm.general_plugins` entry point: makes vLLM understand Qwen3-TTS checkpoints.

Runs in every vLLM process (API server, engine core, workers, the model
inspection subprocess), possibly several times; it must be idempotent, fast and
CUDA-free.
"""

from __future__ import annotations

import logging

RELEASED_ARCH = "Qwen3TTSForConditionalGeneration"  # what released config.json files name
PLUGIN_ARCH = "Qwen3TTSPluginTalker"  # always ours: --hf-overrides '{"architectures": ["Qwen3TTSPluginTalker"]}'
MODEL_MODULE = "vllm_qwen3tts.talker.model"
MODEL_CLASS = f"{MODEL_MODULE}:Qwen3TTSTalkerForVLLM"


def register() -> None:
    from transformers import AutoConfig

    from ..base.vllm_adapter import ModelRegistry, install_prompt_token_check
    from ..tools.stack_sampler import start_from_env
    from .hf_config import Qwen3TTSConfig

    start_from_env()  # diagnostics, off unless QWEN3TTS_STACK_SAMPLES_DIR is set
    log_through_vllm()
    AutoConfig.register("qwen3_tts", Qwen3TTSConfig, exist_ok=True)
    ModelRegistry.register_model(PLUGIN_ARCH, MODEL_CLASS)
    # vllm-omni registers the released name too; never take it from another plugin.
    existing = getattr(ModelRegistry, "models", {}).get(RELEASED_ARCH)
    if existing is None or getattr(existing, "module_name", MODEL_MODULE) == MODEL_MODULE:
        ModelRegistry.register_model(RELEASED_ARCH, MODEL_CLASS)
    install_prompt_token_check(check_prompt_token_ids)


def check_prompt_token_ids(token_ids: list[int], vocab_size: int) -> None:
    """Refuse a prompt with an id outside the talker's vocabulary [0, vocab_size) with vLLM's
    request-validation error (HTTP 400 on its routes; 0.26 and 0.32 alike). vLLM checks ids
    against a tokenizer, and the talker runs without one, so such an id reached the worker,
    where the repetition penalty indexed past the vocabulary and the engine core died."""
    from ..base.vllm_adapter import VLLMValidationError

    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= vocab_size:
        raise VLLMValidationError(f"prompt token id {low if low < 0 else high} is outside the talker's "
                                  f"vocabulary [0, {vocab_size})", parameter="prompt_token_ids")


def log_through_vllm() -> None:
    """Our modules' log lines (`vllm_qwen3tts.*`) go where vLLM's go, at vLLM's level. vLLM gives
    only its own `vllm` logger a handler, so in its engine process our INFO lines (the talker's
    set-up, the frame graphs' capture) were dropped. Left alone when vLLM's logging is off
    (VLLM_CONFIGURE_LOGGING=0: the application's own configuration applies) or already routed."""
    ours, theirs = logging.getLogger("vllm_qwen3tts"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False
