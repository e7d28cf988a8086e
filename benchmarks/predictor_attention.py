"""The code predictor's token-attention kernel alone on a GPU: microseconds per call by batch
size and launch shape (`num_warps`), against the PyTorch attention it replaces, and against the
time reading and writing its cache needs at the GPU's memory bandwidth. NOTES §9 found it at
~28 us per call at batch 128, ~10x that bound. Calls are timed inside a CUDA graph, as the engine
runs them: timed as back-to-back launches they measured the launches (30-60 us at every batch).
`--flush-mb N` writes N MB before every call, as the engine's weight streaming does between two
calls (the L2 cache then holds none of the kernel's inputs), and reports the call's time net of
the writes alone.

    python benchmarks/predictor_attention.py --batches 1,64,128 --warps 1,2,4,8 --out attn.json
"""

from __future__ import annotations

import argparse
import json

import torch

from vllm_qwen3tts.code_predictor import Attention
from vllm_qwen3tts.config import DecoderGeometry
from vllm_qwen3tts.predictor_kernels import token_attention

from cuda_timing import cuda_graph_ms_per_call

RELEASED = dict(hidden_size=1024, intermediate_size=3072, num_layers=5, num_heads=16, num_kv_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=65536)
SLOTS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,128")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="H100 SXM HBM3")
    ap.add_argument("--flush-mb", type=int, default=0, help="MB written before every call (0: L2 stays warm)")
    ap.add_argument("--out", default="predictor_attention.json")
    args = ap.parse_args()
    g = DecoderGeometry(**RELEASED)
    dt, dev = torch.bfloat16, "cuda"
    attn = Attention(g).to(device=dev, dtype=dt)
    position = torch.full((1,), 7, dtype=torch.long, device=dev)
    cos = torch.rand(1, g.head_dim, device=dev, dtype=dt)
    sin = torch.rand(1, g.head_dim, device=dev, dtype=dt)
    mask = torch.arange(SLOTS, device=dev).unsqueeze(0) <= position.unsqueeze(-1)
    flush = torch.empty(args.flush_mb * 2**20, dtype=torch.uint8, device=dev) if args.flush_mb else None
    flush_us = 1000 * cuda_graph_ms_per_call(flush.zero_) if flush is not None else 0.0

    def timed_us(fn) -> float:
        if flush is None:
            return 1000 * cuda_graph_ms_per_call(fn)
        return 1000 * cuda_graph_ms_per_call(lambda: (flush.zero_(), fn())) - flush_us

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        qkv = torch.randn(b, (g.num_heads + 2 * g.num_kv_heads) * g.head_dim, device=dev, dtype=dt)
        ck = torch.zeros(b, g.num_kv_heads, SLOTS, g.head_dim, device=dev, dtype=dt)
        cv = torch.zeros_like(ck)
        moved = 2 * ck.numel() * ck.element_size() + qkv.numel() * qkv.element_size()
        bound_us = moved / (args.bandwidth_gbs * 1e3)
        qkv3 = qkv.view(b, 1, -1)
        for w in [int(x) for x in args.warps.split(",")]:
            def kernel(w=w):
                return token_attention(qkv, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin, position,
                                       ck, cv, g.num_heads, num_warps=w)

            us = timed_us(kernel)
            rows.append(dict(batch=b, impl=f"triton num_warps={w}", us=round(us, 2), bandwidth_bound_us=round(bound_us, 2),
                             flush_mb=args.flush_mb))
            print(json.dumps(rows[-1]), flush=True)
        us = timed_us(lambda: attn.attend(qkv3, cos, sin, ck, cv, position, mask))
        rows.append(dict(batch=b, impl="pytorch eager (Attention.attend)", us=round(us, 2),
                         bandwidth_bound_us=round(bound_us, 2), flush_mb=args.flush_mb))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| batch | implementation | us per call | bandwidth bound us |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['impl']} | {r['us']} | {r['bandwidth_bound_us']} |")


if __name__ == "__main__":
    main()
