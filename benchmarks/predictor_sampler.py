"""The code predictor's sampler alone on a GPU: microseconds per draw (one sub-step, a row of
2,048 bf16 logits per request) by batch size, for the fused Triton kernel at each launch shape
with its searches as they are (16-bit keys, ending at a count of exactly k) and as they were
(`full_search`: 32 rounds of 32-bit keys), and for the PyTorch sampler it replaces, eager and
compiled (what the frame graphs held before).
Timed inside a CUDA graph, as the engine runs them. Settings are the released defaults
(temperature 0.9, top-k 50, top-p 1.0) unless `--top-p` says otherwise.

    python benchmarks/predictor_sampler.py --batches 1,64,128,256 --warps 1,2,4,8 --out sampler.json
"""

from __future__ import annotations

import argparse
import json

import torch

from vllm_qwen3tts.predictor_kernels import fused_sample
from vllm_qwen3tts.sampling import SamplingTensors, sample

from cuda_timing import cuda_graph_ms_per_call

VOCAB = 2048


def _sample(logits, temperature, top_k, top_p, seed, counter):
    return sample(logits, SamplingTensors(temperature, top_k, top_p, seed), counter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,128,256")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default="predictor_sampler.json")
    args = ap.parse_args()
    dev = "cuda"
    compiled = torch.compile(_sample, dynamic=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        p = SamplingTensors.uniform(b, dev, temperature=0.9, top_k=50, top_p=args.top_p, seed=1)
        p.seed.copy_(torch.randint(0, 2**62, (b,), device=dev))
        logits = torch.randn(b, VOCAB, device=dev).mul(3).to(torch.bfloat16)
        counter = torch.arange(b, device=dev, dtype=torch.long)
        flat = (logits, p.temperature, p.top_k, p.top_p, p.seed, counter)
        same = bool((fused_sample(*flat) == compiled(*flat)).float().mean() > 0.99)
        same_searches = torch.equal(fused_sample(*flat), fused_sample(*flat, full_search=True))
        impls = [(f"triton{' full_search' if full else ''} num_warps={w}",
                  lambda w=w, full=full: fused_sample(*flat, num_warps=w, full_search=full))
                 for full in (False, True) for w in [int(x) for x in args.warps.split(",")]]
        impls += [("pytorch eager", lambda: _sample(*flat)), ("pytorch compiled", lambda: compiled(*flat))]
        for name, fn in impls:
            us = 1000 * cuda_graph_ms_per_call(fn)
            rows.append(dict(batch=b, impl=name, us=round(us, 2), top_p=args.top_p, agrees_with_compiled=same,
                             searches_draw_alike=same_searches))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| batch | implementation | us per draw |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['impl']} | {r['us']} |")


if __name__ == "__main__":
    main()
