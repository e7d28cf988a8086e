"""Every convolution of one codec decoder call, timed alone at its real shape, in the decoder's
layout (conv1d on [B, C, T]) and as conv2d on channels-last tensors, with the cuDNN kernels each
runs. `codec_kernels.py` found one cuDNN kernel without tensor cores (`implicit_convolve_sgemm`)
taking ~40% of a call's GPU time at 8 streams x 25 frames; this says which convolutions run it,
at which batch sizes, and whether the channels-last layout avoids it.

    python benchmarks/codec_convs.py --model DIR --shapes 8x25,64x25 --out codec_convs.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vllm_qwen3tts.codec.decoder import CodecDecoder

from cuda_timing import cuda_ms_per_call


def record_convs(dec: CodecDecoder, batch: int, frames: int) -> list[tuple]:
    """(op, input shape, weight shape, stride, dilation, groups) of every conv in one call, in order."""
    calls: list[tuple] = []
    conv1d, conv_transpose1d = F.conv1d, F.conv_transpose1d

    def record_conv1d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        calls.append(("conv1d", tuple(x.shape), tuple(w.shape), stride, dilation, groups))
        return conv1d(x, w, b, stride, padding, dilation, groups)

    def record_conv_transpose1d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        calls.append(("conv_transpose1d", tuple(x.shape), tuple(w.shape), stride, dilation, groups))
        return conv_transpose1d(x, w, b, stride, padding, output_padding, groups, dilation)

    codes = torch.zeros(batch, frames, dec.config.num_quantizers, dtype=torch.long, device=dec.pre_conv.weight.device)
    F.conv1d, F.conv_transpose1d = record_conv1d, record_conv_transpose1d
    try:
        with torch.inference_mode():
            dec.decode_chunk(codes, dec.new_stream_state(batch))
    finally:
        F.conv1d, F.conv_transpose1d = conv1d, conv_transpose1d
    return calls


def kernel_names(fn) -> list[str]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key[:90] for e in prof.key_averages() if e.count]


def runners(op: str, x_shape, w_shape, stride: int, dilation: int, groups: int, dtype) -> dict:
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype) * 0.02
    x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    w4 = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    if op == "conv1d":
        return {"ncl": lambda: F.conv1d(x, w, None, stride, 0, dilation, groups),
                "nhwc": lambda: F.conv2d(x4, w4, None, (1, stride), 0, (1, dilation), groups)}
    return {"ncl": lambda: F.conv_transpose1d(x, w, None, stride),
            "nhwc": lambda: F.conv_transpose2d(x4, w4, None, (1, stride))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shapes", default="8x25,64x25", help="streams x frames")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="codec_convs.json")
    args = ap.parse_args()
    dtype = torch.bfloat16
    dec = CodecDecoder.from_checkpoint(args.model, "cuda", dtype)
    rows = []
    for shape in args.shapes.split(","):
        batch, frames = (int(v) for v in shape.split("x"))
        calls = record_convs(dec, batch, frames)
        for key in dict.fromkeys(calls):  # unique, in call order
            row = dict(shape=shape, op=key[0], x=list(key[1]), w=list(key[2]), stride=key[3], dilation=key[4],
                       groups=key[5], calls=calls.count(key))
            for layout, fn in runners(*key, dtype).items():
                row[f"{layout}_us"] = round(1000 * cuda_ms_per_call(fn, args.iters), 1)
                row[f"{layout}_kernels"] = kernel_names(fn)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("kernels")}), flush=True)
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| shape | op | input | weight | dilation | calls | NCL us | NHWC us | NCL kernels |\n|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["ncl_us"] * r["calls"]):
        kernels = "; ".join(k[:40] for k in r["ncl_kernels"])
        print(f"| {r['shape']} | {r['op']} | {r['x']} | {r['w']} | {r['dilation']} | {r['calls']} | {r['ncl_us']} | "
              f"{r['nhwc_us']} | {kernels} |")


if __name__ == "__main__":
    main()
