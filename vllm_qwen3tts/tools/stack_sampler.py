"""Where a process spends its time, without ptrace (the GPU machines may not allow py-spy).

Diagnostics only, off unless QWEN3TTS_STACK_SAMPLES_DIR is set: a daemon thread samples the
Python stack of every thread (`sys._current_frames`) every few milliseconds and rewrites
`<dir>/<process name>-<pid>.folded` every few seconds, one `thread;outer;...;inner count` line
per distinct stack (the input format of flamegraph tools; `benchmarks/fold_stacks.py` sums it
by function). Each process of a server (API server, engine core, codec worker) writes its own.
While a file named PAUSED exists in that directory, no process samples: a benchmark can start
a server paused and sample only its diagnostic load, so the sampler's GIL traffic never skews
the latencies it reports.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

PAUSE_FILE = "PAUSED"
_started = False


def start_from_env(role: str | None = None) -> None:
    """Start sampling this process if the settings' QWEN3TTS_STACK_SAMPLES_DIR is set (at most once)."""
    from ..base.settings import process_settings

    global _started
    tuning = process_settings().tuning
    out_dir = tuning.stack_samples_dir
    if not out_dir or _started:
        return
    _started = True
    role = role or multiprocessing.current_process().name
    path = Path(out_dir) / f"{role}-{os.getpid()}.folded"
    path.parent.mkdir(parents=True, exist_ok=True)
    interval_s = tuning.stack_sample_interval_ms / 1000
    threading.Thread(target=_sample_forever, args=(path, interval_s), name="qwen3tts-stack-sampler",
                     daemon=True).start()


def _sample_forever(path: Path, interval_s: float, flush_every_s: float = 5.0) -> None:
    me = threading.get_ident()
    counts: collections.Counter[str] = collections.Counter()
    flushed = time.monotonic()
    pause_file = path.parent / PAUSE_FILE
    unwritten = False  # samples taken since the last write
    while True:
        time.sleep(interval_s)
        if pause_file.exists():
            time.sleep(0.1)  # one stat per 0.1 s while paused
        else:
            _sample_once(counts, me)
            unwritten = True
        if unwritten and time.monotonic() - flushed >= flush_every_s:  # also once paused: the last samples land
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(f"{stack} {n}\n" for stack, n in counts.most_common()))
            tmp.replace(path)
            flushed, unwritten = time.monotonic(), False


def _sample_once(counts: collections.Counter[str], me: int) -> None:
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        stack = []
        while frame is not None:
            code = frame.f_code
            stack.append(f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})")
            frame = frame.f_back
        stack.append(names.get(ident, str(ident)))
        counts[";".join(reversed(stack))] += 1
