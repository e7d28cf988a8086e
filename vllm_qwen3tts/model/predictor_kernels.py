"""Triton kernels for the code predictor's sub-steps: the token step's attention, its small-batch
projections, and the sampler.

**Attention** (`token_attention`): everything between the QKV and the output projections.

Per layer and sub-step the predictor attends one new token to a 16-entry cache. Written in
PyTorch that is a q/k RMSNorm, RoPE, two cache writes, two tiny batched matmuls, a masked
softmax and a few copies: ~8 small kernels, 80 times per talker step (16 sub-steps x 5 layers).
Here one program per (row, KV head) does all of it in registers: the cache holds 16 x 128 values
per head, so nothing needs tiling.

Numerics follow `code_predictor.Attention`: the norms normalise in fp32, cast to the activation
dtype, then apply the weight; RoPE uses the cos/sin rows already cast to the activation dtype.
Intermediates stay in fp32 where PyTorch would round them to bf16 (as Inductor's fused kernels
also do), so bf16 results differ from eager PyTorch by rounding only.

**Sampler** (`fused_sample`): temperature, top-k, top-p and the Gumbel-max draw of
`sampling.sample` for one row per program. In PyTorch that is a sort of the 2,048 logits,
gathers, a scatter, a softmax, a cumsum and the hash noise: ~10 kernels, 15 times per talker
step. Here the row stays in registers and the k-th largest value and the top-p cut are found by
bisection on the values' bit patterns (a count or a sum over the row per round) instead of
sorting. The predictor's logits are bf16, so the keys are their 16 bits (16 rounds at most, where
fp32 needs 32), and the top-k search stops as soon as a count is exactly k, which at 2,048 logits
usually comes before the last round (bf16 logits often tie at the k-th value, and then it runs
all 16).
Same result as `sampling.sample`: identical noise bits (the same integer hash), IEEE division by
the temperature, top-k ties kept. Top-p keeps an entry when the probability of the entries
above it is < top_p, which is the reference's cumulative-sum rule evaluated by a sum in another
order: the two can disagree only on an entry whose cumulative probability is within rounding of
1 - top_p, and on tied values at the cut (kept here, cut by sort order there).

**Small-batch projections** (`small_linear`): at a few rows per step every projection of the
token step is a matrix-vector product that only has to stream its weights once, which cuBLAS
does well below the memory bandwidth, and the RMSNorms, SiLU and residual adds between them are
kernels of their own (~9 kernels per layer and sub-step). Here a layer is 5 kernels: each
projection applies the norm or the SiLU gate to its input as it loads it, and adds the residual
to its output before storing it. Each program loads its whole [columns, K] slice of the weight at
once and reduces it in registers, one row after another, so its time grows with the rows: it is
used up to `small_batch_rows()` rows (2 by default), the batches at which it beats cuBLAS.
Numerics as PyTorch's: the normed, gated and summed values are rounded to the activation dtype
where PyTorch rounds them; only the dot products' summation order differs.

`QWEN3TTS_PREDICTOR_KERNELS=0` keeps PyTorch's attention, sampler and projections on the GPU too;
a comma list (`attention`, `sampler`, `linear`) keeps just those as Triton.
"""

from __future__ import annotations

import os

import torch

from ..base.settings import process_settings

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the CPU build of vLLM may come without Triton; the PyTorch path serves there
    triton = None


def kernel_chosen(kernel: str) -> bool:
    """Whether the settings (QWEN3TTS_PREDICTOR_KERNELS: 1, the default, all; 0 none; or a comma list
    of names) choose `kernel` ("attention", "sampler", "linear" or "talker_linear")."""
    return process_settings().tuning.kernel_chosen(kernel)


def kernels_enabled(x: torch.Tensor, kernel: str) -> bool:
    """Whether `kernel` runs as Triton for tensors like x (`kernel_chosen`, CUDA, Triton)."""
    return triton is not None and x.is_cuda and kernel_chosen(kernel)


def use_kernel(x: torch.Tensor, head_dim: int, slots: int, group: int) -> bool:
    """Whether the token step's attention runs as the Triton kernel for this activation, cache and
    number of query heads per KV head (sizes Triton needs as powers of two)."""
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return kernels_enabled(x, "attention") and power_of_two(head_dim) and power_of_two(slots) and power_of_two(group)


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
        g = tl.arange(0, GROUP)
        s = tl.arange(0, S)
        # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] otherwise
        half = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        base = qkv_ptr + row * qkv_row_stride
        heads = kv * GROUP + g  # the GROUP query heads that share this KV head
        cache_off = (row * KV + kv) * S * D + s[:, None] * D + d[None, :]

        # Every load first: a warp issues its instructions in order and waits at the first use of
        # a load, so a load written after a reduction would start only once the loads before it
        # have arrived. In the engine the weights streamed between two calls evict this kernel's
        # inputs from L2, so each such wait would be an HBM round trip.
        position = tl.load(position_ptr)
        k_off = (H + kv) * D
        k = tl.load(base + k_off + d).to(tl.float32)
        k_half = tl.load(base + k_off + half).to(tl.float32)
        v = tl.load(base + (H + KV + kv) * D + d)
        q = tl.load(base + heads[:, None] * D + d[None, :]).to(tl.float32)  # [GROUP, D]
        q_half = tl.load(base + heads[:, None] * D + half[None, :]).to(tl.float32)
        k_w = tl.load(k_norm_ptr + d).to(tl.float32)
        k_w_half = tl.load(k_norm_ptr + half).to(tl.float32)
        q_w = tl.load(q_norm_ptr + d).to(tl.float32)
        q_w_half = tl.load(q_norm_ptr + half).to(tl.float32)
        cos = tl.load(cos_ptr + d).to(tl.float32)
        sin = tl.load(sin_ptr + d).to(tl.float32)
        cached_keys = tl.load(cache_k_ptr + cache_off)
        cached_values = tl.load(cache_v_ptr + cache_off)

        # the new key: RMSNorm (fp32, cast, weight), RoPE
        k_rms = tl.rsqrt(tl.sum(k * k, axis=0) / D + eps)
        k = (k * k_rms).to(dtype).to(tl.float32) * k_w
        k_half = (k_half * k_rms).to(dtype).to(tl.float32) * k_w_half
        k = (k * cos + sign * k_half * sin).to(dtype)

        # write the new entry, and use it from registers (a load after the store in the same
        # program is not ordered without a barrier)
        new = s[:, None] == position
        keys = tl.where(new, k[None, :], cached_keys).to(tl.float32)
        values = tl.where(new, v[None, :], cached_values).to(tl.float32)
        tl.store(cache_k_ptr + (row * KV + kv) * S * D + position * D + d, k)
        tl.store(cache_v_ptr + (row * KV + kv) * S * D + position * D + d, v)
        visible = s <= position

        # the queries: RMSNorm and RoPE as the key's, each row on its own
        q_rms = tl.rsqrt(tl.sum(q * q, axis=1) / D + eps)
        q = (q * q_rms[:, None]).to(dtype).to(tl.float32) * q_w[None, :]
        q_half = (q_half * q_rms[:, None]).to(dtype).to(tl.float32) * q_w_half[None, :]
        q = (q * cos[None, :] + sign[None, :] * q_half * sin[None, :]).to(dtype).to(tl.float32)

        # the GROUP query heads one after another (a [GROUP, S, D] product would hold GROUP
        # copies of the cache in registers)
        for i in tl.static_range(GROUP):
            q_i = tl.sum(tl.where(g[:, None] == i, q, 0.0), axis=0)
            scores = tl.sum(keys * q_i[None, :], axis=1) * scale
            scores = tl.where(visible, scores, float("-inf"))
            probs = tl.exp(scores - tl.max(scores, axis=0))
            probs = probs / tl.sum(probs, axis=0)
            out = tl.sum(values * probs[:, None], axis=0)
            tl.store(out_ptr + row * out_row_stride + (kv * GROUP + i) * D + d, out.to(dtype))


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
) -> torch.Tensor:
    """Attention output of one new token per row, [B, H * D]; the new k and v go into the caches."""
    b = qkv.shape[0]
    _, kv_heads, slots, head_dim = cache_k.shape
    out = torch.empty((b, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    _token_attention_kernel[(b, kv_heads)](
        qkv, q_norm, k_norm, cos, sin, position, cache_k, cache_v, out,
        qkv.stride(0), out.stride(0), eps, head_dim**-0.5,
        H=heads, KV=kv_heads, D=head_dim, S=slots, GROUP=heads // kv_heads,
        num_warps=1,  # one warp: the fastest launch shape inside the engine's CUDA graphs
    )
    return out


# ------------------------------------------------------------------------ small-batch projections

def small_batch_rows() -> int:
    """Rows up to which `small_linear` replaces cuBLAS in this process (the batch buckets at or below
    it take the fused path): the settings' QWEN3TTS_SMALL_BATCH_ROWS, by default 2, the batches at
    which it is the faster of the two; 0: never."""
    return process_settings().tuning.small_batch_rows


_WEIGHT_TILE_ELEMENTS = 16384  # per program, held in registers as fp32: 64 KB over its 8 or 16 warps


def use_small_linear(x: torch.Tensor, rows: int | None = None) -> bool:
    """Whether the projections of `rows` rows like x (default: x [rows, ...]) run as `small_linear`."""
    return kernels_enabled(x, "linear") and (x.shape[0] if rows is None else rows) <= small_batch_rows()


if triton is not None:

    @triton.jit
    def _small_linear_kernel(
        x_ptr, w_ptr, out_ptr,  # x [M, K] (or [M, 2K]: gate, then up), w [N, K], out [M, N]
        norm_ptr, residual_ptr,  # [K], [M, N]: read only where PROLOGUE / RESIDUAL say so
        M, N, x_row_stride, residual_row_stride, out_row_stride, eps,
        K: tl.constexpr, K_PAD: tl.constexpr,
        PROLOGUE: tl.constexpr,  # 0: x as it is; 1: RMSNorm(x) * norm; 2: silu(gate) * up
        RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        dtype = out_ptr.dtype.element_ty
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kk = tl.arange(0, K_PAD)
        k_ok = kk < K
        # The program's whole [BLOCK_N, K] slice of the weight in one load: all of it in flight at
        # once. (Walking K tile by tile, one dependent load after another, ran at 0.2-1.1 TB/s.)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        if PROLOGUE == 1:
            norm = tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        for m in range(M):  # the few rows reuse the slice from registers
            row = x_ptr + m * x_row_stride
            a = tl.load(row + kk, mask=k_ok, other=0.0)
            if PROLOGUE == 1:  # RMSNorm: normalise in fp32, round, apply the weight, round
                a32 = a.to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(a32 * a32, axis=0) / K + eps)
                a = ((a32 * inv_rms).to(dtype).to(tl.float32) * norm).to(dtype)
            if PROLOGUE == 2:  # the MLP's gate: silu(gate), rounded, times up, rounded
                gate = a.to(tl.float32)
                up = tl.load(row + K + kk, mask=k_ok, other=0.0).to(tl.float32)
                a = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
            out = tl.sum(w * a.to(tl.float32)[None, :], axis=1).to(dtype)
            if RESIDUAL:  # residual + projection, as PyTorch adds them: two rounded values, rounded
                r = tl.load(residual_ptr + m * residual_row_stride + cols, mask=col_ok, other=0.0)
                out = (out.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(out_ptr + m * out_row_stride + cols, out, mask=col_ok)


def _columns_per_program(n: int, k_pad: int) -> int:
    # as many programs as SMs or more (132 on an H100/H200), each slice within the register budget
    cap = max(1, _WEIGHT_TILE_ELEMENTS // k_pad)
    block = 1
    while block * 2 <= cap and n // (block * 2) >= 128:
        block *= 2
    return block


def small_linear(
    x: torch.Tensor,  # [M, K], or [M, 2K] (gate, then up) with silu_mul
    weight: torch.Tensor,  # [N, K], as nn.Linear holds it
    *,
    norm_weight: torch.Tensor | None = None,  # [K]: RMSNorm x with this weight first
    eps: float = 0.0,
    silu_mul: bool = False,  # use silu(x[:, :K]) * x[:, K:] as the input
    residual: torch.Tensor | None = None,  # [M, N]: added to the output
) -> torch.Tensor:
    """x @ weight.T [M, N] for a few rows, with the layer's norm or gate applied to x on the way in
    and the residual added on the way out, in one kernel."""
    m = x.shape[0]
    n, k = weight.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_pad = triton.next_power_of_2(k)
    block_n = _columns_per_program(n, k_pad)
    # 16 warps for the projections back to the hidden size (few, wide programs), 8 for the wider
    # projections: the fastest launch shapes found for each
    num_warps = 16 if n <= 1024 else 8
    prologue = 1 if norm_weight is not None else 2 if silu_mul else 0
    _small_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, norm_weight if norm_weight is not None else weight,  # (unread stand-ins: read-only
        residual if residual is not None else x,                            # inputs, never `out`)
        m, n, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), eps,
        K=k, K_PAD=k_pad, PROLOGUE=prologue, RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------- sampler

if triton is not None:

    @triton.jit
    def _hash32(x):
        """lowbias32 on uint32 (wrapping multiplies), as `sampling._hash32`."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _ordered_key(x):
        """int32 keys that order like the float32 values (-0.0 counted as +0.0)."""
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _ordered_key16(raw):
        """int32 keys in [-32768, 32767] that order like the 16-bit floats `raw` (bf16 or fp16;
        -0.0 counted as +0.0). Dividing two distinct 16-bit values by one positive temperature
        in fp32 cannot swap them, nor make them equal unless the quotients overflow or turn
        subnormal (|logit / temperature| beyond ~1e38 or below ~1e-38, far from any top-k cut),
        so these keys order the scaled logits too."""
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32)
        bits = tl.where((bits & 0x7FFF) == 0, 0, bits)
        return tl.where(bits < 0, bits ^ 0x7FFF, bits)

    @triton.jit
    def _sample_kernel(
        logits_ptr, row_stride,  # [B, V]
        temperature_ptr, top_k_ptr, top_p_ptr, seed_ptr, counter_ptr,  # [B] each
        out_ptr,  # [B] int64
        V, BLOCK: tl.constexpr, LIBDEVICE_LOG: tl.constexpr, KEY16: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        valid = cols < V
        raw = tl.load(logits_ptr + row * row_stride + cols, mask=valid, other=float("-inf"))
        t = tl.load(temperature_ptr + row)
        greedy = t <= 0.0
        x = tl.math.div_rn(raw.to(tl.float32), tl.where(greedy, 1.0, t))
        # The searches below bisect on keys: 16 bits for bf16/fp16 logits (16 rounds at most),
        # 32 for fp32 ones.
        if KEY16:
            key = tl.where(valid, _ordered_key16(raw), -2147483647 - 1)
            key_min = -32768
            key_max = 32767
        else:
            key = tl.where(valid, _ordered_key(x), -2147483647 - 1)
            key_min = -2147483647 - 1
            key_max = 2147483647

        # top-k: the k-th largest value is the largest key K with count(key >= K) >= k. A count
        # of exactly k ends the search early: the keys >= mid are then the top k themselves.
        # Greedy draws skip it (the largest value survives any cut), as does top-k off.
        k = tl.load(top_k_ptr + row)
        k = tl.where((k <= 0) | (k >= V), V, k)
        lo = tl.full((), key_min, tl.int64)
        hi = tl.full((), key_max, tl.int64)
        hi = tl.where(greedy | (k == V), lo, hi)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            count = tl.sum(tl.where(valid & (key >= mid), 1, 0), axis=0)
            lo = tl.where(count >= k, mid, lo)
            hi = tl.where(count > k, hi, tl.where(count == k, mid, mid - 1))
        keep = valid & (key >= lo)

        # top-p over the top-k renormalised: keep an entry while the mass above it is < top_p;
        # the kept set is key >= K for the smallest K with mass(key > K) < top_p
        top_p = tl.load(top_p_ptr + row)
        if (top_p < 1.0) & (t > 0.0):
            e = tl.where(keep, tl.exp(x - tl.max(tl.where(keep, x, float("-inf")), axis=0)), 0.0)
            prob = e / tl.sum(e, axis=0)
            lo = tl.full((), key_min, tl.int64)
            hi = tl.full((), key_max, tl.int64)
            while lo < hi:
                mid = lo + (hi - lo) // 2
                above = tl.sum(tl.where(keep & (key > mid), prob, 0.0), axis=0)
                hi = tl.where(above < top_p, mid, hi)
                lo = tl.where(above < top_p, lo, mid + 1)
            keep = keep & (key >= lo)

        # Gumbel-max with the noise of `sampling.uniform_noise`
        seed = tl.load(seed_ptr + row)
        s_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        s_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        ctr = (tl.load(counter_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
        h = _hash32(ctr ^ _hash32(s_hi ^ _hash32(s_lo)))
        n = _hash32(_hash32(cols.to(tl.uint32) ^ h) ^ 0x9E3779B9)
        u = tl.minimum(((n >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 1.0 - 1.0 / 16777216.0)
        if LIBDEVICE_LOG:  # the logf that PyTorch's CUDA log calls
            gumbel = -libdevice.log(-libdevice.log(u))
        else:  # Triton's interpreter has no libdevice
            gumbel = -tl.log(-tl.log(u))
        noisy = tl.where(keep, x, float("-inf")) + tl.where(greedy, 0.0, gumbel)
        tl.store(out_ptr + row, tl.argmax(noisy, axis=0).to(tl.int64))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """`sampling.sample` as one kernel: a token id per row of logits [B, V]."""
    b, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    _sample_kernel[(b,)](logits, logits.stride(0), temperature, top_k, top_p, seed, counter, out, vocab,
                         BLOCK=triton.next_power_of_2(vocab), LIBDEVICE_LOG=os.environ.get("TRITON_INTERPRET") != "1",
                         KEY16=logits.dtype in (torch.bfloat16, torch.float16),
                         num_warps=8)  # 8 warps: the fastest launch shape at the engine's batch sizes
    return out
