"""Layers shared by the code predictor and the codec (decoder and encoder): RMSNorm, LayerScale,
the gated MLP and rotary position embedding. The attention blocks and causal convs stay with
their models: each differs in math (caching, masking, padding), not in one argument."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in fp32, casts back to the activation dtype, then applies the weight (HF order:
    the reference's numerics, which matter where errors compound over steps)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerScale(nn.Module):
    """A per-channel scale of a residual branch: `scale * x`."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class GatedMLP(nn.Module):
    """SwiGLU: `down_proj(silu(gate) * up)`, gate and up from one fused projection (`gate_up_proj`:
    the gate's rows, then the up rows; `weight_loading.STACKED_PARAMS` fills it from the checkpoint's
    two)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


# ----------------------------------------------------------------------------------------------
# rotary position embedding (the half-split layout of Qwen3 and Mimi, not GPT-J's interleaved one)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The inverse frequencies [head_dim / 2], fp32. Callers keep them out of module buffers (or
    recompute them) so that casting a module to bf16 never rounds them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., head_dim] of integer `positions` [...]: angles in fp32, cast to `dtype`
    only at the end (the reference's order)."""
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, n, head_dim] rotated by cos / sin, which broadcast against it ([n, head_dim],
    or [B, 1, n, head_dim] for per-row positions)."""
    return x * cos + rotate_half(x) * sin
