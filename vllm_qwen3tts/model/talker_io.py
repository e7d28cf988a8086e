"""Everything around the talker's decoder layers: input embeddings and output head.

The decoder layers run inside vLLM; these modules turn prompt recipes and
generated frames into the talker's input embeddings, and its final hidden
states into codebook-0 logits. Plain PyTorch, batched, device/dtype agnostic.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..base.config import TalkerConfig
from ..base.weight_loading import load_mapped
from .prompt import NO_REF, NO_TEXT, SPEAKER_VECTOR, PromptRecipe


class TextProjection(nn.Module):
    """Two-layer SiLU MLP mapping text-embedding rows into the talker's width (both layers biased)."""

    def __init__(self, text_hidden: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(nn.functional.silu(self.linear_fc1(x)))


class TalkerEmbeddings(nn.Module):
    """Text track (text embedding + projection) and codec track (1 + 15 codec tables).

    `codec_embedding` embeds codebook-0 codes and every control id; the residual
    tables (codebooks 1..15) are the code predictor's input tables, owned here
    because the next talker input sums all 16 of a frame's embeddings.
    """

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        h = cfg.decoder.hidden_size
        self.cfg = cfg
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)
        self.text_projection = TextProjection(cfg.text_hidden_size, h)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, h)
        self.residual_codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.code_predictor.vocab_size, h) for _ in range(cfg.num_code_groups - 1)
        )

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        """P(x): projected text embedding of text token ids."""
        return self.text_projection(self.text_embedding(ids))

    def frame(self, codes: torch.Tensor) -> torch.Tensor:
        """S(frame): sum of a frame's 16 code embeddings; codes [..., 16] -> [..., H].

        Stacked then reduced in one `sum` (fp32 accumulation, one rounding), as the
        official implementation does, so bf16 results match it bit for bit.
        """
        parts = [self.codec_embedding(codes[..., 0])]
        parts += [table(codes[..., j + 1]) for j, table in enumerate(self.residual_codec_embedding)]
        return torch.stack(parts, dim=-2).sum(dim=-2)

    def decode_input(self, codes: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Input of a decode step: S(frame) + P(text addend); codes [B, 16], text_ids [B]."""
        return self.frame(codes) + self.text(text_ids)

    def prefill(self, recipe: PromptRecipe) -> torch.Tensor:
        """All prefill input embeddings of one request, [L, H]."""
        dev = self.codec_embedding.weight.device
        dtype = self.codec_embedding.weight.dtype
        text_ids = torch.tensor(recipe.text_ids, device=dev)
        codec_ids = torch.tensor(recipe.codec_ids, device=dev)
        ref = torch.tensor(recipe.ref_frames, device=dev)

        has_text = (text_ids != NO_TEXT).unsqueeze(-1)
        x = torch.where(has_text, self.text(text_ids.clamp(min=0)), torch.zeros((), dtype=dtype, device=dev))
        has_codec = (codec_ids >= 0).unsqueeze(-1)
        x = x + torch.where(has_codec, self.codec_embedding(codec_ids.clamp(min=0)), 0.0)
        if recipe.xvector is not None:
            xvec = torch.tensor(recipe.xvector, device=dev, dtype=dtype)
            x = x + torch.where((codec_ids == SPEAKER_VECTOR).unsqueeze(-1), xvec, 0.0)
        if recipe.ref_codes is not None:
            frames = self.frame(torch.tensor(recipe.ref_codes, device=dev))
            x = x + torch.where((ref != NO_REF).unsqueeze(-1), frames[ref.clamp(min=0)], 0.0)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names (`talker.model.*`, `talker.text_projection.*`,
        `talker.code_predictor.model.codec_embedding.*`) -> parameters."""
        mapping = {
            "talker.model.text_embedding.weight": "text_embedding.weight",
            "talker.model.codec_embedding.weight": "codec_embedding.weight",
            "talker.text_projection.linear_fc1.weight": "text_projection.linear_fc1.weight",
            "talker.text_projection.linear_fc1.bias": "text_projection.linear_fc1.bias",
            "talker.text_projection.linear_fc2.weight": "text_projection.linear_fc2.weight",
            "talker.text_projection.linear_fc2.bias": "text_projection.linear_fc2.bias",
        }
        for j in range(self.cfg.num_code_groups - 1):
            mapping[f"talker.code_predictor.model.codec_embedding.{j}.weight"] = f"residual_codec_embedding.{j}.weight"
        return load_mapped(self, weights, mapping)


class CodecHead(nn.Module):
    """Final hidden state -> codebook-0 logits, with every control id but EOS masked.

    The mask is applied in the model (not through vLLM's `allowed_token_ids`,
    which Model Runner V2 caps at 1024 entries), so the talker can never emit
    a control id other than EOS.
    """

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.decoder.hidden_size))
        mask = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        mask[cfg.suppressed_ids()] = True
        self.register_buffer("suppressed", mask, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden, self.weight).float()
        return logits.masked_fill(self.suppressed, float("-inf"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, {"talker.codec_head.weight": "weight"})
