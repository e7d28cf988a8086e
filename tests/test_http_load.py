"""The load generator's own arithmetic: the simulated player and the percentiles it reports.
(Its HTTP side runs against the real server in test_server_custom_voice.py.)"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("http_load", Path(__file__).parent.parent / "benchmarks" / "http_load.py")
http_load = importlib.util.module_from_spec(spec)
sys.modules["http_load"] = http_load  # dataclasses look their module up
spec.loader.exec_module(http_load)

SECOND = http_load.BYTES_PER_SECOND  # bytes of one second of 24 kHz 16-bit PCM


def test_player_fed_faster_than_real_time_never_runs_dry():
    arrivals = [(0.0, SECOND), (0.5, SECOND), (1.0, SECOND), (2.9, SECOND)]
    assert http_load.play(arrivals) == (0, 0.0)


def test_player_counts_each_gap_and_its_length():
    # 1 s of audio at t=0 runs out at t=1; the next second arrives at t=1.5 (0.5 s stall),
    # plays until 2.5; the last chunk arrives at 3.0 (another 0.5 s stall)
    underruns, stalled = http_load.play([(0.0, SECOND), (1.5, SECOND), (3.0, SECOND // 2)])
    assert underruns == 2
    assert stalled == pytest.approx(1.0)


def test_prebuffer_absorbs_a_late_chunk():
    arrivals = [(0.0, SECOND), (1.2, SECOND)]
    assert http_load.play(arrivals)[0] == 1
    assert http_load.play(arrivals, prebuffer_s=0.3) == (0, 0.0)


def test_percentiles_interpolate_between_ranks():
    xs = list(range(1, 101))  # 1..100
    assert http_load.percentile(xs, 50) == pytest.approx(50.5)
    assert http_load.percentile(xs, 99) == pytest.approx(99.01)
    assert http_load.percentile([7.0], 95) == 7.0
    assert http_load.percentile([], 95) is None


def test_both_dialects_force_the_length_and_stream_pcm():
    ours = http_load.request_body("ours", "Hi.", "vivian", "English", 250, 3, None, {})
    assert ours["response_format"] == "pcm" and ours["stream_format"] == "audio"
    assert ours["max_new_tokens"] == ours["min_new_tokens"] == 250
    omni = http_load.request_body("omni", "Hi.", "vivian", None, 250, 3, "m", {"task_type": "CustomVoice"})
    assert omni["stream"] is True and omni["stream_format"] == "audio" and omni["max_new_tokens"] == 250
    assert omni["task_type"] == "CustomVoice" and omni["model"] == "m"


def test_summary_counts_failures_and_throughput():
    R = http_load.RequestResult
    results = [R(sent_s=0, status=200, connect_s=0.005, request_sent_s=0.01, headers_s=0.02, ttfa_s=0.1, e2e_s=2.0,
                 audio_s=4.0, underruns=1, stall_s=0.2),
               R(sent_s=0, status=200, request_sent_s=0.002, headers_s=0.04, ttfa_s=0.3, e2e_s=4.0, audio_s=4.0),
               R(sent_s=0, status=503, headers_s=0.001, error="overloaded")]
    level = http_load.summarise("concurrency", 3, results, wall_s=4.0)
    assert (level.requests, level.ok, level.failed) == (3, 2, 1)
    assert level.audio_s_per_s == 2.0
    assert level.rtf_mean == pytest.approx(0.75)
    assert level.ttfa_p50_ms == pytest.approx(200.0)
    assert level.headers_p50_ms == pytest.approx(30.0)  # of the requests that succeeded
    assert level.sent_p50_ms == pytest.approx(6.0)
    assert level.new_connections == 1 and level.connect_p95_ms == pytest.approx(5.0)  # the other reused one
    assert level.underrun_requests == 1 and level.stall_s_total == pytest.approx(0.2)
    assert level.errors == ["503: overloaded"]


def test_summary_keeps_each_request_in_the_order_sent():
    R = http_load.RequestResult
    results = [R(sent_s=0.5, status=200, ttfa_s=0.03, e2e_s=1.0, audio_s=2.0, connect_s=0.002),
               R(sent_s=0.1, status=200, ttfa_s=0.02, e2e_s=1.0, audio_s=2.0)]
    level = http_load.summarise("rate", 1, results, wall_s=1.0)
    assert [r["sent_s"] for r in level.per_request] == [0.1, 0.5]
    assert [r["ttfa_ms"] for r in level.per_request] == [20.0, 30.0]
    assert [r["connect_ms"] for r in level.per_request] == [None, 2.0]  # the first reused a connection


def test_plot_of_two_reports_is_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the test extra installs it)")
    R = http_load.RequestResult
    reports = []
    for label, scale in (("a", 1.0), ("b", 2.0)):
        levels = [http_load.summarise(kind, v, [R(sent_s=0, status=200, ttfa_s=0.05 * v * scale, e2e_s=1, audio_s=2)], 1.0)
                  for kind, v in (("concurrency", 1), ("concurrency", 8), ("rate", 1), ("rate", 4))]
        reports.append(dict(label=label, levels=[vars(lv) for lv in levels]))
    paths = []
    for i, r in enumerate(reports):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "cmp.png"
    assert http_load.main(["--plot-only", *map(str, paths), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


server_metrics = sys.modules["server_metrics"]  # imported by http_load from benchmarks/

METRICS_BEFORE = """# HELP vllm:iteration_tokens_total Histogram of tokens per engine_step.
vllm:iteration_tokens_total_count{engine="0",model_name="m"} 100.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 1000.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 1.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 100.0
qwen3tts_codec_decode_seconds_total{worker="0"} 2.0
qwen3tts_codec_decode_seconds_total{worker="1"} 1.0
qwen3tts_codec_batches_total{worker="0"} 10.0
qwen3tts_codec_frames_total{worker="0"} 100.0
"""
METRICS_AFTER = """vllm:iteration_tokens_total_count{engine="0",model_name="m"} 300.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 26600.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 3.5
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 200.0
qwen3tts_codec_decode_seconds_total{worker="0"} 3.0
qwen3tts_codec_decode_seconds_total{worker="1"} 2.0
qwen3tts_codec_batches_total{worker="0"} 20.0
qwen3tts_codec_frames_total{worker="0"} 1100.0
"""


def test_engine_view_is_the_difference_of_two_scrapes_over_the_level():
    before, after = server_metrics.parse(METRICS_BEFORE), server_metrics.parse(METRICS_AFTER)
    assert before["qwen3tts_codec_decode_seconds_total"] == 3.0  # summed over workers
    view = server_metrics.engine_view(before, after, wall_s=4.0)
    assert view.steps_per_s == 50.0 and view.tokens_per_step == 128.0
    assert view.itl_ms == 25.0  # 2.5 s over 100 new intervals
    assert view.codec_busy == 0.5 and view.codec_frames_per_call == 100.0
    assert view.engine_ttft_ms is None  # a series the server did not export stays empty


def test_a_server_without_metrics_gets_no_engine_view():
    assert server_metrics.engine_view(None, server_metrics.parse(METRICS_AFTER), 4.0) is None


def test_steady_state_counts_only_what_happens_while_every_client_is_active():
    R = http_load.RequestResult
    # window [1, 3): the first request started during the ramp, the second inside the window,
    # the third after the first client had finished
    results = [R(sent_s=0.0, status=200, ttfa_s=0.2, e2e_s=2.0, audio_s=2.0, arrivals=[(0.2, SECOND), (1.5, SECOND)]),
               R(sent_s=1.0, status=200, ttfa_s=0.4, e2e_s=2.0, audio_s=2.0, arrivals=[(1.4, SECOND), (2.9, SECOND)]),
               R(sent_s=3.0, status=200, ttfa_s=0.1, e2e_s=1.0, audio_s=1.0, arrivals=[(3.1, SECOND)])]
    steady = http_load.steady_state(results, (1.0, 3.0))
    assert steady.requests == 1 and steady.ttfa_p50_ms == pytest.approx(400.0)
    assert steady.audio_s_per_s == pytest.approx(1.5)  # 3 of the 5 seconds of audio arrived inside, over 2 s
    assert http_load.steady_state(results, (2.0, 2.0)) is None  # no moment with every client active


def test_loop_lag_sampler_sees_a_blocked_event_loop():
    """The load generator's own lateness: a callback that holds the loop for 0.2 s makes one tick
    at least 0.2 s less one tick late, and each tick's lateness is counted once (the ticks' sleeps
    plus their lateness never exceed the time watched), however slow or busy the machine is."""
    tick_s, hold_s = 0.01, 0.2

    async def level():
        loop = asyncio.get_running_loop()
        started = loop.time()
        lags: list[float] = []
        sampler = asyncio.create_task(http_load.sample_loop_lag(lags, tick_s=tick_s))
        await asyncio.sleep(0.05)
        time.sleep(hold_s)  # a synchronous hog, as a saturated client would be
        await asyncio.sleep(0.05)
        sampler.cancel()
        return lags, loop.time() - started

    lags, watched_s = asyncio.run(level())
    assert max(lags) >= hold_s - tick_s
    # a timer fires no earlier than due (to the clock's resolution): exact on any machine
    assert sum(lags) + len(lags) * tick_s <= watched_s + len(lags) * 1e-6
