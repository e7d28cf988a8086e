"""Start `vllm-qwen3tts serve` as a real subprocess and wait until it is ready."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

# The keys of the shared speech server (`speech_server` in conftest.py): two ordinary tenants and
# one tightly limited.
KEYS = [
    {"key": "alice-key", "name": "alice", "max_concurrency": 16, "requests_per_minute": 100000},
    {"key": "bob-key", "name": "bob", "max_concurrency": 8, "requests_per_minute": 100000},
    {"key": "tight-key", "name": "tight", "max_concurrency": 1, "requests_per_minute": 2},
]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# vLLM's server exactly as `vllm-qwen3tts serve` would exec it, but without the codec workers that
# command starts first: what a plain `vllm serve CHECKPOINT` with our plugins does.
PLAIN_VLLM_SERVE = (
    "import os, sys\n"
    "from vllm_qwen3tts.cli import build_parser, serve_command\n"
    "args, rest = build_parser().parse_known_args(sys.argv[1:])\n"
    "plan = serve_command(args, rest)\n"
    "os.execvpe(plan.argv[0], plan.argv, plan.env)\n"
)


@contextmanager
def running_server(tmp: Path, args: list[str], keys: list[dict] | None = None, env: dict | None = None,
                   timeout_s: float = 300, plain_vllm: bool = False, as_server: bool = False, device: str = "cpu",
                   vllm_serve: bool = False):
    """Yields (base_url, log_path), or a `Server` with `as_server`. Arguments go to `vllm-qwen3tts serve`; with `plain_vllm`, to
    vLLM's server as that command sets it up, but with no codec worker started before it; with `vllm_serve`, to
    the `vllm serve` command itself (`vllm serve ARGS --host 127.0.0.1 --port P`, VLLM_PLUGINS unset: installing
    the package is all it has; `keys` and the rest of the speech settings are the caller's to pass)."""
    port = free_port()
    log = tmp / "server.log"
    full_env = {**os.environ, **(env or {})}
    if vllm_serve:
        cmd = [str(Path(sys.executable).with_name("vllm")), "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
        full_env.pop("VLLM_PLUGINS", None)
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU build: its KV cache, not 92% of the RAM
    else:
        launcher = ["-c", PLAIN_VLLM_SERVE] if plain_vllm else ["-m", "vllm_qwen3tts.cli"]
        cmd = [sys.executable, *launcher, "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", device, "--voices-dir", str(tmp / "voices"), *args]
        if keys is not None:
            (tmp / "keys.json").write_text(json.dumps(keys))
            cmd += ["--api-keys-file", str(tmp / "keys.json")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Server(base, log, proc.pid) if as_server else (base, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


@dataclass(frozen=True)
class Server:
    base: str  # http://127.0.0.1:PORT
    log: Path  # everything the server's processes print
    pid: int  # the API server's process (the process group's leader)


def metric(base: str, name: str, labels: dict | None = None, key: str = "alice-key") -> float:
    """Sum of a Prometheus sample (matching the given labels) from /metrics, read with `key`
    (/metrics takes a key when the server has keys; a server without keys ignores it)."""
    total = 0.0
    response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    response.raise_for_status()
    for line in response.text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        sample, _, rest = head.partition("{")
        if sample != name:
            continue
        if labels and not all(f'{k}="{v}"' in rest for k, v in labels.items()):
            continue
        total += float(value)
    return total


def audio_difference(a: bytes, b: bytes) -> str | None:
    """None when two int16 PCM renderings are the same audio up to float rounding (a few LSB: the
    codec decodes chunks of any size to the same samples); otherwise what differs. Other codes, or
    another voice, differ by thousands."""
    x, y = np.frombuffer(a, dtype="<i2").astype(np.int32), np.frombuffer(b, dtype="<i2").astype(np.int32)
    if x.shape != y.shape or x.size == 0:
        return f"{x.size} samples against {y.size}"
    if np.abs(x - y).max() > 2:
        return f"{int((x != y).sum())} samples differ, by up to {np.abs(x - y).max()}"
    return None


def assert_renders_one_generation(*renders, attempts: int = 3) -> None:
    """Each of `renders` (a callable returning 16-bit PCM) renders the same greedy request, in its own
    way (streamed, SSE, whole file, an alias of the voice...): they must give the same audio.

    Separate greedy requests to the CPU server are the same generation almost always, not always:
    the random checkpoint's code predictor has near-tied logits, and the CPU kernels' rounding
    varies from run to run, so now and then one request picks another code and the rest of its
    utterance follows (NOTES §21). So the renderings are asked for again, up to `attempts` times,
    until one round agrees. A fault of the rendering path (a chunk lost, repeated or out of order;
    the wrong voice) differs in every round."""
    problems = []
    for _ in range(attempts):
        audios = [render() for render in renders]
        problems = [(i, d) for i, a in enumerate(audios[1:], 1) if (d := audio_difference(audios[0], a))]
        if not problems:
            return
    pytest.fail(f"in each of {attempts} rounds, renderings differed from the first: {problems}")
