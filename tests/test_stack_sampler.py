"""The diagnostic stack sampler: off by default, and when QWEN3TTS_STACK_SAMPLES_DIR is set, a
process's folded stacks show where it spent its time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Spins for argv[1] seconds, or less once a file matching argv[2] exists (the sampler has written).
SCRIPT = """
import glob, sys, time
from vllm_qwen3tts.tools.stack_sampler import start_from_env

def spin_in_a_named_function(seconds, written):
    now = time.monotonic()
    end, look = now + seconds, now + 0.1
    while time.monotonic() < end:
        sum(range(1000))
        if written and time.monotonic() > look:
            if glob.glob(written):
                return
            look = time.monotonic() + 0.1

start_from_env("probe")
spin_in_a_named_function(float(sys.argv[1]), sys.argv[2])
"""


def run_probe(env_extra: dict, until_written: str = "") -> None:
    """Spin in the probe until `until_written` (a glob) exists, within 60 s; without it, for 6.5 s
    (past the sampler's first write, 5 s after its start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN3TTS_STACK")}
    seconds = "60" if until_written else "6.5"
    subprocess.run([sys.executable, "-c", SCRIPT, seconds, until_written], env={**env, **env_extra}, check=True,
                   timeout=120)


def test_sampler_writes_folded_stacks_of_the_busy_function(tmp_path: Path):
    run_probe({"QWEN3TTS_STACK_SAMPLES_DIR": str(tmp_path)}, until_written=str(tmp_path / "probe-*.folded"))
    (folded,) = tmp_path.glob("probe-*.folded")
    counts = {}
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack] = int(n)
    busy = sum(n for stack, n in counts.items() if "spin_in_a_named_function" in stack)
    assert busy > 0.8 * sum(counts.values())
    assert all(stack.startswith("MainThread;") for stack in counts)


def test_sampler_is_off_unless_asked(tmp_path: Path):
    run_probe({"TMPDIR": str(tmp_path)})
    assert not list(tmp_path.rglob("*.folded"))


def test_sampler_takes_no_samples_while_paused(tmp_path: Path):
    (tmp_path / "PAUSED").touch()
    run_probe({"QWEN3TTS_STACK_SAMPLES_DIR": str(tmp_path)})
    assert not list(tmp_path.glob("probe-*.folded"))
