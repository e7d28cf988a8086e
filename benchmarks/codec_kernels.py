"""The codec decoder on a GPU, variant by variant: what one call of the worker's graphed
gather-decode-scatter costs at several (streams x frames) shapes, and which kernels one call runs.

NOTES §10 found the decoder at ~66 us per frame at its best batch and ~100 us at 8 x 25 frames,
while its convolutions need ~16 us: this says where the rest goes and what each candidate change
does to it. Variants (comma-separated, each may end in `+convt-gemm`):

- `activations`: SnakeBeta compiled, the rest eager (what the worker ran until now);
- `whole`: `decode_chunk` compiled as one graph (`CodecDecoder.compile_whole`);
- `eager`: nothing compiled;
- `...+nhwc`: every conv and transposed conv as conv2d on channels-last (NHWC) tensors, what
  cuDNN's tensor-core kernels take (`CodecDecoder.use_channels_last`);
- `...+convt-gemm`: every transposed conv computed as a plain conv over its input frames (kernel
  = kernel / stride taps, stride x more output channels) and an interleave of the outputs, in
  case cuDNN's transposed-conv kernels are the slow part (an experiment, patched in here only).

For each variant: compile and graph-capture seconds, then per shape the milliseconds per call as
the worker sees them (codes to the GPU, replay, audio to the host), audio-seconds per second and
the largest difference from the first variant's audio; and for one shape a torch profile of eager
calls (kernel names, calls and GPU microseconds per decoder call).

    python benchmarks/codec_kernels.py --model DIR --shapes 2x2,8x25,64x25 --variants activations,whole \
        --profile-shape 8x25 --out codec_kernels.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vllm_qwen3tts.codec.decoder import CausalConvTranspose1d, CodecDecoder, CodecDecoderConfig
from vllm_qwen3tts.codec.pooled_decoder import DecodeGrid, PooledDecoder


def transposed_conv_as_conv(self: CausalConvTranspose1d, x: torch.Tensor, carry) -> torch.Tensor:
    """Output sample t * s + j of a kernel-(taps * s), stride-s transposed conv is a plain conv over
    input frames t .. t + taps - 1 (the carried ones first) into output channel (o, j)."""
    new_frames = x.shape[-1]
    if self.context > 0:
        x = carry.extend(x, self.context)
    weight, bias = self.gemm_weight, self.gemm_bias
    y = F.conv1d(x, weight, bias)  # [B, C_out * s, new_frames]
    batch, channels = y.shape[0], y.shape[1] // self.stride
    return y.view(batch, channels, self.stride, new_frames).transpose(2, 3).reshape(batch, channels, -1)


def set_gemm_weights(conv: CausalConvTranspose1d) -> None:
    c_in, c_out, kernel = conv.weight.shape
    s, taps = conv.stride, kernel // conv.stride
    # tap m of the plain conv reads input frame t + m, which reaches output t through weight
    # row (taps - 1 - m) * s + j of the transposed conv
    w = conv.weight.view(c_in, c_out, taps, s).flip(2).permute(1, 3, 0, 2).reshape(c_out * s, c_in, taps)
    conv.gemm_weight = w.contiguous()
    conv.gemm_bias = conv.bias.repeat_interleave(s).contiguous()


def build(model: str, variant: str, device: str = "cuda", dtype=torch.bfloat16) -> CodecDecoder:
    base, *extras = variant.split("+")
    dec = CodecDecoder.from_checkpoint(model, device, dtype)
    for extra in extras:
        if extra == "convt-gemm":
            for m in dec.modules():
                if isinstance(m, CausalConvTranspose1d):
                    set_gemm_weights(m)
                    m.forward_chunk = transposed_conv_as_conv.__get__(m)
        elif extra == "nhwc":
            dec.use_channels_last()
        else:
            raise SystemExit(f"unknown variant suffix {extra!r}")
    if base == "activations":
        dec.compile_activations()
    elif base == "whole":
        dec.compile_whole()
    elif base != "eager":
        raise SystemExit(f"unknown variant {base!r}")
    return dec


def kernel_profile(pooled: PooledDecoder, batch: int, frames: int, calls: int = 3) -> dict:
    """Kernels of `calls` eager gather-decode-scatter calls, per call."""
    from torch.profiler import ProfilerActivity, profile

    dev = pooled.device
    idx = torch.arange(batch, device=dev)
    codes = torch.randint(0, pooled.decoder.config.codebook_size, (batch, frames, pooled.num_quantizers), device=dev)
    lengths = torch.full((batch,), frames, device=dev)
    for _ in range(2):
        pooled._decode_rows(idx, codes, lengths)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            pooled._decode_rows(idx, codes, lengths)
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0 or e.count == 0:
            continue
        kernels.append(dict(name=e.key[:160], calls=round(e.count / calls, 2), us=round(us / calls, 1)))
    kernels.sort(key=lambda k: -k["us"])
    total = sum(k["us"] for k in kernels)
    return dict(shape=f"{batch}x{frames}", kernel_us_per_call=round(total, 1),
                kernels_per_call=round(sum(k["calls"] for k in kernels), 1), kernels=kernels)


def snr_db(x: np.ndarray, reference: np.ndarray) -> float:
    noise = float(np.sum((x.astype(np.float64) - reference) ** 2))
    return round(10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise), 1) if noise else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shapes", default="2x2,8x25,64x25", help="streams x frames per call")
    ap.add_argument("--variants", default="activations,whole")
    ap.add_argument("--profile-shape", default="8x25", help="'' for no kernel profile")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", help="float32 to check a variant's audio against the first's")
    ap.add_argument("--out", default="codec_kernels.json")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    grid = DecodeGrid(tuple(sorted({b for b, _ in shapes})), tuple(sorted({n for _, n in shapes})))
    streams = max(grid.batch_sizes)
    config = CodecDecoderConfig.from_model_dir(args.model)
    rng = np.random.default_rng(0)
    # the same codes for every variant, so that their audio can be compared
    codes_of = {(b, n): [rng.integers(0, config.codebook_size, (n, config.num_quantizers)) for _ in range(b)]
                for b, n in shapes}
    results, reference = [], {}
    for variant in args.variants.split(","):
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        dec = build(args.model, variant, dtype=getattr(torch, args.dtype))
        pooled = PooledDecoder(dec, streams, grid)
        with torch.inference_mode():
            # the first decode compiles (if anything is compiled): time it apart from the capture
            pooled.reset(0)
            pooled.decode([0, 1], [np.zeros((grid.chunk_lengths[-1], dec.config.num_quantizers), np.int64)] * 2,
                          grid.chunk_lengths[-1])
            compile_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            pooled.capture_graphs()
            capture_s = time.perf_counter() - t1
        summary = dict(variant=variant, load_and_compile_s=round(compile_s, 1), capture_s=round(capture_s, 1),
                       gpu_reserved_gib=round(torch.cuda.memory_reserved() / 2**30, 2))
        summary["dynamo_graphs_compiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        print(json.dumps(summary), flush=True)
        rows = []
        for b, n in shapes:
            codes = codes_of[(b, n)]
            with torch.inference_mode():
                for r in range(b):
                    pooled.reset(r)
                first = np.stack(pooled.decode(list(range(b)), codes, n))
                for _ in range(2):
                    pooled.decode(list(range(b)), codes, n)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    pooled.decode(list(range(b)), codes, n)
                dt = (time.perf_counter() - t0) / args.iters
            reference.setdefault((b, n), first)
            row = dict(variant=variant, batch=b, frames=n, ms_per_call=round(1000 * dt, 2),
                       us_per_frame=round(1e6 * dt / (b * n), 1), audio_s_per_s=round(b * n / 12.5 / dt, 1),
                       max_abs_diff_vs_first_variant=float(np.abs(first - reference[(b, n)]).max()),
                       snr_db_vs_first_variant=snr_db(first, reference[(b, n)]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.profile_shape:
            pb, pn = (int(v) for v in args.profile_shape.split("x"))
            with torch.inference_mode():
                summary["profile"] = kernel_profile(pooled, pb, pn)
            p = summary["profile"]
            print(f"{variant}: {p['kernels_per_call']} kernels, {p['kernel_us_per_call']} us of GPU time per eager "
                  f"call at {p['shape']}", flush=True)
            for k in p["kernels"][:25]:
                print(f"  {k['us']:9.1f} us {k['calls']:7.1f} x  {k['name'][:110]}", flush=True)
        results.append(dict(summary=summary, rows=rows))
        Path(args.out).write_text(json.dumps(dict(shapes=args.shapes, dtype=args.dtype, results=results), indent=1))
        del pooled, dec
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    print(f"\n{args.dtype}\n| variant | shape | ms/call | us/frame | audio-s/s | max diff | SNR dB |\n|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["rows"]:
            print(f"| {row['variant']} | {row['batch']}x{row['frames']} | {row['ms_per_call']} | {row['us_per_frame']} | "
                  f"{row['audio_s_per_s']} | {row['max_abs_diff_vs_first_variant']:.2e} | {row['snr_db_vs_first_variant']} |")


if __name__ == "__main__":
    main()
