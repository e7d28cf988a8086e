"""The code predictor's fused token-attention kernel computes what its PyTorch attention computes.

On the CPU the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1 must be set
before the kernel is defined, hence a child process); on a GPU, compiled. Run as a script, this
file does the comparison itself: `python tests/test_predictor_kernels.py [cpu|cuda]`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

RELEASED = dict(hidden_size=1024, intermediate_size=3072, num_layers=5, num_heads=16, num_kv_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=65536)


def compare(device: str, dtype: torch.dtype, batch: int = 5) -> float:
    """Largest difference between kernel and PyTorch over every position of a frame, for the
    attention output and the written caches; raises if the two disagree beyond `dtype`'s rounding."""
    from vllm_qwen3tts.code_predictor import Attention
    from vllm_qwen3tts.config import DecoderGeometry
    from vllm_qwen3tts.predictor_kernels import token_attention

    torch.manual_seed(0)
    g = DecoderGeometry(**RELEASED)
    attn = Attention(g).to(device=device, dtype=dtype)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    slots = 16
    inv_freq = 1.0 / (g.rope_theta ** (torch.arange(0, g.head_dim, 2, dtype=torch.float32) / g.head_dim))
    angles = torch.arange(slots, dtype=torch.float32).unsqueeze(-1) * inv_freq
    table = torch.cat((angles, angles), dim=-1).to(device)
    # Entries at and after the new position hold garbage: the kernel must overwrite or mask them.
    cache_k = torch.randn(batch, g.num_kv_heads, slots, g.head_dim, device=device, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    keys = torch.arange(slots, device=device)
    # bf16: the kernel rounds once where PyTorch rounds every intermediate, so up to ~2 ulps apart
    atol, rtol = (1e-5, 0.0) if dtype == torch.float32 else (2e-2, 2**-6)
    worst = 0.0
    for p in range(slots):
        x = torch.randn(batch, 1, g.hidden_size, device=device, dtype=dtype)
        position = torch.full((1,), p, dtype=torch.long, device=device)
        cos, sin = table[position].cos().to(dtype), table[position].sin().to(dtype)
        mask = keys.unsqueeze(0) <= position.unsqueeze(-1)
        ref_k, ref_v = cache_k.clone(), cache_v.clone()
        with torch.no_grad():
            qkv = attn.qkv_proj(x)
            ref = attn.attend(qkv, cos, sin, ref_k, ref_v, position, mask).view(batch, -1)
            out = token_attention(qkv.view(batch, -1), attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos,
                                  sin, position, cache_k, cache_v, g.num_heads)
        for name, a, b in (("output", out, ref), ("cache_k", cache_k, ref_k), ("cache_v", cache_v, ref_v)):
            diff = (a.float() - b.float()).abs()
            excess = (diff - atol - rtol * b.float().abs()).max().item()
            if excess > 0:
                raise AssertionError(f"{name} differs by {diff.max().item()} at position {p} ({dtype})")
            worst = max(worst, diff.max().item())
    return worst


def test_kernel_matches_pytorch_attention_in_triton_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed with this build of torch")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__, "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "float32 max diff" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernel)")
def test_kernel_matches_pytorch_attention_on_gpu():
    compare("cuda", torch.float32)
    compare("cuda", torch.bfloat16, batch=64)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dt in dtypes:
        print(f"{device} {str(dt).removeprefix('torch.')} max diff {compare(device, dt):.3g}")
