"""Load generator for any `/v1/audio/speech` server (ours, vllm-omni's): streaming PCM over HTTP.

Two kinds of load level:
- `--concurrency 1,64,128`: closed loop, that many clients each sending its next request as
  soon as the last one ends (`--rounds` requests per client). By default every client starts at
  once (a burst: with forced equal lengths the clients then stay in lockstep, every round a new
  burst). `--ramp-s S` starts them evenly over S seconds instead, as streams arrive in service;
  the level then also reports its *steady state*: the window in which every client is active
  (from the last client's first request to the first client's last reply), its audio-seconds
  per second counted from the chunks that arrived inside it, and the first-audio latency of the
  requests sent inside it;
- `--rates 1,20`: open loop, Poisson arrivals at that many requests per second for
  `--duration` seconds, whatever the server's state.

`--client-procs P` spreads a closed loop's clients over P processes (each with its own event loop
and connection pool; one clock, since `time.perf_counter` is the system's monotonic clock). One
process writing 128 requests at once took ~0.4 s to send the last of them on a GPU host, which
"128 at once" counted as first audio (NOTES §17); real clients do not share one event loop.

Per request it records when every audio chunk arrived and plays them back through a simulated
player that starts at the first chunk: an *underrun* is the player running out of audio before
the next chunk is there. Per level it reports time to first audio (p50/p95/p99), end-to-end
latency, audio-seconds per second (all audio received / the level's wall time), real-time
factor (latency / audio duration) and underruns. Writes JSON, a markdown table, and a plot.

Random weights never decide to stop, so `--frames N` forces every request to N frames
(12.5 per audio second), sent the same way to every system (`--system` picks the field names).

    python benchmarks/http_load.py --url http://localhost:8000 --concurrency 1,64,128 --frames 250 \\
        --label "ours 0.6B" --out results/load.json
    python benchmarks/http_load.py --plot-only results/ours.json results/omni.json --plot cmp.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

sys.path.insert(0, str(Path(__file__).parent))
import server_metrics  # noqa: E402

SAMPLE_RATE = 24_000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # 16-bit mono PCM
PROMPTS = Path(__file__).parent / "data" / "prompts.txt"
CODEC_POLL_SETTLE_S = 5.5


def load_prompts(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# ------------------------------------------------------------------------------ request bodies

def request_body(system: str, text: str, voice: str | None, language: str | None, frames: int | None,
                 seed: int, model: str | None, extra: dict) -> dict:
    """The streaming-PCM request in the dialect of `system`, forced to `frames` if given."""
    body: dict = {"input": text, "response_format": "pcm"}
    if model:
        body["model"] = model
    if voice:
        body["voice"] = voice
    if language:
        body["language"] = language
    if system == "ours":
        body.update(stream_format="audio", seed=seed)
        if frames:
            body.update(max_new_tokens=frames, min_new_tokens=frames)
    elif system == "omni":
        # vllm-omni 0.26: `stream_format: audio` streams raw PCM (`stream` alone would be SSE). It has
        # no per-request minimum length: its server is started with talker min_tokens = max_tokens
        # (benchmarks/omni/serve_omni.sh, OMNI_FIXED_FRAMES)
        body.update(stream=True, stream_format="audio")
        if frames:
            body.update(max_new_tokens=frames)
    else:
        raise ValueError(f"unknown system {system!r}")
    body.update(extra)
    return body


# ------------------------------------------------------------------------------ one request

@dataclass
class RequestResult:
    sent_s: float  # since the level started
    status: int | None = None
    error: str | None = None
    connect_s: float | None = None  # until its TCP connection was up; None: it reused one
    request_sent_s: float | None = None  # until the request (headers and body) was written
    headers_s: float | None = None  # until the response's status and headers
    ttfa_s: float | None = None
    e2e_s: float | None = None
    audio_s: float = 0.0
    underruns: int = 0
    stall_s: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (s since the level began, bytes)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.audio_s > 0


def play(arrivals: list[tuple[float, int]], prebuffer_s: float = 0.0) -> tuple[int, float]:
    """Underruns and stalled seconds of a player that starts `prebuffer_s` after the first chunk
    and plays continuously; when it runs dry it waits for the next chunk."""
    underruns, stalled = 0, 0.0
    runs_dry_at = None  # wall time at which the buffered audio ends
    for t, nbytes in arrivals:
        duration = nbytes / BYTES_PER_SECOND
        if runs_dry_at is None:
            runs_dry_at = t + prebuffer_s + duration
        elif t > runs_dry_at:
            underruns += 1
            stalled += t - runs_dry_at
            runs_dry_at = t + duration
        else:
            runs_dry_at += duration
    return underruns, stalled


async def one_request(client, url: str, headers: dict, body: dict, level_t0: float, prebuffer_s: float) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(sent_s=t0 - level_t0)
    arrivals: list[tuple[float, int]] = []
    header_left = None  # bytes of a WAV header still to skip, if the stream starts with one
    async def trace(event: str, info: dict) -> None:  # httpx's connection events
        if event == "connection.connect_tcp.complete":
            res.connect_s = time.perf_counter() - t0
        elif event == "http11.send_request_body.complete":
            res.request_sent_s = time.perf_counter() - t0

    try:
        async with client.stream("POST", url, json=body, headers=headers, extensions={"trace": trace}) as r:
            res.headers_s = time.perf_counter() - t0
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            async for chunk in r.aiter_raw():
                if header_left is None:
                    header_left = 44 if chunk[:4] == b"RIFF" else 0
                if header_left:
                    skip = min(header_left, len(chunk))
                    chunk, header_left = chunk[skip:], header_left - skip
                if chunk:
                    arrivals.append((time.perf_counter(), len(chunk)))
        res.e2e_s = time.perf_counter() - t0
    except Exception as e:  # a broken stream counts as a failed request, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:300]
    if arrivals:
        res.arrivals = [(t - level_t0, n) for t, n in arrivals]
        res.ttfa_s = arrivals[0][0] - t0
        res.audio_s = sum(n for _, n in arrivals) / BYTES_PER_SECOND
        res.underruns, res.stall_s = play(arrivals, prebuffer_s)
    return res


# ------------------------------------------------------------------------------ load levels

@dataclass
class Level:
    kind: str  # "concurrency" or "rate"
    value: float
    requests: int = 0
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    audio_s: float = 0.0
    audio_s_per_s: float = 0.0
    rtf_mean: float | None = None
    ttfa_p50_ms: float | None = None
    ttfa_p95_ms: float | None = None
    ttfa_p99_ms: float | None = None
    new_connections: int = 0  # requests that opened a TCP connection (the others reused one)
    connect_p95_ms: float | None = None  # of those, the time until the connection was up
    sent_p50_ms: float | None = None  # time until the request was written
    headers_p50_ms: float | None = None  # time to the response's headers: the part of TTFA before audio streams
    e2e_p50_s: float | None = None
    e2e_p95_s: float | None = None
    e2e_p99_s: float | None = None
    underrun_requests: int = 0
    underruns: int = 0
    stall_s_total: float = 0.0
    errors: list[str] = field(default_factory=list)
    ramp_s: float = 0.0
    steady: dict | None = None  # SteadyState of a ramped closed loop
    engine: dict | None = None  # server_metrics.EngineView of the level, when the server has /metrics
    client_cpu: float | None = None  # this load generator's CPU time over the level's wall time (1.0: a core)
    client_lag_p99_ms: float | None = None  # how late this load generator's own event loop ran (sample_loop_lag)
    per_request: list[dict] = field(default_factory=list)  # `request_record` of each request, in order sent


def request_record(r: RequestResult) -> dict:
    """One request of a level, for reading its tail: when it was sent, what it waited for."""
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    return dict(sent_s=round(r.sent_s, 4), ok=r.ok, ttfa_ms=ms(r.ttfa_s), e2e_s=None if r.e2e_s is None else round(r.e2e_s, 4),
                audio_s=round(r.audio_s, 3), connect_ms=ms(r.connect_s), request_sent_ms=ms(r.request_sent_s),
                headers_ms=ms(r.headers_s), underruns=r.underruns)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = q / 100 * (len(xs) - 1)  # linear interpolation between closest ranks
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ttfa_percentiles_ms(ok: list[RequestResult]) -> dict[str, float | None]:
    """ttfa_p50_ms, ttfa_p95_ms and ttfa_p99_ms of these requests."""
    ttfa = [r.ttfa_s for r in ok]
    return {f"ttfa_p{q}_ms": None if not ttfa else round(1000 * percentile(ttfa, q), 1) for q in (50, 95, 99)}


def summarise(kind: str, value: float, results: list[RequestResult], wall_s: float) -> Level:
    ok = [r for r in results if r.ok]
    e2e = [r.e2e_s for r in ok]
    s3 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    s1 = lambda x: None if x is None else round(x, 1)  # noqa: E731
    audio = sum(r.audio_s for r in results)
    return Level(
        kind=kind, value=value, requests=len(results), ok=len(ok), failed=len(results) - len(ok),
        wall_s=round(wall_s, 3), audio_s=round(audio, 2), audio_s_per_s=round(audio / wall_s, 2) if wall_s else 0.0,
        rtf_mean=round(statistics.mean(r.e2e_s / r.audio_s for r in ok), 4) if ok else None,
        **ttfa_percentiles_ms(ok),
        new_connections=sum(1 for r in results if r.connect_s is not None),
        connect_p95_ms=s1(percentile([1000 * r.connect_s for r in results if r.connect_s is not None], 95)),
        sent_p50_ms=s1(percentile([1000 * r.request_sent_s for r in ok if r.request_sent_s is not None], 50)),
        headers_p50_ms=s1(percentile([1000 * r.headers_s for r in ok if r.headers_s is not None], 50)),
        e2e_p50_s=s3(percentile(e2e, 50)), e2e_p95_s=s3(percentile(e2e, 95)), e2e_p99_s=s3(percentile(e2e, 99)),
        underrun_requests=sum(1 for r in ok if r.underruns), underruns=sum(r.underruns for r in ok),
        stall_s_total=round(sum(r.stall_s for r in ok), 3),
        errors=sorted({f"{r.status}: {r.error}" for r in results if not r.ok})[:5],
        per_request=[request_record(r) for r in sorted(results, key=lambda r: r.sent_s)],
    )


@dataclass
class SteadyState:
    """A closed loop while every one of its clients is active."""

    window_s: float
    requests: int  # sent inside the window
    audio_s_per_s: float
    ttfa_p50_ms: float | None
    ttfa_p95_ms: float | None
    ttfa_p99_ms: float | None
    underrun_requests: int


def steady_state(results: list[RequestResult], window: tuple[float, float]) -> SteadyState | None:
    """Audio that arrived inside `window` (seconds since the level began) per second of it, and
    first-audio latency of the requests sent inside it; None if the window is empty."""
    start, end = window
    if end <= start:
        return None
    inside = [r for r in results if start <= r.sent_s < end]
    ok = [r for r in inside if r.ok]
    audio = sum(n for r in results for t, n in r.arrivals if start <= t < end) / BYTES_PER_SECOND
    return SteadyState(window_s=round(end - start, 3), requests=len(inside), audio_s_per_s=round(audio / (end - start), 2),
                       **ttfa_percentiles_ms(ok), underrun_requests=sum(1 for r in ok if r.underruns))


def new_client(timeout_s: float):
    import httpx

    # Idle connections expire before a server's keep-alive timeout (uvicorn's is 5 s, the same
    # as httpx's default expiry), so the client never reuses one the server is closing.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=512,
                                                 keepalive_expiry=4.0))


async def open_connections(client, base_url: str, headers: dict, n: int) -> None:
    """Leave `n` fresh connections in the client's pool for the level about to start. Opening ~100
    at once while it streams took a one-process client up to 1.9 s per connection on a GPU host,
    which "128 at once" then counted as first audio (NOTES §16); real clients each bring their
    own. `n` requests held open together force `n` distinct connections (requests one after
    another would reuse one); any answer keeps a connection alive, a 404 too."""
    url = base_url.rstrip("/") + "/health"
    entered = 0
    everyone_in = asyncio.Event()

    def arrived() -> None:
        nonlocal entered
        entered += 1
        if entered >= n:
            everyone_in.set()

    async def hold() -> None:
        try:
            async with client.stream("GET", url, headers=headers) as r:
                arrived()
                await everyone_in.wait()
                await r.aread()
        except Exception:  # the level opens what is missing; counted so nobody waits for this one
            arrived()  # (after a failure past the wait, when all are in already: a no-op)

    await asyncio.gather(*(hold() for _ in range(n)))


async def run_clients(client, url: str, headers: dict, indices: Iterable[int], bodies: Callable[[int], Iterable[dict]],
                      concurrency: int, ramp_s: float, t0: float, prebuffer_s: float
                      ) -> tuple[list[RequestResult], list[float], list[float]]:
    """Closed-loop clients `indices` of a level that started at `t0` (time.perf_counter): client i
    starts ramp_s * i / concurrency later and sends `bodies(i)` one after another. Returns the
    results, and when each client sent its first request and got its last reply (s since t0)."""
    results: list[RequestResult] = []
    first_sent: list[float] = []
    last_done: list[float] = []

    async def one_client(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + ramp_s * i / concurrency - time.perf_counter()))
        first_sent.append(time.perf_counter() - t0)
        for body in bodies(i):
            results.append(await one_request(client, url, headers, body, t0, prebuffer_s))
        last_done.append(time.perf_counter() - t0)

    await asyncio.gather(*(one_client(i) for i in indices))
    return results, first_sent, last_done


@dataclass
class ClientShare:
    """What one client process of a closed loop runs: its clients' request bodies, in order."""
    base_url: str
    headers: dict
    clients: dict[int, list[dict]]  # client index -> its requests' bodies
    concurrency: int  # of the whole level (a client's ramp offset is ramp_s * index / concurrency)
    ramp_s: float
    start_at: float  # time.perf_counter() at which the level starts, the same clock in every process
    prebuffer_s: float
    timeout_s: float


def run_client_share(share: ClientShare) -> dict:
    """A process pool's task: one share of a closed loop, in this process's own event loop."""
    return asyncio.run(_client_share(share))


async def _client_share(share: ClientShare) -> dict:
    client = new_client(share.timeout_s)
    await open_connections(client, share.base_url, share.headers, len(share.clients))
    url = share.base_url.rstrip("/") + "/v1/audio/speech"
    late_s = max(0.0, time.perf_counter() - share.start_at)  # connections not ready by the start
    cpu_before = process_cpu_s()
    lags: list[float] = []
    lag_sampler = asyncio.create_task(sample_loop_lag(lags))
    results, first_sent, last_done = await run_clients(client, url, share.headers, share.clients, share.clients.__getitem__,
                                                       share.concurrency, share.ramp_s, share.start_at, share.prebuffer_s)
    lag_sampler.cancel()
    await client.aclose()
    return dict(results=[asdict(r) for r in results], first_sent=first_sent, last_done=last_done,
                cpu_s=process_cpu_s() - cpu_before, lags=lags, late_s=late_s)


class LoadRunner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.url = args.url.rstrip("/") + "/v1/audio/speech"
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.prompts = load_prompts(Path(args.prompts))
        self.rng = random.Random(args.seed)
        self.counter = 0
        self.extra = json.loads(args.extra_body) if args.extra_body else {}
        self.client = new_client(args.timeout)
        self.pool: ProcessPoolExecutor | None = None  # --client-procs > 1: the client processes
        self.share_cpu_s, self.share_lags = 0.0, []  # what they used and saw in the last level

    def next_body(self, frames: int | None) -> dict:
        self.counter += 1
        text = self.rng.choice(self.prompts)
        return request_body(self.args.system, text, self.args.voice, self.args.language, frames,
                            self.args.seed * 1_000_003 + self.counter, self.args.model, self.extra)

    def in_processes(self, concurrency: int) -> bool:
        """Whether a closed loop of this many clients runs in --client-procs processes."""
        return self.args.client_procs > 1 and concurrency > 1

    async def closed_loop_in_processes(self, concurrency: int, per_client: int, frames: int | None,
                                       ramp_s: float) -> tuple[list[RequestResult], float, tuple[float, float]]:
        """`closed_loop` with the clients dealt round-robin to --client-procs processes, which
        open their connections first and start together at one moment of the shared clock."""
        procs = min(self.args.client_procs, concurrency)
        if self.pool is None:
            self.pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
            # the processes start (and import httpx) before any level counts on them
            await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(self.pool, time.sleep, 0.5)
                                   for _ in range(procs)))
        bodies = {i: [self.next_body(frames) for _ in range(per_client)] for i in range(concurrency)}
        start_at = time.perf_counter() + 1.0 + 0.01 * concurrency  # time to open the connections
        shares = [ClientShare(self.args.url, self.headers, {i: bodies[i] for i in range(p, concurrency, procs)},
                              concurrency, ramp_s, start_at, self.args.prebuffer_ms / 1000, self.args.timeout)
                  for p in range(procs)]
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(*(loop.run_in_executor(self.pool, run_client_share, sh) for sh in shares))
        late = max(d["late_s"] for d in done)
        if late > 0:
            print(f"warning: a client process was {late:.2f} s late to the level's start", file=sys.stderr)
        results = [RequestResult(**{**r, "arrivals": [tuple(a) for a in r["arrivals"]]}) for d in done for r in d["results"]]
        self.share_cpu_s = sum(d["cpu_s"] for d in done)
        self.share_lags = [lag for d in done for lag in d["lags"]]
        first_sent = [t for d in done for t in d["first_sent"]]
        last_done = [t for d in done for t in d["last_done"]]
        return results, max(last_done), (max(first_sent), min(last_done))

    async def closed_loop(self, concurrency: int, per_client: int, frames: int | None,
                          ramp_s: float = 0.0) -> tuple[list[RequestResult], float, tuple[float, float]]:
        """Results, wall time, and the window (seconds since the start) in which every client was active."""
        if self.in_processes(concurrency):
            return await self.closed_loop_in_processes(concurrency, per_client, frames, ramp_s)
        t0 = time.perf_counter()
        results, first_sent, last_done = await run_clients(
            self.client, self.url, self.headers, range(concurrency),
            lambda i: (self.next_body(frames) for _ in range(per_client)),  # made as sent, as they come
            concurrency, ramp_s, t0, self.args.prebuffer_ms / 1000)
        return results, time.perf_counter() - t0, (max(first_sent), min(last_done))

    async def open_loop(self, rate: float, duration_s: float, frames: int | None) -> tuple[list[RequestResult], float]:
        t0 = time.perf_counter()
        tasks = []
        arrival = 0.0
        while True:
            arrival += self.rng.expovariate(rate)
            if arrival > duration_s:
                break
            delay = t0 + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(self.client, self.url, self.headers, self.next_body(frames), t0,
                                                         self.args.prebuffer_ms / 1000)))
        results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - t0

    async def run(self) -> list[Level]:
        a = self.args
        levels = []
        plan = [("concurrency", float(c)) for c in _numbers(a.concurrency)] + [("rate", r) for r in _numbers(a.rates)]
        for kind, value in plan:
            n = int(value) if kind == "concurrency" else max(1, min(16, int(value)))
            if a.warmup_frames:
                # one-time costs of new batch shapes stay out of the measurement, for every system alike
                # vllm-omni's forced length is server-wide (min_tokens): a shorter request would
                # ask for max_tokens < min_tokens, which it never answers
                warmup_frames = a.frames if (a.system == "omni" and a.frames) else a.warmup_frames
                await self.closed_loop(n, 1, warmup_frames)
            if kind != "concurrency" or not self.in_processes(n):  # client processes open their own
                await open_connections(self.client, a.url, self.headers, n)
            before = await server_metrics.scrape(self.client, a.url, self.headers) if a.server_metrics else None
            cpu_before = process_cpu_s()
            lags: list[float] = []
            lag_sampler = asyncio.create_task(sample_loop_lag(lags))
            self.share_cpu_s, self.share_lags = 0.0, []
            if kind == "concurrency":
                ramp = a.ramp_s if value > 1 else 0.0
                results, wall, window = await self.closed_loop(int(value), a.rounds, a.frames, ramp)
            else:
                results, wall = await self.open_loop(value, a.duration, a.frames)
            lag_sampler.cancel()
            lags += self.share_lags
            level = summarise(kind, value, results, wall)
            level.client_lag_p99_ms = round(1000 * percentile(lags, 99), 1) if lags else None
            # A saturated load generator delays what it measures (first audio above all): say so.
            # (With client processes: their CPU summed, so up to the number of processes.)
            cpu_s = process_cpu_s() - cpu_before + self.share_cpu_s
            level.client_cpu = round(cpu_s / wall, 2) if wall else None
            if kind == "concurrency" and ramp > 0:
                level.ramp_s = ramp
                steady = steady_state(results, window)
                level.steady = asdict(steady) if steady else None
            if before is not None:
                if any(k.startswith("qwen3tts_codec") for k in before):
                    # the server polls its codec workers every 5 s: let the level's last calls arrive
                    await asyncio.sleep(CODEC_POLL_SETTLE_S)
                view = server_metrics.engine_view(before, await server_metrics.scrape(self.client, a.url, self.headers), wall)
                level.engine = asdict(view) if view else None
            levels.append(level)
            print(json.dumps({k: v for k, v in asdict(level).items() if k != "per_request"}), flush=True)
        await self.client.aclose()
        if self.pool is not None:
            self.pool.shutdown()
        return levels


async def sample_loop_lag(lags: list[float], tick_s: float = 0.02) -> None:
    """Append to `lags`, until cancelled, how late a timer due every `tick_s` fires in this event
    loop: a load generator behind its own schedule reads chunks late and delays what it measures."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        lags.append(max(0.0, loop.time() - due))


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _numbers(spec: str | None) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()] if spec else []


# ------------------------------------------------------------------------------ reports

COLUMNS = [("load", None), ("ok", "ok"), ("failed", "failed"), ("audio-s/s", "audio_s_per_s"), ("RTF", "rtf_mean"),
           ("TTFA p50 ms", "ttfa_p50_ms"), ("p95", "ttfa_p95_ms"), ("p99", "ttfa_p99_ms"),
           ("new conns", "new_connections"), ("connect p95 ms", "connect_p95_ms"), ("sent p50 ms", "sent_p50_ms"),
           ("headers p50 ms", "headers_p50_ms"), ("E2E p50 s", "e2e_p50_s"), ("p95 ", "e2e_p95_s"), ("underrun reqs", "underrun_requests"),
           ("stall s", "stall_s_total"), ("client CPU", "client_cpu"), ("client lag p99 ms", "client_lag_p99_ms")]


def load_label(level: dict) -> str:
    v = level["value"]
    return f"c={int(v)}" if level["kind"] == "concurrency" else f"{v:g} req/s"


ENGINE_COLUMNS = [("steps/s", "steps_per_s"), ("tokens/step", "tokens_per_step"), ("ITL ms", "itl_ms"),
                  ("engine TTFT ms", "engine_ttft_ms"), ("queue ms", "queue_ms"), ("prefill ms", "prefill_ms"),
                  ("server TTFA ms", "server_ttfa_ms"), ("server prep ms", "server_prepare_ms"),
                  ("API loop lag ms", "loop_lag_ms"), ("codec busy", "codec_busy"),
                  ("codec frames/call", "codec_frames_per_call")]


def markdown(report: dict) -> str:
    lines = [f"**{report['label']}** — {report['url']}, {report['frames'] or 'natural'} frames per request, "
             f"{report['date']}", "",
             "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for level in report["levels"]:
        cells = [load_label(level)] + [str(level.get(k)) for _, k in COLUMNS[1:]]  # older reports lack some
        lines.append("| " + " | ".join(cells) + " |")
    ramped = [lv for lv in report["levels"] if lv.get("steady")]
    if ramped:
        lines += ["", "Steady state (clients started over the ramp; the window in which every client is active):", "",
                  "| load | ramp s | window s | requests | audio-s/s | TTFA p50 ms | p95 | p99 | underrun reqs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for lv in ramped:
            st = lv["steady"]
            lines.append(f"| {load_label(lv)} | {lv['ramp_s']:g} | {st['window_s']} | {st['requests']} | "
                         f"{st['audio_s_per_s']} | {st['ttfa_p50_ms']} | {st['ttfa_p95_ms']} | {st['ttfa_p99_ms']} | "
                         f"{st['underrun_requests']} |")
    inside = [lv for lv in report["levels"] if lv.get("engine")]
    if inside:
        lines += ["", "Inside the server (its /metrics, means over the level; `benchmarks/server_metrics.py`):", "",
                  "| load | " + " | ".join(c for c, _ in ENGINE_COLUMNS) + " |",
                  "|" + "---|" * (len(ENGINE_COLUMNS) + 1)]
        for level in inside:
            lines.append("| " + " | ".join([load_label(level)] + [str(level["engine"].get(k)) for _, k in ENGINE_COLUMNS])
                         + " |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("concurrency", "rate") if any(lv["kind"] == k for r in reports for lv in r["levels"])]
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        ax_ttfa, ax_tput = axes[0][col], axes[1][col]
        for r in reports:
            levels = [lv for lv in r["levels"] if lv["kind"] == kind and lv["ok"]]
            if not levels:
                continue
            x = [lv["value"] for lv in levels]
            for key, style in (("ttfa_p50_ms", "-o"), ("ttfa_p95_ms", "--s"), ("ttfa_p99_ms", ":^")):
                ax_ttfa.plot(x, [lv[key] for lv in levels], style, label=f"{r['label']} {key.split('_')[1]}")
            ax_tput.plot(x, [lv["audio_s_per_s"] for lv in levels], "-o", label=r["label"])
        xlabel = "concurrent streams" if kind == "concurrency" else "arrival rate (req/s, Poisson)"
        ax_ttfa.set(xlabel=xlabel, ylabel="time to first audio (ms)", yscale="log")
        ax_tput.set(xlabel=xlabel, ylabel="audio-seconds per second")
        for ax in (ax_ttfa, ax_tput):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--system", choices=["ours", "omni"], default="ours", help="request dialect")
    ap.add_argument("--label", default=None, help="name in tables and plots (default: --system)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--voice", default="vivian")
    ap.add_argument("--language", default=None)
    ap.add_argument("--concurrency", default=None, help="closed-loop levels, e.g. 1,64,128")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at a concurrency level")
    ap.add_argument("--ramp-s", type=float, default=0.0,
                    help="start a closed loop's clients evenly over this many seconds (0: all at once) and "
                         "report its steady state; ~one request's duration keeps them out of lockstep")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="spread a closed loop's clients over this many processes (each its own event loop)")
    ap.add_argument("--rates", default=None, help="open-loop Poisson levels in requests/s, e.g. 1,20")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate level")
    ap.add_argument("--frames", type=int, default=None, help="force every request to this many frames")
    ap.add_argument("--warmup-frames", type=int, default=8, help="length of the warm-up requests (0: none)")
    ap.add_argument("--prebuffer-ms", type=float, default=0.0, help="player start delay after the first chunk")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-server-metrics", dest="server_metrics", action="store_false",
                    help="do not read the server's /metrics around each level")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None, help="JSON report (a .md table is written beside it)")
    ap.add_argument("--plot", default=None, help="PNG of TTFA and throughput against load")
    ap.add_argument("--plot-only", nargs="+", default=None, metavar="JSON", help="only plot these reports")
    args = ap.parse_args(argv)

    if args.plot_only:
        plot([json.loads(Path(p).read_text()) for p in args.plot_only], Path(args.plot or "load.png"))
        return 0
    if not args.concurrency and not args.rates:
        ap.error("give --concurrency and/or --rates")
    levels = asyncio.run(LoadRunner(args).run())
    report = dict(label=args.label or args.system, system=args.system, url=args.url, frames=args.frames,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(), argv=sys.argv[1:],
                  levels=[asdict(lv) for lv in levels])
    table = markdown(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(table)
    if args.plot:
        try:
            plot([report], Path(args.plot))
        except ImportError:
            print("matplotlib is not installed: no plot (make it later with --plot-only)")
    return 0 if all(lv.failed == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
