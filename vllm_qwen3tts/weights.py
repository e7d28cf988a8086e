"""Reading checkpoint tensors and assembling the PyTorch components that surround the talker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .code_predictor import CodePredictor
from .config import CheckpointError, TTSConfig, load_tts_config
from .talker_io import CodecHead, TalkerEmbeddings


def safetensors_items(path: str | Path, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in a safetensors file whose name starts with `prefix`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}")
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name.startswith(prefix):
                yield name, f.get_tensor(name)


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
    weights = list(safetensors_items(Path(model_dir) / "model.safetensors", prefix="talker."))
    for module in (embeddings, head, predictor):
        module.load_weights(weights)
        module.to(dtype).eval().requires_grad_(False)
    return TalkerComponents(cfg, embeddings, head, predictor)
