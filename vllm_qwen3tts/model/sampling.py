"""Batched, per-row, seeded sampling with no host synchronisation.

Randomness comes from a counter-based hash of (seed, counter, vocabulary index)
turned into Gumbel noise, so a row's sample depends only on its own seed and
position, never on which other requests share the batch, and the whole thing
is plain tensor math that CUDA graphs can capture (no generator state, no
`.item()`).

The logits pipeline follows Hugging Face's order: temperature, then top-k
(keep values >= the k-th largest, ties kept), then top-p (drop the low tail
whose cumulative probability is <= 1 - top_p, keeping at least one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


@dataclass
class SamplingTensors:
    """Per-row sampling parameters; `temperature <= 0` means greedy for that row."""

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64; <= 0 or >= vocab disables
    top_p: torch.Tensor  # [B] float32; >= 1 disables
    seed: torch.Tensor  # [B] int64

    @classmethod
    def uniform(cls, batch: int, device, temperature: float, top_k: int, top_p: float, seed: int = 0) -> "SamplingTensors":
        return cls(
            temperature=torch.full((batch,), float(temperature), device=device),
            top_k=torch.full((batch,), int(top_k), device=device, dtype=torch.long),
            top_p=torch.full((batch,), float(top_p), device=device),
            seed=torch.full((batch,), int(seed), device=device, dtype=torch.long),
        )

    def select(self, idx: torch.Tensor) -> "SamplingTensors":
        return SamplingTensors(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.seed[idx])


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for 0 <= a < 2^32 without overflowing int64."""
    lo = a & 0xFFFF
    hi = a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit integer hash (lowbias32); x holds values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """Uniform floats in (0, 1), shape [B, n], a pure function of (seed[b], counter[b], column)."""
    col = torch.arange(n, device=seed.device, dtype=torch.long)
    s_lo = (seed & _MASK32).unsqueeze(-1)
    s_hi = ((seed >> 32) & _MASK32).unsqueeze(-1)
    ctr = (counter & _MASK32).unsqueeze(-1)
    x = _hash32(col.unsqueeze(0) ^ _hash32(ctr ^ _hash32(s_hi ^ _hash32(s_lo))))
    x = _hash32(x ^ 0x9E3779B9)
    # 24 random bits, centred in their bucket; the top bucket's centre rounds to 1.0 in float32
    # (whose Gumbel noise is inf), so it is held just below 1
    return (((x >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp(max=BELOW_ONE)


def process_logits(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Temperature, top-k and top-p applied per row; masked entries become -inf.

    Greedy rows are returned unscaled (their argmax is what matters).
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = params.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    scaled = logits / temp.unsqueeze(-1)

    # One ascending sort serves both filters: the k-th largest value is asc[vocab - k], and top-k
    # masks a prefix of the ascending order, so the masked values stay sorted for top-p.
    asc, asc_idx = scaled.sort(dim=-1, descending=False)
    k = params.top_k.clamp(min=0)
    k = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)
    kth = asc.gather(-1, (vocab - k).unsqueeze(-1))
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    asc = asc.masked_fill(asc < kth, float("-inf"))

    use_top_p = (params.top_p < 1.0) & ~greedy
    # HF semantics on the ascending sort: remove the prefix with cumulative prob <= 1 - top_p,
    # always keeping the largest entry. Computed for all rows, applied where top_p < 1.
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - params.top_p).unsqueeze(-1)
    remove[..., -1] = False
    remove = remove & use_top_p.unsqueeze(-1)
    remove_orig = torch.zeros_like(remove).scatter(-1, asc_idx, remove)
    return scaled.masked_fill(remove_orig, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingTensors, counter: torch.Tensor) -> torch.Tensor:
    """One token id per row: argmax for greedy rows, Gumbel-max over the processed logits otherwise.

    `counter` [B] distinguishes successive draws of the same request (e.g. frame
    index * 16 + codebook), so re-running a request reproduces its samples.
    """
    processed = process_logits(logits, params)
    greedy = params.temperature <= 0
    u = uniform_noise(params.seed, counter, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    noisy = torch.where(greedy.unsqueeze(-1), processed, processed + gumbel)  # greedy rows never see the noise
    return noisy.argmax(dim=-1)
