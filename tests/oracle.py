"""Loads the official implementation (PyPI `qwen-tts-compat`) as the parity oracle.

Three environment gaps are bridged here and nowhere else:
- its 25 Hz tokenizer imports `torchaudio`, `sox` and `onnxruntime` at import time;
  the 12 Hz path never calls them, so empty modules stand in when they are missing;
- on transformers >= 5 the code-predictor config has no `pad_token_id` attribute,
  which its model constructor reads (4.57 defaulted it to None);
- it registers `qwen3_tts` with AutoConfig without `exist_ok`, which fails if our
  vLLM plugin registered the name first in this process (and afterwards the name
  must map to our config class again);
- on transformers 5.19 its RoPE `inv_freq` buffers (non-persistent, so not in the
  checkpoint) come out of `from_pretrained` as uninitialised memory, not zeros, so
  its own zero-check does not repair them; we recompute every one after loading.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from functools import lru_cache


def _stub(name: str) -> None:
    if name in sys.modules or importlib.util.find_spec(name.split(".")[0]) is not None and name.count(".") == 0:
        return
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)


def _can_import(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:
        return False


@lru_cache(maxsize=1)
def qwen_tts():
    for name in ("torchaudio", "sox", "onnxruntime"):
        if not _can_import(name):
            for sub in (name, f"{name}.compliance", f"{name}.compliance.kaldi") if name == "torchaudio" else (name,):
                mod = types.ModuleType(sub)
                mod.__spec__ = importlib.machinery.ModuleSpec(sub, loader=None)
                sys.modules[sub] = mod
                parent, _, child = sub.rpartition(".")
                if parent:
                    setattr(sys.modules[parent], child, mod)
    import qwen_tts as pkg
    from qwen_tts.core.models import configuration_qwen3_tts as cfg

    if not hasattr(cfg.Qwen3TTSTalkerCodePredictorConfig, "pad_token_id"):
        cfg.Qwen3TTSTalkerCodePredictorConfig.pad_token_id = None
    return pkg


def load_official(model_dir, dtype=None):
    """`qwen_tts.Qwen3TTSModel` for a checkpoint directory, on the CPU in float32 by default."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    pkg = qwen_tts()
    original = (AutoConfig.register, AutoModel.register, AutoProcessor.register)

    def tolerant(register):
        def call(*args, **kwargs):
            kwargs["exist_ok"] = True
            return register(*args, **kwargs)

        return call

    AutoConfig.register, AutoModel.register, AutoProcessor.register = (tolerant(r) for r in original)
    try:
        model = pkg.Qwen3TTSModel.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
    finally:
        AutoConfig.register, AutoModel.register, AutoProcessor.register = original
        # Give `qwen3_tts` back to our config class: a vLLM engine started later in this
        # process would otherwise pickle the oracle's config into its spawned engine core.
        from vllm_qwen3tts.talker.hf_config import Qwen3TTSConfig

        AutoConfig.register("qwen3_tts", Qwen3TTSConfig, exist_ok=True)
    model.model.eval()
    for root in (model.model, model.model.speech_tokenizer.model):
        _recompute_rope(root)
    return model


def _recompute_rope(root) -> None:
    import torch

    for module in root.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
            device = next(root.parameters()).device
            inv_freq, module.attention_scaling = module.rope_init_fn(module.config, device)
            module.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            module.original_inv_freq = module.inv_freq


class _Captured(Exception):
    pass


def official_prefill(official, method: str, **kwargs):
    """Run an official `generate_*` wrapper only up to the talker call and return
    (prefill embeddings [L, H], trailing text embeddings [N, H]) of a single request."""
    talker = official.model.talker
    captured = {}

    def capture(**kw):
        captured.update(kw)
        raise _Captured

    original = talker.generate
    talker.generate = capture
    try:
        getattr(official, method)(**kwargs)
    except _Captured:
        pass
    finally:
        talker.generate = original
    return captured["inputs_embeds"][0], captured["trailing_text_hidden"][0]


def official_generate_trace(official, method: str, **kwargs):
    """Run an official `generate_*` wrapper and record, for every talker decode
    forward, its input embedding, the hidden state handed to the code predictor,
    and the frame it completed. Returns (codes [T,16], steps) where steps[k] =
    {"inputs_embeds": [H], "past_hidden": [H], "codes": [16]}."""
    import torch

    talker = official.model.talker
    steps = []

    def pre_hook(module, args, kw):
        if kw.get("past_hidden") is not None and kw.get("input_ids") is not None:
            steps.append({"past_hidden": kw["past_hidden"][0, -1].clone(), "code0": kw["input_ids"][0, -1].clone()})
        return None

    def post_hook(module, args, kw, out):
        if steps and "codes" not in steps[-1] and out.hidden_states[1] is not None:
            steps[-1]["codes"] = out.hidden_states[1][0].clone()
        return None

    def model_pre_hook(module, args, kw):
        if steps and "inputs_embeds" not in steps[-1] and kw["inputs_embeds"].shape[1] == 1:
            steps[-1]["inputs_embeds"] = kw["inputs_embeds"][0, 0].clone()
        return None

    handles = [
        talker.register_forward_pre_hook(pre_hook, with_kwargs=True),
        talker.register_forward_hook(post_hook, with_kwargs=True),
        talker.model.register_forward_pre_hook(model_pre_hook, with_kwargs=True),
    ]
    captured = {}
    original_decode = official.model.speech_tokenizer.decode

    def keep_codes(items):
        captured["codes"] = [it["audio_codes"] for it in items]
        return original_decode(items)

    official.model.speech_tokenizer.decode = keep_codes
    try:
        with torch.no_grad():
            getattr(official, method)(**kwargs)
    finally:
        for h in handles:
            h.remove()
        official.model.speech_tokenizer.decode = original_decode
    return captured["codes"][0], steps


def official_generate(official, method: str, **kwargs):
    """(codes [T, 16], waveform) of one request from an official `generate_*` wrapper."""
    import torch

    captured = {}
    original = official.model.speech_tokenizer.decode

    def keep_codes(items):
        captured["codes"] = items[0]["audio_codes"]
        return original(items)

    official.model.speech_tokenizer.decode = keep_codes
    try:
        with torch.no_grad():
            wavs, _ = getattr(official, method)(**kwargs)
    finally:
        official.model.speech_tokenizer.decode = original
    return captured["codes"], wavs[0]


def official_clone_item(profile):
    """Our voice-clone profile as the official `VoiceClonePromptItem`."""
    import torch

    item_cls = qwen_tts().inference.qwen3_tts_model.VoiceClonePromptItem
    codes = None if profile.ref_codes is None else torch.as_tensor(profile.ref_codes, dtype=torch.long)
    return item_cls(ref_code=codes, ref_spk_embedding=torch.as_tensor(profile.xvector, dtype=torch.float32),
                    x_vector_only_mode=codes is None, icl_mode=codes is not None, ref_text=profile.ref_text)
