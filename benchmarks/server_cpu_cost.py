"""CPU seconds per generated frame in each process of a running server (API process, engine
core, model worker, codec worker): starts `vllm-qwen3tts serve`, drives it with
`http_load.py` at one concurrency, reads every process's CPU time before and after.

    python benchmarks/server_cpu_cost.py --model DIR --concurrency 32 --frames 40 [--device cpu]

On the CPU build the engine and codec numbers are mostly model compute (and vLLM's
busy-polling); the API process's number is its per-frame bookkeeping, which bounds how many
frames per second one API process can pass on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=8777)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more argument for `serve` (repeat), e.g. --server-arg=--stream-interval=4")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    srv = subprocess.Popen(
        [sys.executable, "-m", "vllm_qwen3tts.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
         "--port", str(args.port), "--device", args.device, "--max-num-seqs", str(args.concurrency),
         "--max-model-len", "1024", "--max-concurrency-per-key", "100000",
         "--requests-per-minute-per-key", "10000000", *args.server_arg],
        stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(300):
            time.sleep(2)
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        procs = [psutil.Process(srv.pid)] + psutil.Process(srv.pid).children(recursive=True)

        def cpu() -> dict[int, float]:
            times = {}
            for p in procs:
                try:
                    t = p.cpu_times()
                    times[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            return times

        before = cpu()
        subprocess.run([sys.executable, str(Path(__file__).parent / "http_load.py"), "--url",
                        f"http://127.0.0.1:{args.port}", "--voice", "ryan", "--concurrency", str(args.concurrency),
                        "--rounds", "1", "--frames", str(args.frames), "--warmup-frames", "0",
                        "--out", str(tmp / "load.json")], check=True, capture_output=True)
        after = cpu()
        level = json.loads((tmp / "load.json").read_text())["levels"][0]
        frames = level["audio_s"] * 12.5
        print(f"{frames:.0f} frames at concurrency {args.concurrency}")
        print("| process | CPU s | CPU µs per frame |\n|---|---|---|")
        for p in procs:
            if p.pid in after and p.pid in before:
                used = after[p.pid] - before[p.pid]
                name = " ".join(p.cmdline())[:60] if p.pid == srv.pid or p.name().startswith("python") else p.name()
                print(f"| {name} | {used:.2f} | {1e6 * used / frames:.0f} |")
    finally:
        os.killpg(srv.pid, signal.SIGTERM)
        srv.wait(60)


if __name__ == "__main__":
    main()
