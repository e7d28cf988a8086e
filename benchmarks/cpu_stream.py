"""What one stream costs on the CPU build: for each checkpoint, start the speech server as a CPU
user would (`vllm-qwen3tts serve --model M --device cpu --port P`), time its start until `/ready`,
then stream `--requests` requests one at a time with the stock `openai` client (raw PCM, every
request forced to `--frames` frames) and report per checkpoint the time to first audio (p50,
max), the real-time factor (wall time / audio seconds; mean, p50), the milliseconds per frame
after the first audio, and the server's resident memory (its process tree, after the run); plus
the machine (CPU model, cores, RAM, torch threads, load average) and the versions, so a number
can be quoted with what it was measured on.

Random weights never decide to stop, so every request is forced to `--frames` frames
(`min_new_tokens == max_new_tokens`, 12.5 frames per audio second), as `http_load.py` does; the
input is one sentence (a longer input is split into sentences, each forced to that length).

    python benchmarks/cpu_stream.py --make-checkpoints /tmp/cpu_bench --requests 5 --frames 50 \\
        --out cpu_stream.json
    python benchmarks/cpu_stream.py --model 0.6B=/path/to/ckpt --model 1.7B=Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice

`--make-checkpoints DIR` writes the random-weight checkpoints of `--variants` at `--scale` under
DIR (`DIR/VARIANT-SCALE`; one already there is reused) and measures them after any `--model`.
Each server's log is kept beside `--out` (`OUT_STEM.LABEL.server.log`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

SAMPLE_RATE = 24_000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # 16-bit mono PCM
FRAMES_PER_SECOND = 12.5
DEFAULT_TEXT = "The train to Edinburgh leaves from platform nine at twenty past seven."
DEFAULT_VARIANTS = "0.6b-custom_voice,1.7b-custom_voice"


@dataclass
class RequestResult:
    """One streamed request; times in seconds from just before the client call."""
    ttfa_s: float
    total_s: float
    audio_s: float
    chunks: int
    warmup: bool

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s

    @property
    def ms_per_frame(self) -> float:
        """Wall time per frame after the first audio: the steady generation rate."""
        frames = self.audio_s * FRAMES_PER_SECOND
        return 1000 * (self.total_s - self.ttfa_s) / max(frames - 1, 1)


@dataclass
class ModelReport:
    label: str
    model: str
    params: dict[str, int] | None
    start_to_ready_s: float
    requests: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    server_log: str = ""
    engine_threads: dict = field(default_factory=dict)  # what the server's log says of its CPU binding
    stopped: str = ""  # "SIGTERM" or "SIGKILL"


# ------------------------------------------------------------------------------ the machine

def machine_info() -> dict:
    """Where the numbers come from: CPU model, cores, memory, torch's thread count, the load."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), platform.processor())
    return dict(
        host=platform.node(), cpu_model=model, logical_cpus=os.cpu_count(),
        physical_cores=psutil.cpu_count(logical=False), usable_cpus=len(os.sched_getaffinity(0)),
        ram_gib=round(psutil.virtual_memory().total / 2**30, 1),
        ram_available_gib=round(psutil.virtual_memory().available / 2**30, 1),
        torch_threads=torch.get_num_threads(), load_average_1_5_15=[round(x, 2) for x in os.getloadavg()],
        env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                        "VLLM_CPU_NUM_OF_RESERVED_CPU", "QWEN3TTS_COMPILE") if k in os.environ},
        platform=platform.platform(), python=platform.python_version())


def versions() -> dict:
    from importlib import metadata

    from vllm_qwen3tts import __version__
    from vllm_qwen3tts.base.vllm_adapter import installed_vllm_version

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "--short", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return dict(vllm_qwen3tts=__version__, commit=commit, tree_modified=bool(dirty) if dirty is not None else None,
                vllm=installed_vllm_version(), torch=version("torch"), openai=version("openai"))


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def parameter_counts(model: str) -> dict[str, int] | None:
    """Parameters of the talker (code predictor included) and of the speech tokenizer, read from
    the safetensors headers; None where the checkpoint is not a local directory or hub snapshot."""
    from safetensors import safe_open

    from vllm_qwen3tts.base.model_source import resolve_checkpoint

    try:
        root = resolve_checkpoint(model)
    except Exception:  # noqa: BLE001 - a count is a nicety; the server reports real errors
        return None

    def count(directory: Path) -> int:
        total = 0
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        return total

    return dict(talker=count(root), speech_tokenizer=count(root / "speech_tokenizer"))


# ------------------------------------------------------------------------------ checkpoints

def make_checkpoints(directory: Path, variants: list[str], scale: str, command: str) -> list[tuple[str, str]]:
    """(label, path) of each variant's random-weight checkpoint under `directory`, made with
    `make-checkpoint` unless a complete one is there (written to a temporary name, then renamed)."""
    out = []
    for variant in variants:
        path = directory / f"{variant}-{scale}"
        if not ((path / "config.json").is_file() and (path / "speech_tokenizer" / "model.safetensors").is_file()):
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            print(f"making {path} ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run([command, "make-checkpoint", "--variant", variant, "--scale", scale, "--out", str(tmp)],
                           check=True)
            os.replace(tmp, path)
            print(f"made {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        out.append((path.name, str(path)))
    return out


# ------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: str, model: str, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    """`vllm-qwen3tts serve` as a CPU user starts it, in a process group of its own."""
    argv = [command, "serve", "--model", model, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            *extra]
    print("$", " ".join(argv), flush=True)
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(server: subprocess.Popen, port: int, timeout_s: float, log: Path) -> None:
    """Returns once `/ready` answers 200; raises if the server exits first or `timeout_s` passes."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with status {server.returncode} before ready; log tail:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s (log: {log})")


def server_memory(pid: int) -> dict:
    """Resident memory of the server's process tree: per process RSS (and PSS, which splits
    shared pages, so the PSS total does not count them twice), and the totals, in MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    per = []
    for p in procs:
        try:
            info = p.memory_full_info()
            per.append(dict(pid=p.pid, name=" ".join(p.cmdline()[:3])[:100] or p.name(),
                            rss_mib=round(info.rss / 2**20, 1), pss_mib=round(getattr(info, "pss", 0) / 2**20, 1)))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return dict(rss_total_mib=round(sum(p["rss_mib"] for p in per), 1),
                pss_total_mib=round(sum(p["pss_mib"] for p in per), 1), processes=per)


def stop_server(server: subprocess.Popen, grace_s: float) -> str:
    """SIGTERM to the server's process group, SIGKILL after `grace_s`; says which ended it."""
    if server.poll() is not None:
        return "exited"
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(grace_s)
        return "SIGTERM"
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return "SIGKILL"
    except ProcessLookupError:
        server.wait()
        return "exited"


# ------------------------------------------------------------------------------ the requests

def stream_one(client, text: str, voice: str, language: str | None, frames: int, seed: int,
               warmup: bool) -> RequestResult:
    """One streamed PCM request forced to `frames` frames, timed from just before the call."""
    body = {"max_new_tokens": frames, "min_new_tokens": frames, "seed": seed}
    if language:
        body["language"] = language
    t0 = time.perf_counter()
    ttfa, nbytes, chunks = None, 0, 0
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input=text, response_format="pcm", stream_format="audio",
            extra_body=body) as response:
        for chunk in response.iter_bytes():
            if not chunk:
                continue
            if ttfa is None:
                ttfa = time.perf_counter() - t0
            nbytes += len(chunk)
            chunks += 1
    total = time.perf_counter() - t0
    if ttfa is None:
        raise RuntimeError("the response carried no audio")
    return RequestResult(ttfa_s=ttfa, total_s=total, audio_s=nbytes / BYTES_PER_SECOND, chunks=chunks, warmup=warmup)


def summarize(results: list[RequestResult]) -> dict[str, float]:
    measured = [r for r in results if not r.warmup]
    ttfa = [r.ttfa_s for r in measured]
    rtf = [r.rtf for r in measured]
    return dict(requests=len(measured), audio_s_per_request=round(statistics.mean(r.audio_s for r in measured), 3),
                audio_s_min=round(min(r.audio_s for r in measured), 3),
                ttfa_p50_ms=round(1000 * statistics.median(ttfa), 1), ttfa_max_ms=round(1000 * max(ttfa), 1),
                rtf_mean=round(statistics.mean(rtf), 4), rtf_p50=round(statistics.median(rtf), 4),
                ms_per_frame_p50=round(statistics.median(r.ms_per_frame for r in measured), 1))


def measure(args: argparse.Namespace, command: str, label: str, model: str, log: Path) -> ModelReport:
    from openai import OpenAI

    report = ModelReport(label=label, model=model, params=parameter_counts(model), start_to_ready_s=0.0,
                         server_log=str(log))
    port = free_port()
    t0 = time.perf_counter()
    server = start_server(command, model, port, args.server_arg, log)
    try:
        wait_ready(server, port, args.ready_timeout, log)
        report.start_to_ready_s = round(time.perf_counter() - t0, 1)
        print(f"{label}: ready after {report.start_to_ready_s:.1f} s", flush=True)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                        timeout=args.request_timeout)
        results = []
        for i in range(args.warmup_requests + args.requests):
            warmup = i < args.warmup_requests
            r = stream_one(client, args.text, args.voice, args.language, args.frames, args.seed + i, warmup)
            results.append(r)
            print(f"  {'warm-up' if warmup else 'request'} {i}: first audio {1000 * r.ttfa_s:.0f} ms, "
                  f"{r.total_s:.2f} s for {r.audio_s:.2f} s of audio (RTF {r.rtf:.3f})", flush=True)
        report.requests = [dict(asdict(r), rtf=round(r.rtf, 4), ms_per_frame=round(r.ms_per_frame, 1))
                           for r in results]
        report.summary = summarize(results)
        report.memory = server_memory(server.pid)
    finally:
        report.stopped = stop_server(server, args.stop_grace)
    report.engine_threads = engine_threads(log.read_text(errors="replace"))
    return report


def engine_threads(log: str) -> dict:
    """The CPU binding vLLM's CPU worker logs at start (it may keep cores for other processes and
    lower torch's threads): the cores the model runs on, its torch threads, and the lines."""
    cores = re.findall(r"core ids=(\[[^\]]*\])", log)
    threads = re.findall(r"Reducing Torch threads from \d+ to (\d+)", log)
    lines = [line.split("] ", 1)[-1].strip() for line in log.splitlines()
             if "ompmultiprocessing" in line or "Torch threads" in line]
    return dict(core_ids=cores[-1] if cores else None, torch_threads=int(threads[-1]) if threads else None,
                lines=lines[:12])


# ------------------------------------------------------------------------------ the report

def markdown(machine: dict, vers: dict, args: argparse.Namespace, reports: list[ModelReport]) -> str:
    lines = [f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs ({machine['physical_cores']} cores), "
             f"{machine['ram_gib']} GiB RAM, torch threads {machine['torch_threads']}, load average "
             f"{machine['load_average_1_5_15']} at start; vLLM {vers['vllm']}, torch {vers['torch']}, "
             f"vllm-qwen3tts {vers['vllm_qwen3tts']} ({vers['commit']}{', modified' if vers['tree_modified'] else ''})",
             f"one stream at a time, {args.frames} frames ({args.frames / FRAMES_PER_SECOND:.1f} s of audio) per request, "
             f"{args.requests} requests after {args.warmup_requests} warm-up",
             "",
             "| model | params (talker + codec) | engine cores, threads | start to ready s | TTFA p50 / max ms "
             "| RTF mean / p50 | ms per frame | server RSS / PSS GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s, p, m = r.summary, r.params, r.memory
        params = f"{p['talker'] / 1e6:.0f}M + {p['speech_tokenizer'] / 1e6:.0f}M" if p else "?"
        mem = f"{m['rss_total_mib'] / 1024:.2f} / {m['pss_total_mib'] / 1024:.2f}" if m else "?"
        binding = f"{r.engine_threads.get('core_ids') or '?'}, {r.engine_threads.get('torch_threads') or '?'}"
        lines.append(f"| {r.label} | {params} | {binding} | {r.start_to_ready_s:.1f} "
                     f"| {s['ttfa_p50_ms']:.0f} / {s['ttfa_max_ms']:.0f} "
                     f"| {s['rtf_mean']:.3f} / {s['rtf_p50']:.3f} | {s['ms_per_frame_p50']:.1f} | {mem} |")
    return "\n".join(lines)


def find_command() -> str:
    """The `vllm-qwen3tts` command of this environment (beside its Python), else on PATH."""
    for candidate in (shutil.which("vllm-qwen3tts", path=str(Path(sys.executable).parent)),
                      shutil.which("vllm-qwen3tts")):
        if candidate:
            return candidate
    raise SystemExit("the vllm-qwen3tts command is not installed in this environment")


def parse_models(values: list[str]) -> list[tuple[str, str]]:
    """`LABEL=DIR_OR_HUB_ID` or a bare `DIR_OR_HUB_ID` (labelled by its last path part)."""
    out = []
    for v in values:
        label, sep, model = v.partition("=")
        if not sep:
            label, model = Path(v.rstrip("/")).name, v
        out.append((label, model))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="[LABEL=]DIR_OR_HUB_ID",
                    help="a checkpoint to measure (repeat); LABEL names it in the table")
    ap.add_argument("--make-checkpoints", metavar="DIR", default=None,
                    help="make (unless present) and measure the random-weight checkpoints of --variants under DIR")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="with --make-checkpoints: comma list")
    ap.add_argument("--scale", default="full", choices=["full", "tiny"], help="with --make-checkpoints")
    ap.add_argument("--requests", type=int, default=5, help="measured requests per checkpoint, one at a time")
    ap.add_argument("--warmup-requests", type=int, default=1,
                    help="requests sent first and left out of the summary (kept in the JSON)")
    ap.add_argument("--frames", type=int, default=50, help="frames per request (12.5 per audio second)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="the input: one sentence")
    ap.add_argument("--voice", default="ryan")
    ap.add_argument("--language", default=None)
    ap.add_argument("--seed", type=int, default=0, help="request i gets seed SEED + i")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more argument for `serve` (repeat), e.g. --server-arg=--max-num-seqs=8")
    ap.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for /ready")
    ap.add_argument("--request-timeout", type=float, default=1800.0)
    ap.add_argument("--stop-grace", type=float, default=60.0, help="seconds after SIGTERM before SIGKILL")
    ap.add_argument("--out", default=None, help="JSON report (a .md table is written beside it)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.frames < 2:
        ap.error("--requests must be >= 1 and --frames >= 2")

    command = find_command()
    models = parse_models(args.model)
    if args.make_checkpoints:
        directory = Path(args.make_checkpoints)
        directory.mkdir(parents=True, exist_ok=True)
        models += make_checkpoints(directory, [v for v in args.variants.split(",") if v], args.scale, command)
    if not models:
        ap.error("give --model and/or --make-checkpoints")
    out = Path(args.out) if args.out else None
    log_dir = out.parent if out else Path(tempfile.mkdtemp(prefix="cpu_stream_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = out.stem if out else "cpu_stream"

    machine, vers = machine_info(), versions()
    reports, failed = [], []
    for label, model in models:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        try:
            reports.append(measure(args, command, label, model, log_dir / f"{stem}.{safe}.server.log"))
        except Exception as e:  # noqa: BLE001 - report it and go on: the other checkpoints' numbers still count
            print(f"{label}: failed: {e}", file=sys.stderr, flush=True)
            failed.append(dict(label=label, model=model, error=str(e)))
        machine["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if out:  # after every checkpoint, so a later failure or interruption keeps the earlier ones
            report = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:], machine=machine,
                          versions=vers, frames=args.frames, text=args.text, voice=args.voice,
                          models=[asdict(r) for r in reports], failed=failed)
            out.write_text(json.dumps(report, indent=2))
    table = markdown(machine, vers, args, reports)
    print(table)
    if out:
        out.with_suffix(".md").write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
