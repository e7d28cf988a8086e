"""Loads the official implementation (PyPI `qwen-tts-compat`) as the parity oracle.

Three environment gaps are bridged here and nowhere else:
- its 25 Hz tokenizer imports `torchaudio`, `sox` and `onnxruntime` at import time;
  the 12 Hz path never calls them, so empty modules stand in when they are missing;
- on transformers >= 5 the code-predictor config has no `pad_token_id` attribute,
  which its model constructor reads (4.57 defaulted it to None);
- it registers `qwen3_tts` with AutoConfig without `exist_ok`, which fails if our
  vLLM plugin registered the name first in this process.
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
    model.model.eval()
    return model
