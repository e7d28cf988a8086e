"""A CUDA MPS control daemon private to one `vllm-qwen3tts serve` (its `--mps` flag).

The talker's engine and the codec worker are two processes on one GPU. Without MPS the GPU
gives their contexts turns (time slices), so under load a codec call waits behind the engine's
CUDA graphs and the engine's steps behind the codec's. Under MPS both processes' kernels share the
SMs at once.

The daemon gets pipe and log directories of its own (nothing else on the machine talks to it)
and a watcher process that tells it to quit, and removes the directories, once the server's
process is gone. No GPU setting changes (compute mode stays as it is).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


class MPSError(RuntimeError):
    """The MPS control daemon could not be started."""


def start_private_mps(env: dict[str, str], owner_pid: int) -> dict[str, str]:
    """Start a control daemon for the processes that get the returned environment (`env` plus
    its pipe and log directories); it quits when `owner_pid` exits."""
    control = shutil.which(CONTROL, path=env.get("PATH"))
    if control is None:
        raise MPSError(f"--mps needs {CONTROL} (NVIDIA's driver utilities) on PATH")
    root = Path(tempfile.mkdtemp(prefix="vllm-qwen3tts-mps-"))
    mps_env = {**env, "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for name in ("pipe", "log"):
        (root / name).mkdir()
    started = subprocess.run([control, "-d"], env=mps_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=30)
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise MPSError(f"{CONTROL} -d failed ({started.returncode}): {(started.stderr or started.stdout).strip()}")
    subprocess.Popen([sys.executable, "-m", "vllm_qwen3tts.mps", str(owner_pid), str(root)], env=mps_env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # outlives a kill of the server's process group
    return mps_env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(owner_pid: int, root: Path, poll_s: float = 1.0) -> None:
    """Wait for `owner_pid` to exit, then quit the daemon whose directories are under `root`."""
    while _alive(owner_pid):
        time.sleep(poll_s)
    control = shutil.which(CONTROL)
    if control is not None:
        subprocess.run([control], input="quit\n", text=True, env=os.environ, timeout=60, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
