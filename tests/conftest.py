"""Shared fixtures: tiny random checkpoints of every released variant, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from server_harness import starts_in_background  # noqa: E402
from vllm_qwen3tts.tools.checkpoint import VARIANTS, make_checkpoint  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "ends_speech_server: ends the shared `speech_server`, so runs after every "
                                       "other test")


def pytest_collection_modifyitems(config, items):
    """A test that ends the shared speech server runs last. `gpu` tests need a CUDA GPU: without
    one they are skipped, saying so (CI has none)."""
    items.sort(key=lambda item: item.get_closest_marker("ends_speech_server") is not None)  # stable: order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` there (scripts/gpu_tests.sh on a bare GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Parity is judged in float32 with no TF32 anywhere (the spec's reference setting).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    root = os.environ.get("QWEN3TTS_TEST_CHECKPOINTS")
    return Path(root) if root else tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_root):
    """`tiny_checkpoint(variant, seed=0)` -> directory; each is generated once per session."""
    made: dict[tuple[str, int], Path] = {}

    def get(variant: str, seed: int = 0) -> Path:
        key = (variant, seed)
        if key not in made:
            out = checkpoint_root / f"{variant}-tiny-s{seed}"
            if not (out / "speech_tokenizer" / "model.safetensors").is_file():
                make_checkpoint(variant, "tiny", out, seed=seed)
            made[key] = out
        return made[key]

    return get


HUB_IDS = {"0.6b-custom_voice": "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", "0.6b-base": "Qwen/Qwen3-TTS-12Hz-0.6B-Base"}


@pytest.fixture(scope="session")
def hub_model(tiny_checkpoint, tmp_path_factory):
    """`hub_model(variant)` -> (hub id, environment): the tiny checkpoint laid out in a Hugging Face
    cache of its own as a download of the released repository would leave it, and the variables
    (`HF_HOME`, `HF_HUB_OFFLINE=1`) under which that id names it."""
    from vllm_qwen3tts.tools.hub_cache import place_in_hub_cache

    home = tmp_path_factory.mktemp("hf-home")

    def get(variant: str) -> tuple[str, dict[str, str]]:
        repo = HUB_IDS[variant]
        place_in_hub_cache(tiny_checkpoint(variant), repo, home / "hub")
        return repo, {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}

    return get


@pytest.fixture(scope="session")
def official(tiny_checkpoint):
    """`official(variant)` -> the official `Qwen3TTSModel` loaded on the tiny checkpoint."""
    from oracle import load_official

    loaded = {}

    def get(variant: str, seed: int = 0):
        if (variant, seed) not in loaded:
            loaded[(variant, seed)] = load_official(tiny_checkpoint(variant, seed))
        return loaded[(variant, seed)]

    return get


ALL_VARIANTS = VARIANTS


@pytest.fixture(scope="session", autouse=True)
def background(request):
    """The servers the selected tests use, of those registered with `server_harness.starts_in_background`
    (the shared speech server, and some modules' own), started one after another as the session
    begins, in threads, while the first modules' tests run (`server_harness.Background`)."""
    from server_harness import Background

    started = Background(request)
    yield started
    started.close()


@starts_in_background("*", "speech_server")
def start_speech_server(tmp_path_factory):
    """The context of the shared speech server (`speech_server`)."""
    from server_harness import KEYS, running_server

    tmp = tmp_path_factory.mktemp("server-cv")
    env = {"QWEN3TTS_CACHE_DIR": str(tmp / "cache")}  # no --model: the default checkpoint is generated here
    return running_server(tmp, ["--max-queued-requests", "12", "--max-frames", "40", "--max-num-seqs", "4",
                                "--max-model-len", "512", "--codec-device", "cpu", "--codec-device", "cpu",
                                "--write-stall-timeout", "5"],
                          keys=KEYS, env=env, as_server=True)


@pytest.fixture(scope="session")
def speech_server(request, background):
    """The README's server (`vllm-qwen3tts serve`, embedded default CustomVoice checkpoint) with
    the three keys of `server_harness.KEYS`, 4 sequences at a time, a global bound of 12 requests
    in flight, two codec workers (as with two GPUs) and a
    5 s write stall bound (a client that stops reading is cut off sooner than by default). Started once and shared by the server
    tests and the reliability suite: a test that disturbs it (kills a worker) leaves it serving,
    except the one marked `ends_speech_server`, which runs after all others and ends it. It starts
    as the session begins (`background`)."""
    with background.server(request, "speech_server", module="*") as server:
        yield server


@pytest.fixture(scope="session")
def custom_voice_engine(tiny_checkpoint):
    """`Qwen3TTS` on the CPU with the tiny 1.7B CustomVoice checkpoint (compiled), one start for
    every module that tests the engine API on it (test_engine_cpu.py, test_engine_text_stream.py)."""
    from test_engine_cpu import engine_for

    with engine_for(tiny_checkpoint("1.7b-custom_voice")) as tts:
        yield tts
