"""Greedy codes of the official implementation (CPU, fp32) on a tiny checkpoint, for
checking the talker on other machines (benchmarks/talker_gpu_check.py).

    python benchmarks/make_reference_codes.py                     # tiny 1.7B CustomVoice
    python benchmarks/make_reference_codes.py --variant 0.6b-custom_voice --scale full
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

REQUESTS = [
    dict(text="Hello there, this is a test of the talker.", speaker="ryan", language="English", instruct=None),
    dict(text="今天天气很好，我们去公园散步吧。", speaker="dylan", language="Chinese", instruct=None),
    dict(text="Speak up, the train is leaving in five minutes!", speaker="vivian", language="Auto",
         instruct="Sound excited and slightly out of breath."),
    dict(text="A short one.", speaker="serena", language="English", instruct="Whisper."),
]
MAX_FRAMES = 40


def main() -> None:
    import argparse

    from oracle import load_official

    from vllm_qwen3tts.tools.checkpoint import make_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="1.7b-custom_voice")
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=len(REQUESTS))
    args = ap.parse_args()
    variant, scale, seed = args.variant, args.scale, args.seed
    ckpt = make_checkpoint(variant, scale, Path(tempfile.mkdtemp()) / "ckpt", seed=seed)
    official = load_official(ckpt)
    captured = {}
    official.model.speech_tokenizer.decode = lambda items: (captured.update(codes=items[0]["audio_codes"]), ([None], 24000))[1]
    refs = []
    for r in REQUESTS[: args.requests]:
        if variant.startswith("0.6b"):
            r = {**r, "instruct": None}  # the 0.6B CustomVoice ignores instructions
        with torch.no_grad():
            # the reference's max_new_tokens counts the final, unexpanded sample
            official.generate_custom_voice(do_sample=False, subtalker_dosample=False, max_new_tokens=MAX_FRAMES + 1,
                                           non_streaming_mode=True, **r)
        refs.append(dict(request=r, codes=captured["codes"].tolist()))
    out = dict(
        checkpoint=dict(variant=variant, scale=scale, seed=seed),
        model_sha256=hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest(),
        max_frames=MAX_FRAMES,
        references=refs,
    )
    short = variant.replace("custom_voice", "cv").replace("voice_design", "vd")
    (HERE / "data" / f"reference_codes_{scale}_{short}.json").write_text(json.dumps(out))
    print("frames per request:", [len(r["codes"]) for r in refs])


if __name__ == "__main__":
    main()
