"""Soak of a running speech server: many mixed requests, every completed one's audio decoded and
checked, deliberate disconnects mixed in, memory of every server process sampled, and the server
checked to be idle afterwards. Exits non-zero on any failure, so it can gate a release.

Traffic (one seeded plan, so a run can be repeated exactly):
- kinds: whole file (`file`), raw audio stream (`stream`), server-sent events (`sse`), and
  WebSocket sessions (`ws`: several sentences sent in pieces, audio checked per sentence);
- formats: mp3, opus, aac, flac, wav, pcm;
- lengths: most requests force their length (min_new_tokens == max_new_tokens == --frames per
  sentence); the others only cap it;
- disconnects (`--disconnect-fraction`): a streamed request closed after its first bytes or
  cancelled a moment after it was sent (before its response headers, or just after), a whole-file
  request abandoned while it is synthesized, a WebSocket closed (or its TCP connection dropped)
  mid-utterance. The report says how far each got (`disconnects_reached`): one that finished
  before its moment came is read and checked like any other.

Checks of every completed response: its audio decodes (PyAV; raw PCM by length), is non-empty,
has the format's sample rate, and lasts as long as forced (within the codec's frame padding; a
capped request no longer than its cap). Outcomes: `ok`, `disconnected` (as planned), `error`
(a non-2xx status, a transport error, an SSE `speech.audio.error` or a WebSocket `error`
event, a stream that ends without its closing event), `lost` (a completed request with missing
or short audio), `undecodable`, `bad_audio` (wrong rate, or longer than asked).

Memory (`--server-pid`): RSS of the API server and of every descendant (engine core, codec
workers), sampled every `--memory-interval` s; per process the value after warm-up (the first
`--warmup-fraction` of requests), at the end, the growth between them, and the peak.

Idle (after the last request): `qwen3tts_requests_in_flight`, `vllm:num_requests_running`,
`vllm:num_requests_waiting`, `qwen3tts_codec_active_streams` (summed over workers) and any other
gauge of active or open streams all 0 within `--idle-timeout` s (the codec's are polled from the
workers every few seconds: they count once polled after the run).

    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --api-key KEY --server-pid PID \\
        --requests 10000 --concurrency 64 --frames 25 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import platform
import random
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
import server_metrics  # noqa: E402
from http_load import PROMPTS, SAMPLE_RATE, load_prompts, new_client, percentile, request_body  # noqa: E402

from vllm_qwen3tts.server.text_split import split_sentences  # noqa: E402

FRAME_SAMPLES = 1920  # one 80 ms codec frame at 24 kHz
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
KIND_WEIGHTS = {"file": 0.35, "stream": 0.30, "sse": 0.20, "ws": 0.15}
# The ways each kind of request is deliberately left.
DISCONNECTS = {
    "file": ("abandon",),
    "stream": ("cancel_early", "after_first_bytes"),
    "sse": ("cancel_early", "after_first_bytes"),
    "ws": ("close_mid_utterance", "drop_mid_utterance"),
}
OUTCOMES = ("ok", "disconnected", "error", "lost", "undecodable", "bad_audio")
FAILURES = ("error", "lost", "undecodable", "bad_audio")
# What FFmpeg decodes each format at (Opus always at 48 kHz), and how far a decoded length may
# stray from the samples sent, at that rate: encoder delay and last-frame padding (mp3 streams
# lack the LAME tag that trims them; ADTS has no field for the AAC priming samples).
DECODED_RATE = {"opus": 48_000}
EXTRA_SAMPLES = {"mp3": 2 * 1152, "aac": 2 * 1152, "opus": 1920}
SHORT_SAMPLES = {"opus": 1920}
IDLE_GAUGES = ("qwen3tts_requests_in_flight", "vllm:num_requests_running", "vllm:num_requests_waiting",
               "qwen3tts_codec_active_streams")
# Other gauges of streams held open, by name (a capacity gauge such as *_max_streams is no such thing).
CODEC_STREAM_GAUGE = re.compile(r"^# TYPE (qwen3tts_\w*(?:active|open)\w*stream\w*) gauge", re.MULTILINE)
CODEC_POLLED_AT = "qwen3tts_codec_stats_timestamp_seconds"


# ------------------------------------------------------------------------------ the plan

@dataclass
class Plan:
    """One request of the soak, decided before the run from the seed."""

    index: int
    kind: str  # file | stream | sse | ws
    fmt: str
    text: str
    voice: str | None
    frames: int  # per sentence: forced to it, or capped at it
    forced: bool
    seed: int
    disconnect: str | None = None  # one of DISCONNECTS[kind], or None: read to the end
    disconnect_after_s: float = 0.0  # cancel_early / abandon: cancel after this long
    pieces: list[str] = field(default_factory=list)  # ws: the text as sent, in pieces

    @property
    def sentences(self) -> int:
        return len(split_sentences(self.text))


def make_plan(n: int, seed: int, prompts: list[str], voices: list[str], frames: int, disconnect_fraction: float,
              forced_fraction: float = 0.85) -> list[Plan]:
    """`n` requests drawn from `seed`: kinds by KIND_WEIGHTS, formats uniformly, one prompt per
    HTTP request and two or three per WebSocket session."""
    rng = random.Random(seed)
    kinds, weights = zip(*KIND_WEIGHTS.items())
    plans = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        text = " ".join(rng.choice(prompts) for _ in range(rng.randint(2, 3) if kind == "ws" else 1))
        plan = Plan(index=i, kind=kind, fmt=rng.choice(FORMATS), text=text, voice=rng.choice(voices) if voices else None,
                    frames=frames, forced=rng.random() < forced_fraction, seed=rng.randrange(2**31))
        if rng.random() < disconnect_fraction:
            plan.disconnect = rng.choice(DISCONNECTS[kind])
            plan.disconnect_after_s = rng.uniform(0.02, 0.3) if plan.disconnect == "abandon" else rng.uniform(0.0, 0.05)
        if kind == "ws":
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 6)))
            plan.pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        plans.append(plan)
    return plans


def speech_body(plan: Plan) -> dict:
    """The request body of an HTTP plan (a WebSocket's session.config is this without input)."""
    body = request_body("ours", plan.text, plan.voice, None, plan.frames if plan.forced else None, plan.seed, None,
                        {"response_format": plan.fmt, "max_new_tokens": plan.frames})
    body.pop("stream_format")  # a raw audio stream there
    if plan.kind in ("stream", "sse"):
        body["stream_format"] = "audio" if plan.kind == "stream" else "sse"
    return body


# ------------------------------------------------------------------------------ audio checks

def decoded_length(data: bytes, fmt: str) -> tuple[int, int]:
    """(samples, sample rate) of one response's audio as a client decodes it; raises if it does not."""
    if fmt == "pcm":
        if len(data) % 2:
            raise ValueError(f"{len(data)} bytes of 16-bit PCM")
        return len(data) // 2, SAMPLE_RATE
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        if stream.codec_context.channels != 1:
            raise ValueError(f"{stream.codec_context.channels} channels")
        return sum(frame.samples for frame in container.decode(stream)), stream.rate


def check_audio(data: bytes, fmt: str, frames: int, forced: bool) -> tuple[str | None, str, float]:
    """(problem or None, detail, seconds) of the audio of `frames` frames (exactly, if `forced`;
    at most, if not) in `fmt`: `lost`, `undecodable` or `bad_audio` (see the module's doc)."""
    if not data:
        return "lost", "no audio bytes", 0.0
    try:
        samples, rate = decoded_length(data, fmt)
    except Exception as e:  # noqa: BLE001 - whatever the decoder says is the finding
        return "undecodable", f"{fmt}: {type(e).__name__}: {e}"[:300], 0.0
    seconds = samples / rate if rate else 0.0
    if samples == 0:
        return "lost", f"{fmt}: {len(data)} bytes decode to no samples", 0.0
    if rate != DECODED_RATE.get(fmt, SAMPLE_RATE):
        return "bad_audio", f"{fmt}: {rate} Hz, expected {DECODED_RATE.get(fmt, SAMPLE_RATE)}", seconds
    expected = frames * FRAME_SAMPLES * rate // SAMPLE_RATE
    if forced and samples < expected - SHORT_SAMPLES.get(fmt, 0):
        return "lost", f"{fmt}: {samples} samples, expected {expected} ({frames} frames)", seconds
    if samples > expected + EXTRA_SAMPLES.get(fmt, 0):
        return "bad_audio", f"{fmt}: {samples} samples, at most {expected} ({frames} frames) expected", seconds
    return None, "", seconds


# ------------------------------------------------------------------------------ one request

@dataclass
class Result:
    index: int
    kind: str
    fmt: str
    disconnect: str | None
    outcome: str = "ok"  # one of OUTCOMES
    status: int | None = None
    detail: str = ""
    reached: str = "sent"  # how far it got: sent | headers | audio | done
    audio_s: float = 0.0
    e2e_s: float = 0.0


def ended(res: Result, outcome: str, detail: str) -> Result:
    """`res` with this outcome (one of OUTCOMES) and what explains it."""
    res.outcome, res.detail = outcome, detail[:300]
    return res


async def checked(res: Result, pieces: list[bytes], fmt: str, frames: int, forced: bool) -> Result:
    """`res` with the outcome of the audio check of each piece (one per WebSocket sentence, else one)."""
    for data in pieces:
        problem, detail, seconds = await asyncio.to_thread(check_audio, data, fmt, frames, forced)
        res.audio_s += seconds
        if problem and res.outcome == "ok":
            ended(res, problem, detail)
    res.audio_s = round(res.audio_s, 3)
    return res


async def http_exchange(client, url: str, plan: Plan, res: Result) -> Result:
    """One HTTP request of `plan`, read as its kind says; `res.reached` tracks its progress."""
    async with client.stream("POST", url, json=speech_body(plan)) as r:
        res.status, res.reached = r.status_code, "headers"
        if r.status_code != 200:
            return ended(res, "error", f"{r.status_code}: {(await r.aread()).decode(errors='replace')}")
        audio = bytearray()
        if plan.kind == "sse":
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "speech.audio.delta":
                    audio += base64.b64decode(event["audio"])
                    res.reached = "audio"
                    if plan.disconnect == "after_first_bytes":
                        return ended(res, "disconnected", "")
                elif event["type"] == "speech.audio.error":
                    return ended(res, "error", f"speech.audio.error: {json.dumps(event.get('error'))}")
                elif event["type"] == "speech.audio.done":
                    done = True
            if not done:
                return ended(res, "error", "the SSE stream ended without speech.audio.done")
        else:
            async for chunk in r.aiter_raw():
                audio += chunk
                res.reached = "audio"
                if plan.disconnect == "after_first_bytes":
                    return ended(res, "disconnected", "")
    res.reached = "done"
    return await checked(res, [bytes(audio)], plan.fmt, plan.frames * plan.sentences, plan.forced)


async def ws_exchange(base_url: str, headers: dict, plan: Plan, res: Result) -> Result:
    """One WebSocket session of `plan`: config, the text in pieces, input.done; audio per sentence."""
    import websockets

    config = {k: v for k, v in speech_body(plan).items() if k not in ("input", "stream_format")}
    url = base_url.replace("http", "ws", 1).rstrip("/") + "/v1/audio/speech/stream"
    async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "session.config", "text_mode": "sentence", **config}))  # audio per sentence
        for piece in plan.pieces:
            await ws.send(json.dumps({"type": "input.text", "text": piece}))
        await ws.send(json.dumps({"type": "input.done"}))
        audio: dict[int, bytearray] = {}
        current = None
        async for message in ws:
            if isinstance(message, bytes):
                if current is None:
                    return ended(res, "error", "audio before audio.start")
                audio[current] += message
                res.reached = "audio"
                if plan.disconnect == "close_mid_utterance":
                    await ws.close()
                    return ended(res, "disconnected", "")
                if plan.disconnect == "drop_mid_utterance":
                    ws.transport.abort()  # no close frame: a client that crashed
                    return ended(res, "disconnected", "")
                continue
            event = json.loads(message)
            if event["type"] == "session.created":
                res.reached = "headers"
            elif event["type"] == "audio.start":
                current = event["sentence_index"]
                audio[current] = bytearray()
            elif event["type"] == "error":
                return ended(res, "error", f"error event: {json.dumps(event)}")
            elif event["type"] == "session.done":
                res.reached = "done"
                break
        else:
            return ended(res, "error", "the WebSocket closed before session.done")
    expected = plan.sentences
    if sorted(audio) != list(range(expected)):
        return ended(res, "lost", f"audio for sentences {sorted(audio)}, expected {expected}")
    return await checked(res, [bytes(audio[i]) for i in range(expected)], plan.fmt, plan.frames, plan.forced)


async def run_one(client, base_url: str, headers: dict, plan: Plan, timeout_s: float) -> Result:
    """`plan` sent and read, or left as planned; any exception is the request's error."""
    res = Result(plan.index, plan.kind, plan.fmt, plan.disconnect)
    t0 = time.perf_counter()
    if plan.kind == "ws":
        exchange = ws_exchange(base_url, headers, plan, res)
    else:
        exchange = http_exchange(client, base_url.rstrip("/") + "/v1/audio/speech", plan, res)
    task = asyncio.create_task(asyncio.wait_for(exchange, timeout_s))
    try:
        if plan.disconnect in ("cancel_early", "abandon"):
            # a stream: a moment after sending, before its headers or just after them; a whole
            # file: while it is synthesized (once its body arrives, it is read to the end)
            done, _ = await asyncio.wait({task}, timeout=plan.disconnect_after_s)
            if not done and (plan.disconnect == "cancel_early" or res.reached in ("sent", "headers")):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return ended(res, "disconnected", "")
        res = await task
    except asyncio.TimeoutError:
        ended(res, "error", f"no end after {timeout_s:g} s (reached {res.reached})")
    except Exception as e:  # noqa: BLE001 - a transport error is a finding, the run goes on
        ended(res, "error", f"{type(e).__name__}: {e} (reached {res.reached})")
    finally:
        res.e2e_s = round(time.perf_counter() - t0, 3)
    return res


# ------------------------------------------------------------------------------ memory

def process_role(proc, root_pid: int) -> str:
    """api_server (the process given), engine_core, engine_worker, codec_worker, or the process's own name."""
    if proc.pid == root_pid:
        return "api_server"
    text = " ".join([proc.name(), *proc.cmdline()])
    for role, marker in (("codec_worker", "codec.worker"), ("engine_core", "EngineCore"), ("engine_worker", "Worker")):
        if marker in text:
            return role
    return proc.name()


class MemorySampler:
    """RSS of a process and all its descendants, every `interval_s` in a thread, each sample
    tagged with the number of requests finished by then (`progress()`)."""

    def __init__(self, pid: int, interval_s: float, progress: Callable[[], int]):
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.progress = progress
        self.processes: dict[str, dict] = {}  # label -> pid, role, cmd
        self.series: list[dict] = []  # {t_s, done, rss_mb: {label: MB}}
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        rss: dict[str, float] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                mb = p.memory_info().rss / 2**20
                role = process_role(p, self.root.pid)
                label = f"{role}[{p.pid}]"
                if label not in self.processes:
                    self.processes[label] = {"pid": p.pid, "role": role, "cmd": " ".join(p.cmdline())[:160]}
            except psutil.Error:  # gone between the listing and the read
                continue
            rss[label] = round(mb, 1)
        self.series.append({"t_s": round(time.perf_counter() - self.t0, 1), "done": self.progress(), "rss_mb": rss})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the end: after the run (and the idle check)

    def report(self, warmup_requests: int) -> dict:
        """Per process: MB after warm-up (the first sample once `warmup_requests` had finished), at
        the end, their difference, and the peak; and the same for all processes together."""
        after = next((s for s in self.series if s["done"] >= warmup_requests), self.series[-1])
        end = self.series[-1]
        per = {}
        for label, info in self.processes.items():
            values = [s["rss_mb"][label] for s in self.series if label in s["rss_mb"]]
            w, e = after["rss_mb"].get(label), end["rss_mb"].get(label)
            per[label] = {**info, "first_mb": values[0], "after_warmup_mb": w, "end_mb": e, "peak_mb": max(values),
                          "growth_mb": None if w is None or e is None else round(e - w, 1)}
        total_w, total_e = sum(after["rss_mb"].values()), sum(end["rss_mb"].values())
        return {"interval_s": self.interval_s, "warmup_requests": warmup_requests, "after_warmup_t_s": after["t_s"],
                "processes": per, "total": {"after_warmup_mb": round(total_w, 1), "end_mb": round(total_e, 1),
                                            "growth_mb": round(total_e - total_w, 1)},
                "series": self.series}


# ------------------------------------------------------------------------------ idle check

async def wait_until_idle(client, base_url: str, timeout_s: float) -> dict:
    """Poll /metrics until every idle gauge reads 0 (ok) or `timeout_s` passes (not ok); the
    values last read, and what was missing (a missing gauge is not idle). Where the server says
    when it last polled its codec workers (`CODEC_POLLED_AT`), their gauges count only once polled
    after this call began (same host: one clock)."""
    t0, since = time.perf_counter(), time.time()
    values: dict[str, float] = {}
    missing: list[str] = list(IDLE_GAUGES)
    while True:
        try:
            r = await client.get(base_url.rstrip("/") + "/metrics", timeout=10.0)
            text = r.text if r.status_code == 200 else ""
            names = [*IDLE_GAUGES, *(n for n in CODEC_STREAM_GAUGE.findall(text) if n not in IDLE_GAUGES)]
            values = server_metrics.parse(text, names)
            missing = [n for n in names if n not in values]
            polled_at = server_metrics.parse(text, [CODEC_POLLED_AT]).get(CODEC_POLLED_AT)
            if polled_at is not None and polled_at < since:
                missing.append("codec gauges polled after the run")
            if r.status_code != 200:
                missing = [f"/metrics answered {r.status_code}"]
        except Exception as e:  # noqa: BLE001 - a server that does not answer is not idle
            missing = [f"/metrics: {type(e).__name__}: {e}"]
        waited = time.perf_counter() - t0
        if not missing and not any(values.values()):
            return {"ok": True, "waited_s": round(waited, 1), "values": values, "missing": []}
        if waited > timeout_s:
            return {"ok": False, "waited_s": round(waited, 1), "values": values, "missing": missing}
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------ the run

async def soak(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = new_client(args.timeout)
    client.headers.update(headers)  # /metrics too: it may want the key
    voices = args.voice or await server_voices(client, args.base_url)
    plans = make_plan(args.requests, args.seed, load_prompts(Path(args.prompts)), voices, args.frames,
                      args.disconnect_fraction)
    results: list[Result] = []
    sampler = MemorySampler(args.server_pid, args.memory_interval, lambda: len(results)) if args.server_pid else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    deadline = t0 + args.max_duration_s if args.max_duration_s else None
    queue = iter(plans)
    step = max(1, args.requests // 10)

    async def client_loop() -> None:
        for plan in queue:
            if deadline and time.perf_counter() > deadline:
                return
            results.append(await run_one(client, args.base_url, headers, plan, args.timeout))
            if len(results) % step == 0:
                bad = sum(r.outcome in FAILURES for r in results)
                print(f"{len(results)}/{args.requests} requests, {bad} failed, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)

    await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    idle = await wait_until_idle(client, args.base_url, args.idle_timeout)
    await client.aclose()
    memory = None
    if sampler:
        sampler.stop()
        memory = sampler.report(int(args.warmup_fraction * args.requests))
    return build_report(args, plans, sorted(results, key=lambda r: r.index), wall, idle, memory, voices)


async def server_voices(client, base_url: str) -> list[str]:
    """The voices this key may use (built-in speakers first), or none (the server's default)."""
    r = await client.get(base_url.rstrip("/") + "/v1/audio/voices", timeout=30.0)
    r.raise_for_status()
    return list(r.json().get("voices") or [])


def build_report(args: argparse.Namespace, plans: list[Plan], results: list[Result], wall_s: float, idle: dict,
                 memory: dict | None, voices: list[str]) -> dict:
    by_kind = {k: Counter(r.outcome for r in results if r.kind == k) for k in KIND_WEIGHTS}
    by_format = {f: Counter(r.outcome for r in results if r.fmt == f) for f in FORMATS}
    disconnects = {d: Counter(r.reached for r in results if r.disconnect == d)
                   for d in sorted({d for ds in DISCONNECTS.values() for d in ds})}
    totals = Counter(r.outcome for r in results)
    latency = {}
    for kind in KIND_WEIGHTS:
        e2e = [r.e2e_s for r in results if r.kind == kind and r.outcome == "ok"]
        latency[kind] = {"e2e_p50_s": percentile(e2e, 50), "e2e_p95_s": percentile(e2e, 95),
                         "e2e_max_s": max(e2e) if e2e else None}
    reasons = [f"{totals[o]} {o}" for o in FAILURES if totals[o]]
    if len(results) < len(plans):
        reasons.append(f"stopped after {len(results)} of {len(plans)} requests (--max-duration-s)")
    if not idle["ok"]:
        reasons.append("not idle after the run")
    if memory and args.max_growth_mb is not None and memory["total"]["growth_mb"] > args.max_growth_mb:
        reasons.append(f"memory grew {memory['total']['growth_mb']} MB after warm-up (limit {args.max_growth_mb})")
    return {
        "base_url": args.base_url, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
        "argv": sys.argv[1:],
        "config": {"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed, "frames": args.frames,
                   "disconnect_fraction": args.disconnect_fraction, "voices": voices},
        "wall_s": round(wall_s, 1), "requests_done": len(results),
        "requests_per_s": round(len(results) / wall_s, 2) if wall_s else None,
        "audio_s": round(sum(r.audio_s for r in results), 1),
        "totals": {o: totals[o] for o in OUTCOMES},
        "by_kind": {k: {o: c[o] for o in OUTCOMES} for k, c in by_kind.items()},
        "by_format": {f: {o: c[o] for o in OUTCOMES} for f, c in by_format.items()},
        "disconnects_reached": {d: dict(c) for d, c in disconnects.items()},
        "latency": latency,
        "examples": {o: [asdict(r) for r in results if r.outcome == o][:8] for o in FAILURES},
        "idle": idle, "memory": memory,
        "passed": not reasons, "failures": reasons,
        "results": [asdict(r) for r in results],
    }


def table(report: dict) -> str:
    lines = [f"soak of {report['base_url']}: {report['requests_done']} requests in {report['wall_s']} s "
             f"({report['requests_per_s']} req/s, {report['audio_s']} s of audio checked), "
             f"concurrency {report['config']['concurrency']}, {report['config']['frames']} frames per sentence", "",
             f"{'kind':<8}" + "".join(f"{o:>14}" for o in OUTCOMES) + f"{'E2E p50 s':>11}{'p95':>8}"]
    for kind, counts in [*report["by_kind"].items(), ("all", report["totals"])]:
        lat = report["latency"].get(kind, {})
        p50, p95 = lat.get("e2e_p50_s"), lat.get("e2e_p95_s")
        lines.append(f"{kind:<8}" + "".join(f"{counts[o]:>14}" for o in OUTCOMES)
                     + (f"{p50:>11.2f}{p95:>8.2f}" if p50 is not None else ""))
    lines.append("formats: " + ", ".join(f"{f} {c['ok']}/{sum(c.values())} ok" for f, c in report["by_format"].items()))
    if any(report["disconnects_reached"].values()):
        reached = report["disconnects_reached"]
        lines.append("disconnects (how far they got): " + "; ".join(
            f"{d} " + " ".join(f"{k}={v}" for k, v in sorted(c.items())) for d, c in reached.items() if c))
    for outcome, examples in report["examples"].items():
        for ex in examples[:3]:
            lines.append(f"  {outcome}: #{ex['index']} {ex['kind']} {ex['fmt']} status {ex['status']}: {ex['detail']}")
    memory = report["memory"]
    if memory:
        lines += ["", f"{'memory (RSS, MB)':<40}{'after warm-up':>14}{'end':>10}{'growth':>10}{'peak':>10}"]
        for label, p in sorted(memory["processes"].items(), key=lambda kv: (kv[1]["role"] != "api_server", kv[0])):
            cells = [p["after_warmup_mb"], p["end_mb"], p["growth_mb"], p["peak_mb"]]
            lines.append(f"{label:<40}" + "".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (14, 10, 10, 10))))
        t = memory["total"]
        lines.append(f"{'all':<40}{t['after_warmup_mb']:>14}{t['end_mb']:>10}{t['growth_mb']:>10}")
    idle = report["idle"]
    lines += ["", f"idle after the run: {'yes' if idle['ok'] else 'NO'} (waited {idle['waited_s']} s; "
              + ", ".join(f"{k} {v:g}" for k, v in idle["values"].items())
              + (f"; missing: {', '.join(idle['missing'])}" if idle["missing"] else "") + ")",
              "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None, help="sent on every request, /metrics included")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--frames", type=int, default=25, help="frames per sentence (forced, or the cap)")
    ap.add_argument("--disconnect-fraction", type=float, default=0.1)
    ap.add_argument("--voice", action="append", help="voices to draw from (default: the server's list)")
    ap.add_argument("--prompts", default=str(PROMPTS), help="texts, one per line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-pid", type=int, default=None, help="sample the RSS of this process and its descendants")
    ap.add_argument("--memory-interval", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--warmup-fraction", type=float, default=0.1,
                    help="memory growth is counted from when this share of the requests has finished")
    ap.add_argument("--max-growth-mb", type=float, default=None, help="fail if all processes together grew more")
    ap.add_argument("--idle-timeout", type=float, default=15.0, help="seconds the server has to return to idle")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    ap.add_argument("--max-duration-s", type=float, default=None,
                    help="send no new request after this many seconds (the run then fails as incomplete)")
    ap.add_argument("--out", default=None, help="JSON report (every request's record in OUT.requests.jsonl beside it)")
    args = ap.parse_args(argv)

    report = asyncio.run(soak(args))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        results = report.pop("results")  # one line each, beside the report
        report["results_file"] = out.with_suffix(".requests.jsonl").name
        out.with_suffix(".requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        out.write_text(json.dumps(report, indent=1))
    print(table(report), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
