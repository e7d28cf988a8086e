"""The PyTorch components that surround the talker (embeddings, head, code predictor), assembled from a
checkpoint directory outside vLLM (tests and tools)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.code_predictor import CodePredictor
from ..base.config import TTSConfig, load_tts_config
from ..model.talker_io import CodecHead, TalkerEmbeddings
from ..base.weight_loading import read_safetensors


@dataclass
class TalkerComponents:
    """The talker's embeddings, head and code predictor (its decoder layers live in vLLM)."""

    config: TTSConfig
    embeddings: TalkerEmbeddings
    head: CodecHead
    code_predictor: CodePredictor


def load_talker_components(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TalkerComponents:
    cfg = load_tts_config(model_dir)
    with torch.device(device):
        embeddings = TalkerEmbeddings(cfg.talker)
        head = CodecHead(cfg.talker)
        predictor = CodePredictor(cfg.talker)
    weights = list(read_safetensors(Path(model_dir) / "model.safetensors", "talker.", what="weight file"))
    for module in (embeddings, head, predictor):
        module.load_weights(weights)
        module.to(dtype).eval().requires_grad_(False)
    return TalkerComponents(cfg, embeddings, head, predictor)
