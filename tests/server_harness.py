"""Start `vllm-qwen3tts serve` as a real subprocess and wait until it is ready."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

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


def running_server(tmp: Path, args: list[str], keys: list[dict] | None = None, env: dict | None = None,
                   timeout_s: float = 300, plain_vllm: bool = False, as_server: bool = False, device: str = "cpu",
                   vllm_serve: bool = False):
    """Yields (base_url, log_path), or a `Server` with `as_server`. Arguments go to `vllm-qwen3tts serve`; with `plain_vllm`, to
    vLLM's server as that command sets it up, but with no codec worker started before it; with `vllm_serve`, to
    the `vllm serve` command itself (`vllm serve ARGS --host 127.0.0.1 --port P`, VLLM_PLUGINS unset: installing
    the package is all it has; `keys` and the rest of the speech settings are the caller's to pass). The server's
    environment is this process's as of this call, plus `env` (the context may be entered later, in another thread
    (`StartedInBackground`), while a test has changed the environment for itself)."""
    return _running_server(dict(os.environ), tmp, args, keys, env, timeout_s, plain_vllm, as_server, device, vllm_serve)


@contextmanager
def _running_server(environ: dict, tmp: Path, args: list[str], keys, env, timeout_s, plain_vllm, as_server, device,
                    vllm_serve):
    port = free_port()
    log = tmp / "server.log"
    full_env = {**environ, **(env or {})}
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


class StartedInBackground:
    """A context (a `running_server(...)`) entered in a thread of its own, once `after` (another
    one) has started, if given: the caller goes on while it starts, and `get()` waits until it has
    (raising what its start raised) and returns what it yields. `close()` leaves the context (stops
    the server) and waits for that."""

    def __init__(self, context, after: "StartedInBackground | None" = None):
        self._context = context
        self._after = after
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="server-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._after is not None:
                self._after._ready.wait()
            if self._closing.is_set():
                return
            with self._context as value:
                self._value = value
                self._ready.set()
                self._closing.wait()
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the server
            if not self._ready.is_set():
                self._error = e
        finally:
            self._ready.set()

    def get(self):
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def close(self) -> None:
        self._closing.set()
        self._thread.join()


# Contexts started in the background as the session begins, one after another (conftest's
# `background`), by (test module name, or "*" for a session fixture, fixture name): a function of
# session fixtures, called in the main thread, that returns the context (`running_server(...)`).
BACKGROUND: dict[tuple[str, str], Callable] = {}


def starts_in_background(module: str, fixture: str):
    """Registers the decorated function as the start of `fixture` (of test module `module`, or of
    the session where "*") for conftest's `background`: when a selected test uses that fixture, the
    server starts as the session begins, after those registered and used before it, in a thread,
    while other tests run (a server's start is mostly process starts that leave the second core
    idle), and the fixture takes it from `Background.server`."""
    def register(start: Callable) -> Callable:
        BACKGROUND[(module, fixture)] = start
        return start
    return register


class Background:
    """The servers of BACKGROUND that the selected tests use, started one after another from now on."""

    def __init__(self, request):  # the session's request
        items = request.session.items

        def first_use(module: str, fixture: str) -> int | None:
            return next((i for i, item in enumerate(items) if fixture in getattr(item, "fixturenames", ())
                         and module in ("*", getattr(getattr(item, "module", None), "__name__", None))), None)

        used = sorted((i, key) for key in BACKGROUND if (i := first_use(*key)) is not None)
        self._started: dict[tuple[str, str], StartedInBackground] = {}
        previous = None
        for _, key in used:
            previous = self._started[key] = StartedInBackground(self._context(key, request), after=previous)

    @staticmethod
    def _context(key, request):
        start = BACKGROUND[key]
        return start(**{name: request.getfixturevalue(name) for name in inspect.signature(start).parameters})

    @contextmanager
    def server(self, request, fixture: str, module: str | None = None):
        """The server of `fixture` (of the requesting test's module, or `module`): the one started in
        the background, else started now; stopped when the context ends."""
        key = (module or request.module.__name__, fixture)
        started = self._started.pop(key, None)
        if started is None:
            with self._context(key, request) as value:
                yield value
            return
        try:
            yield started.get()
        finally:
            started.close()

    def close(self) -> None:
        for started in reversed(list(self._started.values())):
            started.close()


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


def assert_renders_one_generation(*renders) -> None:
    """Each of `renders` (a callable returning 16-bit PCM) renders the same greedy request, in its own
    way (streamed, SSE, whole file, an alias of the voice...): they must give the same audio. (Such
    renderings once differed now and then: a greedy row of the code predictor's sampler drew a
    NaN, NOTES §29; the tests asked again up to three times until that was found.)"""
    audios = [render() for render in renders]
    problems = [(i, d) for i, a in enumerate(audios[1:], 1) if (d := audio_difference(audios[0], a))]
    assert not problems, f"renderings differed from the first: {problems}"
