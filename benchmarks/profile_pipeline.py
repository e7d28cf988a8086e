"""Where the time goes, stage by stage, on a GPU (profile before changing anything).

- `codec`: the codec decoder alone, as the codec worker drives it (its PooledDecoder: gather
  rows of the state pool, decode a chunk, scatter the rows back, copy the audio to the host),
  eagerly and replaying CUDA graphs: milliseconds per call and audio-seconds per second by
  batch size and chunk length, and how far the graphed audio is from the eager audio.
- `talker`: the vLLM talker with the code predictor, no codec, no HTTP (in-process engine):
  milliseconds per decode step by batch size (the difference of two forced lengths, so
  prefill cancels), then a torch profile of a few steps at one batch size, split into our
  stages (talker forward, vLLM's sampler, frame completion, input preparation).

    python benchmarks/profile_pipeline.py --model DIR codec --batches 1,16,64,128 --chunks 2,25
    python benchmarks/profile_pipeline.py --model DIR talker --batches 1,64,128 --profile-batch 64

The talker stage also times one request alone from arrival to its first frame (a 1-frame
request: the prefill step) and profiles it (`--prefill-iters`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import time
from pathlib import Path


def bench_codec(args) -> dict:
    """The worker's PooledDecoder: eager, and (unless --no-graphs) replaying CUDA graphs, on the
    same codes from the same states; the graphed audio is checked against the eager audio."""
    import numpy as np
    import torch

    from vllm_qwen3tts.codec.decoder import CodecDecoder
    from vllm_qwen3tts.codec.pooled_decoder import DecodeGrid, PooledDecoder

    dtype = getattr(torch, args.dtype)
    dec = CodecDecoder.from_checkpoint(args.model, args.device, dtype)
    if dec.pre_conv.weight.is_cuda:
        dec.use_channels_last()  # as the codec worker runs it on a GPU
    if not args.eager:
        from vllm_qwen3tts.codec.worker import compile_decoder

        compile_decoder(dec)  # as the codec worker runs it on a GPU
    batches = [int(x) for x in args.batches.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    streams = max(batches)
    modes = {"eager": PooledDecoder(dec, streams)}
    if not args.no_graphs:
        graphed = PooledDecoder(dec, streams, DecodeGrid(tuple(sorted(batches)), tuple(sorted(chunks))))
        t0 = time.perf_counter()
        with torch.inference_mode():
            graphed.capture_graphs()
        print(json.dumps({"graphs_captured": len(graphed.captured_shapes),
                          "capture_s": round(time.perf_counter() - t0, 1),
                          "gpu_reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}), flush=True)
        modes["graphs"] = graphed
    if args.cudnn_benchmark:
        # the same graphs, captured after cuDNN has timed its algorithms for every shape
        torch.backends.cudnn.benchmark = True
        tuned = PooledDecoder(dec, streams, DecodeGrid(tuple(sorted(batches)), tuple(sorted(chunks))))
        t0 = time.perf_counter()
        with torch.inference_mode():
            tuned.capture_graphs()
        print(json.dumps({"graphs_captured_cudnn_benchmark": len(tuned.captured_shapes),
                          "capture_s": round(time.perf_counter() - t0, 1)}), flush=True)
        modes["graphs_cudnn_benchmark"] = tuned
    rng = np.random.default_rng(0)
    rows = []
    for n in chunks:
        for b in batches:
            codes = [rng.integers(0, dec.config.codebook_size, (n, dec.config.num_quantizers)) for _ in range(b)]
            out = {}
            for mode, pooled in modes.items():
                rows_ = list(range(b))
                with torch.inference_mode():
                    for r in rows_:
                        pooled.reset(r)
                    first = pooled.decode(rows_, codes, n)  # same states in every mode: compare these
                    for _ in range(2):
                        pooled.decode(rows_, codes, n)
                    t0 = time.perf_counter()  # decode() returns host arrays: each call is synchronous
                    for _ in range(args.iters):
                        pooled.decode(rows_, codes, n)
                    dt = (time.perf_counter() - t0) / args.iters
                out[mode] = np.stack(first)
                row = dict(mode=mode, batch=b, chunk_frames=n, ms_per_call=round(1000 * dt, 2),
                           audio_s_per_s=round(b * n / 12.5 / dt, 1))
                if mode != "eager":
                    row["max_abs_diff_vs_eager"] = float(np.abs(out[mode] - out["eager"]).max())
                rows.append(row)
                print(json.dumps(row), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return dict(stage="codec", dtype=args.dtype, compiled=not args.eager, rows=rows)


@contextlib.contextmanager
def labelled_stages():
    """Name our stages in the torch profile (record_function ranges around them)."""
    import torch

    from vllm_qwen3tts.talker import model_state_v2
    from vllm_qwen3tts.talker.frame_graphs import FrameCompleter
    from vllm_qwen3tts.talker.model import Qwen3TTSTalkerForVLLM
    from vllm_qwen3tts.talker.state import TalkerState

    patched = []

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            with torch.profiler.record_function(label):
                return original(*a, **k)

        setattr(owner, name, wrapper)
        patched.append((owner, name, original))

    wrap(Qwen3TTSTalkerForVLLM, "forward", "qwen3tts.talker_forward")
    wrap(Qwen3TTSTalkerForVLLM, "compute_logits", "qwen3tts.compute_logits")
    wrap(model_state_v2.TalkerSampler, "__call__", "qwen3tts.sampler_total")
    wrap(FrameCompleter, "__call__", "qwen3tts.frame_completion")
    wrap(model_state_v2.Qwen3TTSModelState, "prepare_inputs", "qwen3tts.prepare_inputs")
    wrap(model_state_v2.Qwen3TTSModelState, "add_request", "qwen3tts.add_request")
    wrap(TalkerState, "embed", "qwen3tts.input_embeddings")
    # vLLM's own steps, where this version has them (names differ between versions)
    for module, owner, name in (("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "execute_model"),
                                ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "sample_tokens"),
                                ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
                                ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output")):
        try:
            cls = getattr(importlib.import_module(module), owner)
        except (ImportError, AttributeError):
            continue
        if hasattr(cls, name):
            wrap(cls, name, f"qwen3tts.vllm.{owner}.{name}")
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def bench_talker(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model runner in this process, for the profiler
    import torch
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from vllm_qwen3tts.base.config import load_tts_config
    from vllm_qwen3tts.model.prompt import SpeechRequest, build_prompt
    from vllm_qwen3tts.talker.protocol import Code0Params, SubtalkerParams, TalkerRequest, talker_sampling_params
    from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer

    cfg = load_tts_config(args.model)
    tok = load_text_tokenizer(args.model)
    batches = [int(x) for x in args.batches.split(",")]
    speaker = cfg.speakers[0] if cfg.speakers else None
    texts = ["The quick brown fox jumps over the lazy dog.", "今天的会议改到下午三点，请大家准时参加。"]

    def requests(b: int, frames: int, seed0: int):
        prompts, params = [], []
        for i in range(b):
            recipe = build_prompt(cfg, tok, SpeechRequest(text=texts[i % 2], speaker=speaker, language="auto",
                                                           instructions=None, non_streaming_mode=False))
            treq = TalkerRequest(recipe, SubtalkerParams(), seed=seed0 + i)
            prompts.append(TokensPrompt(prompt_token_ids=[cfg.talker.codec_pad_id] * len(recipe),
                                        cache_salt=treq.cache_salt()))
            params.append(talker_sampling_params(treq, Code0Params(), frames, cfg.talker.codec_eos_id,
                                                 seed=seed0 + i, min_frames=frames))
        return prompts, params

    t0 = time.time()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, max_num_seqs=max(batches + [args.profile_batch]),
              gpu_memory_utilization=args.gpu_memory_utilization, skip_tokenizer_init=True,
              **({"compilation_config": {"cudagraph_mode": args.cudagraph_mode}} if args.cudagraph_mode else {}))
    startup = time.time() - t0
    rows = []
    short, long = args.frames_short, args.frames_long
    for b in batches:
        llm.generate(*requests(b, 8, 1), use_tqdm=False)  # warm-up of this batch size
        times = {}
        for n in (short, long):
            t0 = time.perf_counter()
            llm.generate(*requests(b, n, 100 * n), use_tqdm=False)
            times[n] = time.perf_counter() - t0
        step_ms = 1000 * (times[long] - times[short]) / (long - short)
        row = dict(batch=b, step_ms=round(step_ms, 2), steps_per_s=round(1000 / step_ms, 1),
                   audio_s_per_s=round(b * 1000 / step_ms / 12.5, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)

    prefill = bench_prefill(llm, requests, args) if args.prefill_iters else None

    profile = None
    if args.profile_batch:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        b, n = args.profile_batch, args.profile_steps
        llm.generate(*requests(b, n, 7), use_tqdm=False)
        with labelled_stages(), torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof:
            t0 = time.perf_counter()
            llm.generate(*requests(b, n, 9), use_tqdm=False)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        ours = {e.key: dict(calls=e.count, cpu_ms=round(e.cpu_time_total / 1000, 2),
                            gpu_ms=round(e.device_time_total / 1000, 2))
                for e in events if e.key.startswith("qwen3tts.")}
        by_gpu = events.table(sort_by="self_device_time_total", row_limit=25)
        by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25)
        gpu_busy_ms = sum(e.self_device_time_total for e in events) / 1000
        profile = dict(batch=b, steps=n, wall_ms=round(1000 * wall, 1), gpu_kernel_ms=round(gpu_busy_ms, 1),
                       stages=ours)
        print(json.dumps(profile, indent=1))
        print(by_gpu)
        print(by_cpu)
        if args.trace:
            prof.export_chrome_trace(args.trace)
        Path(args.out).with_suffix(".tables.txt").write_text(by_gpu + "\n\n" + by_cpu)
    return dict(stage="talker", dtype=args.dtype, startup_s=round(startup, 1), rows=rows, prefill=prefill,
                profile=profile)


def bench_prefill(llm, requests, args) -> dict:
    """One request alone: the wall time of a 1-frame request (its prefill step: the talker over
    the prompt, code 0 sampled, the frame completed) against a 2-frame one (one decode step more),
    then a torch profile of a few 1-frame requests split into our stages, with the GPU's kernel
    time beside the wall time (launch-bound or not)."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    def wall_ms(frames: int) -> list[float]:
        times = []
        for i in range(args.prefill_iters):
            t0 = time.perf_counter()
            llm.generate(*requests(1, frames, 1000 + i), use_tqdm=False)
            times.append(1000 * (time.perf_counter() - t0))
        return times

    wall_ms(1)  # warm-up
    one, two = wall_ms(1), wall_ms(2)
    result = dict(one_frame_ms_median=round(statistics.median(one), 2), one_frame_ms_min=round(min(one), 2),
                  two_frames_ms_median=round(statistics.median(two), 2))
    calls = 5
    with labelled_stages(), torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof:
        t0 = time.perf_counter()
        for i in range(calls):
            llm.generate(*requests(1, 1, 2000 + i), use_tqdm=False)
        wall = (time.perf_counter() - t0) / calls
    events = prof.key_averages()
    result.update(
        profiled_wall_ms=round(1000 * wall, 2),
        gpu_kernel_ms=round(sum(e.self_device_time_total for e in events) / 1000 / calls, 2),
        stages={e.key: dict(cpu_ms=round(e.cpu_time_total / 1000 / calls, 2), gpu_ms=round(e.device_time_total / 1000 / calls, 2))
                for e in events if e.key.startswith("qwen3tts.")},
    )
    print(json.dumps(dict(prefill=result), indent=1), flush=True)
    tables = (events.table(sort_by="cpu_time_total", row_limit=40) + "\n\n"
              + events.table(sort_by="self_device_time_total", row_limit=25))
    print(tables, flush=True)
    Path(args.out).with_suffix(".prefill_tables.txt").write_text(tables)
    if args.trace:
        prof.export_chrome_trace(str(Path(args.trace).with_suffix(".prefill.json")))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--device", default="cuda", help="codec stage only (the talker runs where vLLM runs)")
    sub = ap.add_subparsers(dest="stage", required=True)
    c = sub.add_parser("codec")
    c.add_argument("--batches", default="1,16,64,128")
    c.add_argument("--chunks", default="2,25")
    c.add_argument("--iters", type=int, default=10)
    c.add_argument("--eager", action="store_true", help="no torch.compile")
    c.add_argument("--no-graphs", action="store_true", help="eager decoder calls only")
    c.add_argument("--cudnn-benchmark", action="store_true",
                   help="also graphs captured with torch.backends.cudnn.benchmark on")
    t = sub.add_parser("talker")
    t.add_argument("--batches", default="1,64,128")
    t.add_argument("--frames-short", type=int, default=20)
    t.add_argument("--frames-long", type=int, default=100)
    t.add_argument("--profile-batch", type=int, default=64, help="0: no torch profile")
    t.add_argument("--profile-steps", type=int, default=20)
    t.add_argument("--prefill-iters", type=int, default=20,
                   help="1-frame and 2-frame requests alone, this many each, then a profile of 1-frame ones (0: none)")
    t.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    t.add_argument("--cudagraph-mode", default=None,
                   help="vLLM's cudagraph_mode (default: vLLM's own, FULL_AND_PIECEWISE on a GPU; FULL: benchmarks/NOTES.md §14)")
    t.add_argument("--trace", default=None, help="also write a Chrome trace here")
    args = ap.parse_args()
    result = bench_codec(args) if args.stage == "codec" else bench_talker(args)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
