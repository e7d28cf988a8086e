"""The code predictor's small-batch projections on a GPU: microseconds per call of
`predictor_kernels.small_linear` (with the norm, gate or residual it fuses) against cuBLAS
(`F.linear` alone, the norm and the rest not counted), by batch and projection, against the
time streaming the weight needs at the memory bandwidth; a sweep of launch shapes; then one
whole token step of the predictor (5 layers, final norm), fused against the compiled PyTorch
layers the engine used before. Calls are timed inside a CUDA graph, as the engine runs them, and
each call reads a different copy of the weight: in the engine the predictor's 5 layers (157 MB)
stream through the 50 MB L2 cache, so every projection reads its weight from HBM. (The first run,
2026-12-04c, reused one weight: cuBLAS's gate_up took 4.9 us here against 11.7 us in the engine.)

    python benchmarks/predictor_linear.py --batches 1,2,4,8,16,32,64 --out linear.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F

from cuda_timing import cuda_graph_ms_per_call

RELEASED = dict(hidden_size=1024, intermediate_size=3072, num_layers=5, num_heads=16, num_kv_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=65536)


def projections(h: int, inter: int, qkv: int, attn_out: int, vocab: int) -> dict[str, tuple[int, int, str]]:
    """name -> (in, out, fused input/output work)"""
    return {"qkv (+ norm)": (h, qkv, "norm"), "o (+ residual)": (attn_out, h, "residual"),
            "gate_up (+ norm)": (h, 2 * inter, "norm"), "down (+ gate, residual)": (inter, h, "gate"),
            "head": (h, vocab, "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--sweep-batches", default="1,16", help="launch shapes (columns per program, warps) swept at these batches")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="H200 HBM3e")
    ap.add_argument("--out", default="predictor_linear.json")
    args = ap.parse_args()
    from vllm_qwen3tts.predictor_kernels import small_linear

    dt, dev = torch.bfloat16, "cuda"
    g = RELEASED
    shapes = projections(g["hidden_size"], g["intermediate_size"], (g["num_heads"] + 2 * g["num_kv_heads"]) * g["head_dim"],
                         g["num_heads"] * g["head_dim"], 2048)
    rows, sweep = [], []

    def inputs(b: int, k: int, n: int, fused: str):
        x = torch.randn(b, 2 * k if fused == "gate" else k, device=dev, dtype=dt)
        w = ColdWeights(n, k, dt, dev)
        extra = {"norm": dict(norm_weight=torch.ones(k, device=dev, dtype=dt), eps=1e-6),
                 "residual": dict(residual=torch.randn(b, n, device=dev, dtype=dt)),
                 "gate": dict(silu_mul=True, residual=torch.randn(b, n, device=dev, dtype=dt))}.get(fused, {})
        return x, w, extra

    for b in [int(x) for x in args.batches.split(",")]:
        for name, (k, n, fused) in shapes.items():
            x, w, extra = inputs(b, k, n, fused)
            bound_us = w.nbytes / (args.bandwidth_gbs * 1e3)
            fused_us = 1000 * cuda_graph_ms_per_call(lambda: small_linear(x, w.next(), **extra), calls=w.copies)
            xk = x[:, :k].contiguous()
            cublas_us = 1000 * cuda_graph_ms_per_call(lambda: F.linear(xk, w.next()), calls=w.copies)
            rows.append(dict(batch=b, projection=name, small_linear_us=round(fused_us, 2), cublas_us=round(cublas_us, 2),
                             bandwidth_bound_us=round(bound_us, 2)))
            print(json.dumps(rows[-1]), flush=True)
    for b in [int(x) for x in args.sweep_batches.split(",")]:
        for name, (k, n, fused) in shapes.items():
            x, w, extra = inputs(b, k, n, fused)
            timed = []
            for bn, warps in itertools.product((1, 2, 4, 8, 16, 32), (4, 8, 16)):
                us = 1000 * cuda_graph_ms_per_call(lambda: small_linear(x, w.next(), **extra, block_n=bn, num_warps=warps),
                                                   calls=w.copies)
                timed.append((round(us, 2), dict(block_n=bn, num_warps=warps)))
            timed.sort(key=lambda t: t[0])
            sweep.append(dict(batch=b, projection=name, best_us=timed[0][0], best=timed[0][1], top5=timed[:5]))
            print(json.dumps(sweep[-1]), flush=True)
    steps = token_steps([int(x) for x in args.batches.split(",")])
    with open(args.out, "w") as f:
        json.dump(dict(projections=rows, sweep=sweep, token_step=steps), f, indent=1)
    print("\n| batch | projection | small_linear us (fused work included) | cuBLAS us (projection alone) | bandwidth bound us |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['projection']} | {r['small_linear_us']} | {r['cublas_us']} | {r['bandwidth_bound_us']} |")
    print("\n| batch | projection | best launch shape | us | default us |\n|---|---|---|---|---|")
    for s in sweep:
        default = next(r["small_linear_us"] for r in rows if r["batch"] == s["batch"] and r["projection"] == s["projection"])
        print(f"| {s['batch']} | {s['projection']} | {s['best']} | {s['best_us']} | {default} |")
    print("\n| batch | token step, compiled PyTorch layers us | fused layers us |\n|---|---|---|")
    for s in steps:
        print(f"| {s['batch']} | {s['compiled_pytorch_us']} | {s['fused_us']} |")


class ColdWeights:
    """Enough copies of an [n, k] weight to overflow the L2 cache (>= 256 MB in all); `next()` hands
    them out in turn, so calls captured one after another each read theirs from memory."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: str, total_bytes: int = 256 * 2**20):
        self.nbytes = n * k * torch.finfo(dtype).bits // 8
        self.copies = max(20, -(-total_bytes // self.nbytes))
        self.weights = [torch.randn(n, k, device=device, dtype=dtype) * k**-0.5 for _ in range(self.copies)]
        self.calls = 0

    def next(self) -> torch.Tensor:
        self.calls += 1
        return self.weights[self.calls % self.copies]


def token_steps(batches: list[int]) -> list[dict]:
    """One predictor token step (`CodePredictor._token_step`: 5 layers and the final norm) as the
    engine compiles and graphs it, with the small-batch kernels and without them."""
    import torch._dynamo

    from vllm_qwen3tts.code_predictor import CodePredictor
    from vllm_qwen3tts.config import DecoderGeometry
    from vllm_qwen3tts.predictor_kernels import SMALL_BATCH_ROWS

    class Stub:  # just what CodePredictor reads from a TalkerConfig
        def __init__(self):
            geometry = DecoderGeometry(**RELEASED)
            self.code_predictor = type("CP", (), dict(decoder=geometry, vocab_size=2048))()
            self.num_code_groups = 16
            self.decoder = geometry

    predictor = CodePredictor(Stub()).to(device="cuda", dtype=torch.bfloat16)
    pos = predictor._positions(torch.device("cuda"))
    results = []
    chosen = os.environ.get("QWEN3TTS_PREDICTOR_KERNELS")
    for label, kernels in (("compiled_pytorch_us", "attention,sampler"), ("fused_us", "1")):
        os.environ["QWEN3TTS_PREDICTOR_KERNELS"] = kernels
        torch._dynamo.reset()
        step = torch.compile(predictor._token_step, dynamic=True)
        for i, b in enumerate(batches):
            x = torch.randn(b, RELEASED["hidden_size"], device="cuda", dtype=torch.bfloat16)
            cache = predictor._new_cache(b, x.dtype, x.device)
            us = 1000 * cuda_graph_ms_per_call(lambda: step(x, pos[5], cache), calls=16)
            if len(results) <= i:
                results.append(dict(batch=b, small_batch_rows=SMALL_BATCH_ROWS))
            results[i][label] = round(us, 2)
            print(json.dumps(results[i]), flush=True)
    if chosen is None:
        os.environ.pop("QWEN3TTS_PREDICTOR_KERNELS")
    else:
        os.environ["QWEN3TTS_PREDICTOR_KERNELS"] = chosen
    return results


if __name__ == "__main__":
    main()
