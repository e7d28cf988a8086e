"""`vllm-qwen3tts` command line."""

from __future__ import annotations

import argparse
import sys


def _make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import make_checkpoint

    path = make_checkpoint(args.variant, args.scale, args.out, seed=args.seed)
    print(f"wrote {args.variant} ({args.scale}) checkpoint to {path}")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    from .engine import DeviceError, Qwen3TTS, SynthesisParams, SynthesisRequest
    from .prompt import PromptError

    if (args.text is None) == (args.text_file is None):
        print("error: give exactly one of --text or --text-file", file=sys.stderr)
        return 2
    texts = [args.text] if args.text is not None else [
        line.strip() for line in Path(args.text_file).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    params = SynthesisParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, subtalker_temperature=args.subtalker_temperature,
        subtalker_top_k=args.subtalker_top_k, subtalker_top_p=args.subtalker_top_p,
        max_frames=args.max_new_tokens, seed=args.seed,
    )
    out = Path(args.out)
    outputs = [out] if len(texts) == 1 else [out.with_name(f"{out.stem}_{i:04d}{out.suffix}") for i in range(len(texts))]
    try:
        with Qwen3TTS(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                      enforce_eager=args.enforce_eager) as tts:
            voice = None
            if args.ref_audio:
                voice = tts.clone_voice(Path(args.ref_audio).read_bytes(), args.ref_text, x_vector_only=args.x_vector_only)
            requests = [
                SynthesisRequest(text=t, speaker=args.voice, language=args.language, instructions=args.instructions,
                                 voice=voice, params=params)
                for t in texts
            ]
            results = tts.generate(requests, progress=len(requests) > 1)
    except (PromptError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, result in zip(outputs, results):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), result.audio, result.sample_rate)
        print(f"{path}: {len(result.audio) / result.sample_rate:.2f} s, {len(result.codes)} frames ({result.finish_reason})")
    if args.codes_out:
        codes_out = Path(args.codes_out)
        for i, result in enumerate(results):
            target = codes_out if len(results) == 1 else codes_out.with_name(f"{codes_out.stem}_{i:04d}{codes_out.suffix}")
            np.save(target, result.codes.astype(np.int64))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import SCALES, VARIANTS

    parser = argparse.ArgumentParser(prog="vllm-qwen3tts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the released layout")
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--scale", required=True, choices=SCALES)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_checkpoint)

    p = sub.add_parser("synthesize", help="text to a WAV file (one utterance, or one per line of --text-file)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--text")
    p.add_argument("--text-file", help="one utterance per line; outputs OUT_0000.wav, OUT_0001.wav, ...")
    p.add_argument("--voice", help="CustomVoice preset speaker (e.g. ryan, vivian)")
    p.add_argument("--language", default="auto")
    p.add_argument("--instructions", help="style instructions (CustomVoice 1.7B) or voice description (VoiceDesign)")
    p.add_argument("--ref-audio", help="reference audio to clone (Base checkpoints)")
    p.add_argument("--ref-text", help="transcript of --ref-audio (in-context cloning)")
    p.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding only")
    p.add_argument("--temperature", type=float, help="code-0 temperature; 0 = greedy (code predictor too)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--subtalker-temperature", type=float, help="code-predictor temperature; 0 = greedy")
    p.add_argument("--subtalker-top-k", type=int)
    p.add_argument("--subtalker-top-p", type=float)
    p.add_argument("--max-new-tokens", type=int, help="at most this many frames (12.5 per second of audio)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (faster start)")
    p.add_argument("--out", required=True, help="output WAV path")
    p.add_argument("--codes-out", help="also save the codes, [T, 16] int, as .npy")
    p.set_defaults(func=_synthesize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
