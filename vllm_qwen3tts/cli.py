"""`vllm-qwen3tts` command line."""

from __future__ import annotations

import argparse
import sys


def _make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import make_checkpoint

    path = make_checkpoint(args.variant, args.scale, args.out, seed=args.seed)
    print(f"wrote {args.variant} ({args.scale}) checkpoint to {path}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
