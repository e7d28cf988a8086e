"""The deployment a vLLM user types first: `vllm serve Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice`,
exactly, with the package installed and nothing else (no VLLM_PLUGINS, no flags). The checkpoint
is the embedded tiny CustomVoice one laid out as the Hugging Face cache holds a download of it
(bf16 weights in three shards with their index, and a speaker added as Qwen's fine-tuning recipe
adds one), read offline: the code path a real download ends in."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import soundfile as sf

from server_harness import running_server, starts_in_background
from vllm_qwen3tts.base.config import CheckpointError
from vllm_qwen3tts.base.model_source import resolve_checkpoint
from vllm_qwen3tts.tools.checkpoint import make_checkpoint
from vllm_qwen3tts.tools.hub_cache import place_in_hub_cache

pytestmark = pytest.mark.engine

REPO = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
FRAMES = 6
SAMPLES_PER_FRAME = 1920


_HF_HOME: list[Path] = []  # made once a session


def make_hf_home(tmp_path_factory) -> Path:
    if not _HF_HOME:
        home = tmp_path_factory.mktemp("hf-home")
        made = make_checkpoint("0.6b-custom_voice", "tiny", home / "made", seed=0, shards=3, extra_speaker="Narrator")
        place_in_hub_cache(made, REPO, home / "hub")
        _HF_HOME.append(home)
    return _HF_HOME[0]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    return make_hf_home(tmp_path_factory)


@starts_in_background(__name__, "served")
def start_served(tmp_path_factory):
    hf_home = make_hf_home(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("server-hub")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "QWEN3TTS_VOICES_DIR": str(tmp / "voices")}
    return running_server(tmp, [REPO], env=env, vllm_serve=True, timeout_s=480)


@pytest.fixture(scope="module")
def served(request, background):
    """(base URL, log) of `vllm serve REPO`, started as the session began (conftest's `background`)."""
    with background.server(request, "served") as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


def speak(client, voice: str) -> tuple:
    audio = client.audio.speech.create(model=REPO, voice=voice, input="Hello from the hub.", response_format="wav",
                                       extra_body={"max_new_tokens": FRAMES, "temperature": 0})
    return sf.read(io.BytesIO(audio.content))


def test_the_stock_openai_client_gets_audio_from_plain_vllm_serve_of_a_hub_id(client):
    wav, rate = speak(client, "vivian")
    assert rate == 24000 and len(wav) == FRAMES * SAMPLES_PER_FRAME
    assert [m.id for m in client.models.list()] == [REPO]


def test_a_speaker_added_by_fine_tuning_is_served_under_its_name(served, client):
    listed = httpx.get(f"{served[0]}/v1/audio/voices", timeout=30).json()["voices"]
    assert "narrator" in listed and "vivian" in listed
    wav, _ = speak(client, "narrator")
    assert len(wav) == FRAMES * SAMPLES_PER_FRAME


def test_the_talker_sets_what_it_needs_of_vllm_and_serves_no_text_routes(served):
    log = served[1].read_text()
    assert "priority scheduling" in log and "without a text tokenizer" in log
    # VLLM_PLUGINS was unset: vLLM says it would not load the speech routes, and they are served
    assert "but VLLM_PLUGINS is not set" in log and "speech service ready" in log
    r = httpx.post(f"{served[0]}/v1/completions", json={"model": REPO, "prompt": [1], "max_tokens": 1}, timeout=30)
    assert r.status_code == 404


def test_a_hub_id_not_in_the_cache_offline_is_a_clear_error_naming_it_and_the_cache(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_qwen3tts.cli", "synthesize", "--model", "Qwen/Qwen3-TTS-12Hz-1.7B-Base",
         "--text", "x", "--out", str(hf_home / "x.wav")],
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Qwen/Qwen3-TTS-12Hz-1.7B-Base" in proc.stderr and str(hf_home / "hub") in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr


def test_every_part_reads_the_snapshot_the_hub_id_names(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = resolve_checkpoint(REPO, cache_dir=hf_home / "hub")
    assert snapshot.parent.name == "snapshots" and (snapshot / "model.safetensors.index.json").is_file()
    assert resolve_checkpoint(snapshot) == snapshot  # a directory is itself
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(hf_home / "no-such-dir")


def test_an_unknown_speech_setting_in_additional_config_stops_the_server_before_its_engine(tiny_checkpoint, tmp_path):
    """`--additional-config '{"qwen3tts": {...}}'` is checked when vLLM builds its configuration:
    a misspelt setting is refused by name at once, not after minutes of engine start."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("vllm")), "serve", str(tiny_checkpoint("0.6b-custom_voice")),
         "--additional-config", '{"qwen3tts": {"max_concurency_per_key": 4}}'],
        env={**env, "VLLM_CPU_KVCACHE_SPACE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "qwen3tts.max_concurency_per_key: no such speech setting" in proc.stdout + proc.stderr
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr
