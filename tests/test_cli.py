"""The `vllm-qwen3tts synthesize` command: real engine, files decoded back."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf


def cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_qwen3tts.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.engine
def test_synthesize_a_batch_from_a_file(hub_model, tmp_path):
    """The model named by its hub id, read offline from the Hugging Face cache."""
    repo, hub_env = hub_model("0.6b-custom_voice")
    lines = tmp_path / "lines.txt"
    lines.write_text("First line of the batch.\n\nSecond line, a little longer than the first.\n", encoding="utf-8")
    out = tmp_path / "out" / "line.wav"
    proc = cli("synthesize", "--model", repo, "--text-file", str(lines),
               "--voice", "vivian", "--language", "English", "--temperature", "0", "--max-new-tokens", "10",
               "--device", "cpu", "--out", str(out), "--codes-out", str(tmp_path / "codes.npy"),
               "--enforce-eager", env=hub_env)  # the CLI's batch handling; the compiled engine is test_engine_cpu's
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(2):  # the empty line is skipped
        audio, rate = sf.read(tmp_path / "out" / f"line_{i:04d}.wav")
        assert rate == 24000 and audio.shape == (10 * 1920,)
        assert np.abs(audio).max() > 1e-3
        codes = np.load(tmp_path / f"codes_{i:04d}.npy")
        assert codes.shape == (10, 16) and codes.dtype == np.int64
    assert not (tmp_path / "out" / "line_0002.wav").exists()


@pytest.mark.parametrize("flags,message", [
    (["--device", "cuda"], "this vLLM build runs on 'cpu'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "bfloat16"], "bfloat16 is not supported on the CPU"),
])
def test_unavailable_device_or_dtype_is_a_clear_error(tiny_checkpoint, tmp_path, flags, message):
    proc = cli("synthesize", "--model", str(tiny_checkpoint("0.6b-custom_voice")), "--text", "hi", "--voice", "ryan",
               "--out", str(tmp_path / "x.wav"), *flags, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_version_prints_the_package_version_and_vllms():
    from importlib.metadata import version

    import vllm

    proc = cli("--version", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"vllm-qwen3tts {version('vllm-qwen3tts')} (vLLM {vllm.__version__})\n"


def test_bad_request_is_a_clear_error_before_any_engine_starts(tmp_path):
    proc = cli("synthesize", "--model", str(tmp_path / "missing"), "--text", "hi", "--out", str(tmp_path / "x.wav"),
               timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_serve_passes_codec_devices_to_the_server_and_refuses_unknown_ones(tiny_checkpoint):
    from vllm_qwen3tts.cli import build_parser, serve_command
    from vllm_qwen3tts.engine import DeviceError

    def command(*flags):
        args, rest = build_parser().parse_known_args(["serve", "--model", str(tiny_checkpoint("0.6b-custom_voice")),
                                                      "--device", "cpu", *flags])
        return serve_command(args, rest)

    plan = command("--codec-device", "cpu", "--codec-device", "cpu", "--data-parallel-size", "2")
    assert plan.env["QWEN3TTS_CODEC_DEVICES"] == "cpu,cpu"
    assert plan.argv[-2:] == ["--data-parallel-size", "2"]  # vLLM's own flags pass through
    assert plan.codec_devices == ["cpu", "cpu"]  # started before vLLM
    with pytest.raises(DeviceError, match="unknown codec device 'gpu1'"):
        command("--codec-device", "gpu1")


def test_serve_starts_codec_workers_before_vllm_wherever_it_knows_their_device():
    from vllm_qwen3tts.cli import codec_launch_devices

    assert codec_launch_devices("cpu", [], []) == ["cpu"]
    assert codec_launch_devices("cuda", [], ["--max-num-seqs", "64"]) == ["cuda"]
    assert codec_launch_devices("cuda", ["cuda:1", "cuda:2"], []) == ["cuda:1", "cuda:2"]
    # data parallel ranks' GPUs are vLLM's choice: the running server starts those workers
    assert codec_launch_devices("cuda", [], ["--data-parallel-size", "2"]) == []
    assert codec_launch_devices("cuda", [], ["-dp=2"]) == []
    assert codec_launch_devices("cuda", ["cuda:0", "cuda:1"], ["-dp", "2"]) == ["cuda:0", "cuda:1"]


def test_engine_memory_share_leaves_room_for_the_codec_worker_on_its_gpu():
    from vllm_qwen3tts.cli import CODEC_WORKER_GPU_BYTES, engine_memory_share

    gib = 2**30
    h100 = 80 * gib
    share = engine_memory_share(h100, shares_gpu_with_codec=True)
    assert 0.7 < share < 0.9 and (1 - share) * h100 >= CODEC_WORKER_GPU_BYTES
    assert engine_memory_share(h100, shares_gpu_with_codec=False) == 0.9  # codec elsewhere: vLLM's default
    assert engine_memory_share(16 * gib, shares_gpu_with_codec=True) == 0.3  # small GPU: a floor, not a crash


def test_serve_mps_is_for_gpus_only(tiny_checkpoint):
    from vllm_qwen3tts.cli import build_parser, serve_command
    from vllm_qwen3tts.engine import DeviceError

    args, rest = build_parser().parse_known_args(["serve", "--model", str(tiny_checkpoint("0.6b-custom_voice")),
                                                  "--device", "cpu", "--mps", "--light-load-streams", "8"])
    with pytest.raises(DeviceError, match="--mps"):
        serve_command(args, rest)
    args.mps = False
    assert serve_command(args, rest).env["QWEN3TTS_LIGHT_LOAD_STREAMS"] == "8"


def test_a_private_mps_daemon_quits_when_the_server_process_is_gone(tmp_path):
    """NVIDIA's control binary stands in as a script that records how it was called."""
    import os
    import subprocess
    import time

    from vllm_qwen3tts.mps import MPSError, start_private_mps

    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(f'#!/bin/sh\necho "$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {calls}\n')
    control.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    server = subprocess.Popen(["sleep", "60"])
    mps_env = start_private_mps(env, owner_pid=server.pid)
    pipe = mps_env["CUDA_MPS_PIPE_DIRECTORY"]
    assert os.path.isdir(pipe) and os.path.isdir(mps_env["CUDA_MPS_LOG_DIRECTORY"])
    assert calls.read_text().splitlines() == [f"-d pipe={pipe} stdin="]  # the daemon, on its own pipe
    time.sleep(1.5)
    assert len(calls.read_text().splitlines()) == 1  # nothing more while the server runs
    server.kill()
    server.wait()
    for _ in range(100):
        if not os.path.exists(os.path.dirname(pipe)):
            break
        time.sleep(0.1)
    assert calls.read_text().splitlines()[1:] == [f" pipe={pipe} stdin=quit"]
    assert not os.path.exists(os.path.dirname(pipe))  # its directories removed

    with pytest.raises(MPSError, match="nvidia-cuda-mps-control"):
        start_private_mps({**os.environ, "PATH": str(tmp_path / "nowhere")}, owner_pid=os.getpid())


def test_serve_api_keys_reach_the_server_in_its_environment_not_its_command_line(tiny_checkpoint):
    """`--api-key` is the server's key option (vLLM's `--api-key` under plain `vllm serve` is a
    speech key too): the keys travel in the environment, out of sight of `ps`."""
    from vllm_qwen3tts.cli import build_parser, serve_command

    args, rest = build_parser().parse_known_args(["serve", "--model", str(tiny_checkpoint("0.6b-custom_voice")),
                                                  "--device", "cpu", "--api-key", "k-one", "--api-key", "k-two"])
    plan = serve_command(args, rest)
    assert plan.env["QWEN3TTS_API_KEYS"] == "k-one,k-two"
    assert not any("k-one" in a or "k-two" in a for a in plan.argv)
