"""Summarise the folded stacks that QWEN3TTS_STACK_SAMPLES_DIR collects (vllm_qwen3tts/tools/stack_sampler.py):
per process and thread, the share of samples, then the functions where those samples were
(innermost frame: "self") and the functions they were under ("total"), leaving out samples of
threads blocked in a wait.

    python benchmarks/fold_stacks.py DIR [--since EARLIER_COPY_OF_DIR] [--top 20] [--out summary.json]

The sampler's counts are cumulative from process start; `--since` subtracts a copy of DIR taken
earlier, leaving only the samples of the window in between (e.g. one load level).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def read_folded(path: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[stack] += int(n)
    return counts


# Innermost Python frames of a thread that is blocked, not working: selectors and zmq polls,
# condition waits (queues), an idle thread-pool worker, and uvloop's C loop (where Python
# shows only `asyncio.run`'s frame).
# vLLM's shared-memory queues spin on sched_yield while they wait for the other side.
IDLE_FRAMES = ("select (selectors.py", "poll (poll.py", "wait (threading.py", "_worker (thread.py",
               "run (runners.py", "_poll (connection.py", "wait (connection.py", "_recv (connection.py",
               "run (garbage.py", "sched_yield (utils.py")


def is_idle(innermost: str) -> bool:
    return innermost.startswith(IDLE_FRAMES)


def summarise(counts: collections.Counter, top: int) -> dict:
    """Per thread (busiest first): its samples, the share of them not blocked ("busy"), and
    among the busy ones the innermost functions ("self") and every function on the stack
    ("total")."""
    by_thread: dict[str, dict] = {}
    for stack, n in counts.items():
        thread, *frames = stack.split(";")
        t = by_thread.setdefault(thread, {"samples": 0, "busy": 0, "self": collections.Counter(),
                                          "total": collections.Counter()})
        t["samples"] += n
        if frames and not is_idle(frames[-1]):
            t["busy"] += n
            t["self"][frames[-1]] += n
            for f in set(frames):
                t["total"][f] += n
    out = {}
    for thread, t in sorted(by_thread.items(), key=lambda kv: -kv[1]["busy"]):
        busy = max(t["busy"], 1)
        out[thread] = {
            "samples": t["samples"],
            "busy_share": round(t["busy"] / max(t["samples"], 1), 3),
            "self": [(f, round(n / busy, 3)) for f, n in t["self"].most_common(top)],
            "total": [(f, round(n / busy, 3)) for f, n in t["total"].most_common(top)],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--threads", type=int, default=3, help="threads printed per process (busiest first)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--since", type=Path, help="an earlier copy of DIR whose counts are subtracted")
    args = ap.parse_args()
    report = {}
    for path in sorted(args.dir.glob("*.folded")):
        counts = read_folded(path)
        if args.since and (args.since / path.name).is_file():
            counts = counts - read_folded(args.since / path.name)  # Counter subtraction drops <= 0
        report[path.stem] = summarise(counts, args.top)
    for process, threads in report.items():
        print(f"== {process}")
        for thread, t in list(threads.items())[: args.threads]:
            print(f"  -- thread {thread}: busy in {t['busy_share']:.0%} of {t['samples']} samples; of those:")
            print("     self:  " + "\n            ".join(f"{share:5.1%} {f}" for f, share in t["self"][:args.top]))
            print("     total: " + "\n            ".join(f"{share:5.1%} {f}" for f, share in t["total"][:args.top]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
