"""One Triton kernel for the code predictor's token step: everything between the QKV and the
output projections.

Per layer and sub-step the predictor attends one new token to a 16-entry cache. Written in
PyTorch that is a q/k RMSNorm, RoPE, two cache writes, two tiny batched matmuls, a masked
softmax and a few copies: ~8 kernels of a few microseconds each, 80 times per talker step
(16 sub-steps x 5 layers), most of the step at large batches (benchmarks/NOTES.md §5). Here
one program per (row, KV head) does all of it in registers: the cache holds 16 x 128 values
per head, so nothing needs tiling.

Numerics follow `code_predictor.Attention`: the norms normalise in fp32, cast to the activation
dtype, then apply the weight; RoPE uses the cos/sin rows already cast to the activation dtype.
Intermediates stay in fp32 where PyTorch would round them to bf16 (as Inductor's fused kernels
also do), so bf16 results differ from eager PyTorch by rounding only.

`QWEN3TTS_PREDICTOR_KERNELS=0` keeps the PyTorch attention on the GPU too.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of vLLM may come without Triton; the PyTorch path serves there
    triton = None


def use_kernel(x: torch.Tensor, head_dim: int, slots: int) -> bool:
    """Whether the token step's attention runs as the Triton kernel for this activation and cache
    (whose sizes Triton needs as powers of two)."""
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (triton is not None and x.is_cuda and power_of_two(head_dim) and power_of_two(slots)
            and os.environ.get("QWEN3TTS_PREDICTOR_KERNELS", "1") != "0")


if triton is not None:

    @triton.jit
    def _token_attention_kernel(
        qkv_ptr,  # [B, (H + 2 * KV) * D]: q heads, then k heads, then v heads
        q_norm_ptr, k_norm_ptr,  # [D]
        cos_ptr, sin_ptr,  # [D]: the rows of the new token's position, in the activation dtype
        position_ptr,  # [1] int64
        cache_k_ptr, cache_v_ptr,  # [B, KV, S, D], contiguous
        out_ptr,  # [B, H * D]
        qkv_row_stride, out_row_stride,
        eps, scale,
        H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, S: tl.constexpr, GROUP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        d = tl.arange(0, D)
        # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] otherwise
        half = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        position = tl.load(position_ptr)
        cos = tl.load(cos_ptr + d).to(tl.float32)
        sin = tl.load(sin_ptr + d).to(tl.float32)
        base = qkv_ptr + row * qkv_row_stride

        # the new key: RMSNorm (fp32, cast, weight), RoPE
        k_off = (H + kv) * D
        k = tl.load(base + k_off + d).to(tl.float32)
        k_half = tl.load(base + k_off + half).to(tl.float32)
        k_rms = tl.rsqrt(tl.sum(k * k, axis=0) / D + eps)
        k = (k * k_rms).to(dtype).to(tl.float32) * tl.load(k_norm_ptr + d).to(tl.float32)
        k_half = (k_half * k_rms).to(dtype).to(tl.float32) * tl.load(k_norm_ptr + half).to(tl.float32)
        k = (k * cos + sign * k_half * sin).to(dtype)
        v = tl.load(base + (H + KV + kv) * D + d)

        # write the new entry, and use it from registers (a load after the store in the same
        # program is not ordered without a barrier)
        s = tl.arange(0, S)
        cache_off = (row * KV + kv) * S * D + s[:, None] * D + d[None, :]
        new = s[:, None] == position
        keys = tl.where(new, k[None, :], tl.load(cache_k_ptr + cache_off))
        values = tl.where(new, v[None, :], tl.load(cache_v_ptr + cache_off))
        tl.store(cache_k_ptr + (row * KV + kv) * S * D + position * D + d, k)
        tl.store(cache_v_ptr + (row * KV + kv) * S * D + position * D + d, v)
        keys = keys.to(tl.float32)
        values = values.to(tl.float32)
        visible = s <= position

        # the GROUP query heads that share this KV head, one after another
        for g in tl.static_range(GROUP):
            head = kv * GROUP + g
            q = tl.load(base + head * D + d).to(tl.float32)
            q_half = tl.load(base + head * D + half).to(tl.float32)
            q_rms = tl.rsqrt(tl.sum(q * q, axis=0) / D + eps)
            q = (q * q_rms).to(dtype).to(tl.float32) * tl.load(q_norm_ptr + d).to(tl.float32)
            q_half = (q_half * q_rms).to(dtype).to(tl.float32) * tl.load(q_norm_ptr + half).to(tl.float32)
            q = (q * cos + sign * q_half * sin).to(dtype).to(tl.float32)
            scores = tl.sum(keys * q[None, :], axis=1) * scale
            scores = tl.where(visible, scores, float("-inf"))
            probs = tl.exp(scores - tl.max(scores, axis=0))
            probs = probs / tl.sum(probs, axis=0)
            out = tl.sum(values * probs[:, None], axis=0)
            tl.store(out_ptr + row * out_row_stride + head * D + d, out.to(dtype))


def token_attention(
    qkv: torch.Tensor,  # [B, (H + 2 * KV) * D]
    q_norm: torch.Tensor,  # [D]
    k_norm: torch.Tensor,
    eps: float,
    cos: torch.Tensor,  # [D], activation dtype
    sin: torch.Tensor,
    position: torch.Tensor,  # [1] int64
    cache_k: torch.Tensor,  # [B, KV, S, D], written at `position`
    cache_v: torch.Tensor,
    heads: int,
    num_warps: int = 1,
) -> torch.Tensor:
    """Attention output of one new token per row, [B, H * D]; the new k and v go into the caches.
    (`num_warps`: the launch shape; benchmarks/predictor_attention.py times the choices.)"""
    b = qkv.shape[0]
    _, kv_heads, slots, head_dim = cache_k.shape
    out = torch.empty((b, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    _token_attention_kernel[(b, kv_heads)](
        qkv, q_norm, k_norm, cos, sin, position, cache_k, cache_v, out,
        qkv.stride(0), out.stride(0), eps, head_dim**-0.5,
        H=heads, KV=kv_heads, D=head_dim, S=slots, GROUP=heads // kv_heads,
        num_warps=num_warps,
    )
    return out
