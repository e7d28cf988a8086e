"""CPU use of every process of a server (the root process and its descendants) and the GPU's
utilisation, once per interval, as JSON lines; a process pinned near 100% of one core is a
host-side bottleneck.

    python benchmarks/proc_monitor.py --pid SERVER_PID --out monitor.jsonl [--interval 1]

Runs until the root process exits or it is killed. `--summary monitor.jsonl` prints, per
process, the mean and peak CPU% over the samples where the GPU was busy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path


def gpu_utilisation() -> list[int]:
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    return [int(x) for x in out.split() if x.strip().isdigit()]


def monitor(pid: int, out: Path, interval_s: float) -> None:
    import psutil

    root = psutil.Process(pid)
    last: dict[int, float] = {}
    with out.open("w") as f:
        while root.is_running():
            t = time.time()
            procs = {}
            for p in [root, *root.children(recursive=True)]:
                try:
                    cpu = sum(p.cpu_times()[:2])
                    name = p.name()
                    cmd = " ".join(p.cmdline()[:3])[:80]
                except psutil.Error:
                    continue
                if p.pid in last:
                    procs[str(p.pid)] = {"name": name, "cmd": cmd, "cpu_pct": round(100 * (cpu - last[p.pid]) / interval_s, 1)}
                last[p.pid] = cpu
            f.write(json.dumps({"t": round(t, 2), "gpu_util": gpu_utilisation(), "procs": procs}) + "\n")
            f.flush()
            time.sleep(max(0.0, interval_s - (time.time() - t)))


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    busy = [r for r in rows if r["gpu_util"] and max(r["gpu_util"]) > 5] or rows
    per: dict[str, list] = {}
    for r in busy:
        for pid, p in r["procs"].items():
            per.setdefault(f"{p['name']}[{pid}] {p['cmd']}", []).append(p["cpu_pct"])
    gpu = [max(r["gpu_util"]) for r in busy if r["gpu_util"]]
    print(f"{len(busy)} busy samples of {len(rows)}; GPU util mean {sum(gpu) / max(len(gpu), 1):.0f}%")
    for name, v in sorted(per.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        mean = sum(v) / len(v)
        if mean >= 1:
            print(f"  {mean:6.1f}% mean  {max(v):6.1f}% peak  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--summary", type=Path)
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        monitor(args.pid, args.out, args.interval)


if __name__ == "__main__":
    main()
