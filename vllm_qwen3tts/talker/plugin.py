"""`vllm.general_plugins` entry point: makes vLLM understand Qwen3-TTS checkpoints.

Runs in every vLLM process (API server, engine core, workers, the model
inspection subprocess), possibly several times; it must be idempotent, fast and
CUDA-free.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.qwen3tts.talker")  # under vLLM's logger: its handler and level apply

RELEASED_ARCH = "Qwen3TTSForConditionalGeneration"  # what released config.json files name
PLUGIN_ARCH = "Qwen3TTSPluginTalker"  # always ours: --hf-overrides '{"architectures": ["Qwen3TTSPluginTalker"]}'
MODEL_MODULE = "vllm_qwen3tts.talker.model"
MODEL_CLASS = f"{MODEL_MODULE}:Qwen3TTSTalkerForVLLM"
SPEECH_PLUGIN = "qwen3_tts_speech"  # our `vllm.endpoint_plugins` entry point (server/plugin.py)


def register() -> None:
    from transformers import AutoConfig

    from ..base.vllm_adapter import (ModelRegistry, autoload_endpoint_plugin, install_model_config_hook,
                                     install_prompt_token_check, install_session_rollback)
    from ..tools.stack_sampler import start_from_env
    from .hf_config import Qwen3TTSConfig

    start_from_env()  # diagnostics, off unless QWEN3TTS_STACK_SAMPLES_DIR is set
    log_through_vllm()
    AutoConfig.register("qwen3_tts", Qwen3TTSConfig, exist_ok=True)
    ModelRegistry.register_model(PLUGIN_ARCH, MODEL_CLASS)
    architectures = (PLUGIN_ARCH,)
    # vllm-omni registers the released name too; never take it from another plugin.
    existing = getattr(ModelRegistry, "models", {}).get(RELEASED_ARCH)
    if existing is None or getattr(existing, "module_name", MODEL_MODULE) == MODEL_MODULE:
        ModelRegistry.register_model(RELEASED_ARCH, MODEL_CLASS)
        architectures += (RELEASED_ARCH,)
    install_prompt_token_check(check_prompt_token_ids)
    install_session_rollback()  # incremental requests under vLLM 0.26's async scheduling
    # plain `vllm serve ID`: the engine configured for the talker, the speech routes served
    install_model_config_hook(architectures, configure_model, configure_engine)
    autoload_endpoint_plugin(SPEECH_PLUGIN)


def configure_model(model_config) -> None:
    """What the talker needs of vLLM's model configuration, set when vLLM builds it, so plain
    `vllm serve` needs no flag: no text tokenizer (the talker reads embeddings built from a
    recipe, its prompt ids are placeholders, and with no tokenizer no text route can send ids
    outside its vocabulary), and float32 on the CPU build (its kernels serve the talker in
    float32 only)."""
    import torch

    from ..base.vllm_adapter import current_platform

    if not model_config.skip_tokenizer_init:
        model_config.skip_tokenizer_init = True
        logger.info("qwen3_tts: the talker runs without a text tokenizer (as --skip-tokenizer-init)")
    if current_platform.device_type == "cpu" and model_config.dtype != torch.float32:
        logger.info("qwen3_tts: float32 on the CPU build (not %s)", model_config.dtype)
        model_config.dtype = torch.float32


def configure_engine(vllm_config) -> None:
    """What the speech server needs of vLLM's engine configuration: priority scheduling (each
    tenant's share of the batch; an explicit fcfs cannot be told from vLLM's default and is
    replaced too). The speech settings of `--additional-config '{"qwen3tts": {...}}'` are
    checked here, before the engine starts, and taken out of the engine's copy: they are the
    API server's (it reads its own arguments), and vLLM hashes the additional config into its
    compile-cache keys."""
    from ..base.settings import ADDITIONAL_CONFIG_KEY, ServerSettings, with_options

    scheduler = vllm_config.scheduler_config
    if scheduler.policy != "priority":
        logger.info("qwen3_tts: priority scheduling (as --scheduling-policy priority), for fair tenants")
        scheduler.policy = "priority"
    extra = vllm_config.additional_config
    if isinstance(extra, dict) and ADDITIONAL_CONFIG_KEY in extra:
        with_options(ServerSettings(), extra[ADDITIONAL_CONFIG_KEY])  # SettingsError now, not after the engine
        vllm_config.additional_config = {k: v for k, v in extra.items() if k != ADDITIONAL_CONFIG_KEY}


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
