"""The talker inside vLLM on a GPU: which model runner, greedy codes against the
official fp32 reference (benchmarks/data/reference_codes_*.json, made on the CPU),
fp32 and bf16, in one batch with chunked prefill and CUDA graphs.

    python benchmarks/talker_gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default=str(HERE / "data" / "reference_codes_tiny_1.7b-cv.json"))
    ap.add_argument("--workdir", default="/tmp/qwen3tts-check")
    ap.add_argument("--checkpoint", help="use this checkpoint instead of generating one (weights from another "
                    "torch version's RNG may differ)")
    ap.add_argument("--out", default="talker_gpu_check.json")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--runs", default="float32:64,bfloat16:64,bfloat16:8192",
                    help="dtype:max_num_batched_tokens[:eager|:<vLLM cudagraph mode, e.g. full>],...")
    args = ap.parse_args()
    # Fork start-up of the engine process stalled before its model loaded, in both runs of
    # 2026-12-04 (benchmarks/NOTES.md §15), after this process had tokenized the prompts and
    # built the checkpoint; a spawned engine inherits neither threads nor locks.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if os.environ.get("STACK_DUMP_S"):  # diagnose hangs: print every thread's stack periodically
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["STACK_DUMP_S"]), repeat=True)

    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from vllm_qwen3tts.tools.checkpoint import make_checkpoint
    from vllm_qwen3tts.base.config import load_tts_config
    from vllm_qwen3tts.model.prompt import SpeechRequest, build_prompt
    from vllm_qwen3tts.talker.protocol import Code0Params, SubtalkerParams, TalkerRequest, frames_from_output, talker_sampling_params
    from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer

    ref = json.loads(Path(args.reference).read_text())
    c = ref["checkpoint"]
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt = make_checkpoint(c["variant"], c["scale"], Path(args.workdir) / "ckpt", seed=c["seed"])
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    if ref.get("model_sha256") and digest != ref["model_sha256"]:
        print(f"WARNING: checkpoint differs from the reference's ({digest[:12]} != {ref['model_sha256'][:12]})")
    cfg = load_tts_config(ckpt)
    tok = load_text_tokenizer(ckpt)
    greedy0, greedy_sub = Code0Params(temperature=0.0), SubtalkerParams(temperature=0.0)
    prompts, params, expected = [], [], []
    for copy in range(args.copies):
        for item in ref["references"]:
            r = item["request"]
            recipe = build_prompt(cfg, tok, SpeechRequest(text=r["text"], speaker=r["speaker"], language=r["language"],
                                                           instructions=r["instruct"], non_streaming_mode=True))
            treq = TalkerRequest(recipe, greedy_sub, seed=copy)
            prompts.append(TokensPrompt(prompt_token_ids=[cfg.talker.codec_pad_id] * len(recipe), cache_salt=treq.cache_salt()))
            params.append(talker_sampling_params(treq, greedy0, ref["max_frames"], cfg.talker.codec_eos_id))
            expected.append(item["codes"])

    results = {}
    for run in args.runs.split(","):
        dtype, chunk, *mode = run.split(":")
        chunk = int(chunk)
        eager = mode == ["eager"]
        graphs = {"compilation_config": {"cudagraph_mode": mode[0].upper()}} if mode and not eager else {}
        t0 = time.time()
        llm = LLM(model=str(ckpt), dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.1,
                  skip_tokenizer_init=True, max_num_seqs=min(64, chunk), max_num_batched_tokens=chunk,
                  enable_prefix_caching=False, enforce_eager=eager, **graphs)
        startup = time.time() - t0
        engine = llm.llm_engine
        use_v2 = bool(getattr(engine.vllm_config, "use_v2_model_runner", False))
        t0 = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        gen_s = time.time() - t0
        exact = 0
        agree = []
        same_frames = same_code0 = total_frames = 0
        first = frames_from_output(outs[0].outputs[0], cfg.talker.codec_eos_id)
        print("first request, first frames:", first[:2], "expected:", expected[0][:2], flush=True)
        for out, exp in zip(outs, expected):
            frames = frames_from_output(out.outputs[0], cfg.talker.codec_eos_id)
            exact += frames == exp
            n = min(len(frames), len(exp))
            same_prefix = next((i for i in range(n) if frames[i] != exp[i]), n)
            agree.append(same_prefix / max(len(exp), 1))
            total_frames += len(exp)
            same_frames += sum(a == b for a, b in zip(frames, exp))
            same_code0 += sum(a[0] == b[0] for a, b in zip(frames, exp))
        key = f"{dtype}-chunk{chunk}" + (f"-{mode[0]}" if mode else "")
        results[key] = dict(model_runner_v2=use_v2, startup_s=round(startup, 1), generate_s=round(gen_s, 2),
                            requests=len(outs), exact_requests=exact, mean_identical_prefix=round(sum(agree) / len(agree), 3),
                            frames_equal=round(same_frames / total_frames, 3), code0_equal=round(same_code0 / total_frames, 3))
        print(key, results[key], flush=True)
        del llm
        import gc
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
