"""The soak benchmark (`benchmarks/soak.py`): its audio check finds a missing frame in every
format, and a small run against the shared speech server (mixed formats and kinds: whole file,
raw stream, SSE, WebSocket; a fifth of them abandoned on purpose) ends with every completed
response decoded and checked, no error, and the server idle."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_qwen3tts.server.audio_output import StreamingEncoder, encode_audio

SOAK = Path(__file__).parent.parent / "benchmarks" / "soak.py"
spec = importlib.util.spec_from_file_location("soak", SOAK)
soak = importlib.util.module_from_spec(spec)
sys.modules["soak"] = soak  # dataclasses look their module up
spec.loader.exec_module(soak)

SHORT_TEXTS = ["Hello there.", "Thanks, that works for me.", "Could you repeat that, please?",
               "The train leaves at seven.", "你好。", "好的，没问题。"]


@pytest.mark.parametrize("fmt", soak.FORMATS)
def test_the_audio_check_passes_the_forced_length_and_finds_one_frame_missing(fmt):
    frames = 10
    pcm = (0.1 * np.random.default_rng(0).standard_normal(frames * soak.FRAME_SAMPLES)).astype(np.float32)
    encoder = StreamingEncoder(fmt)
    streamed = b"".join([encoder.write(pcm[i:i + 3840]) for i in range(0, pcm.size, 3840)] + [encoder.finish()])
    for data in (encode_audio(pcm, fmt), streamed):
        assert soak.check_audio(data, fmt, frames, forced=True)[0] is None
        assert soak.check_audio(data, fmt, frames + 1, forced=False)[0] is None  # a cap, not a length
        assert soak.check_audio(data, fmt, frames + 1, forced=True)[0] == "lost"
    assert soak.check_audio(b"", fmt, frames, forced=False)[0] == "lost"
    if fmt != "pcm":
        assert soak.check_audio(b"\x01not audio" * 50, fmt, frames, forced=False)[0] == "undecodable"


@pytest.mark.engine
def test_a_short_mixed_soak_has_no_errors_no_lost_audio_and_leaves_the_server_idle(speech_server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SHORT_TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--base-url", speech_server.base, "--api-key", "alice-key",
         "--server-pid", str(speech_server.pid), "--requests", "60", "--concurrency", "6", "--frames", "6",
         "--disconnect-fraction", "0.2", "--prompts", str(prompts), "--memory-interval", "1", "--seed", "1",
         "--timeout", "240", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert out.is_file(), run.stdout + run.stderr
    report = json.loads(out.read_text())
    summary = run.stdout[-3000:]

    assert report["requests_done"] == 60
    assert {k for k, counts in report["by_kind"].items() if counts["ok"]} == {"file", "stream", "sse", "ws"}, summary
    assert report["totals"]["disconnected"] > 0, summary  # the plan's disconnects happened
    for outcome in ("error", "lost", "undecodable", "bad_audio"):
        assert report["totals"][outcome] == 0, summary
    assert report["idle"]["ok"], summary
    roles = {"api_server", "engine_core", "codec_worker"}
    sampled = [p for p in report["memory"]["processes"].values() if p["role"] in roles]
    assert {p["role"] for p in sampled} == roles, summary
    assert all(p["after_warmup_mb"] > 0 and p["end_mb"] > 0 for p in sampled), summary
    assert len(report["memory"]["series"]) >= 3
    assert report["passed"] and run.returncode == 0, summary
