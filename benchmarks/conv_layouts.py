"""How fast the codec vocoder's convolutions run in each memory layout (a GPU micro-benchmark).

The codec decoder spends its time in the vocoder's residual units: a dilated kernel-7 conv and a
pointwise conv per unit, at 768/384/192/96 channels and 32/160/640/1920 steps per frame. The
decoder keeps activations as [batch, channels, time] (conv1d's layout). This times one residual
unit's two convs per block shape, for a batch of streams x frames, as conv1d on [B, C, T] and as
conv2d on channels-last [B, C, 1, T] (what cuDNN's tensor-core kernels prefer), and reports the
achieved TFLOP/s; the answer says whether a channels-last decoder is worth building.

    python benchmarks/conv_layouts.py --streams 64 --frames 25 --out conv_layouts.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cuda_timing import cuda_ms_per_call

# (channels, time steps per codec frame) of the four vocoder blocks of the released decoder
BLOCKS = [(768, 32), (384, 160), (192, 640), (96, 1920)]
KERNEL, DILATION = 7, 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="conv_layouts.json")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for channels, per_frame in BLOCKS:
        t = per_frame * args.frames
        x = torch.randn(args.streams, channels, t + (KERNEL - 1) * DILATION, device=dev, dtype=dt)
        w7 = torch.randn(channels, channels, KERNEL, device=dev, dtype=dt) * 0.02
        w1 = torch.randn(channels, channels, 1, device=dev, dtype=dt) * 0.02
        flops = 2 * args.streams * t * channels * channels * (KERNEL + 1)

        def ncl():
            return F.conv1d(F.conv1d(x, w7, dilation=DILATION), w1)

        x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        w74 = w7.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        w14 = w1.unsqueeze(2).contiguous(memory_format=torch.channels_last)

        def nhwc():
            return F.conv2d(F.conv2d(x4, w74, dilation=(1, DILATION)), w14)

        same = (ncl().float() - nhwc().squeeze(2).float()).abs().max().item()
        for layout, fn in (("conv1d [B,C,T]", ncl), ("conv2d channels-last", nhwc)):
            ms = cuda_ms_per_call(fn, args.iters)
            row = dict(channels=channels, steps=t, layout=layout, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                       us_per_frame=round(1000 * ms / (args.streams * args.frames), 2), max_abs_diff=same)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(streams=args.streams, frames=args.frames, rows=rows), f, indent=1)
    print("\n| channels | layout | ms | TFLOP/s | us per frame |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['channels']} | {r['layout']} | {r['ms']} | {r['tflops']} | {r['us_per_frame']} |")


if __name__ == "__main__":
    main()
