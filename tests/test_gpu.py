"""The production path on a CUDA GPU: what CI's CPU build cannot run.

`pytest -m gpu` on a GPU machine (`scripts/gpu_tests.sh` sets up a bare one with the vLLM 0.26
kit and runs them); elsewhere these tests are skipped, saying so. Greedy float32 codes are
compared with the official implementation's (made on the CPU by
`benchmarks/make_reference_codes.py`, as the GPU machine has no official package), through the
server as users run it (Model Runner V2, CUDA graphs) and through the engine API; the CUDA-graph
and compiled paths are compared with the eager code they replace. The Triton kernels' own GPU
checks are in test_predictor_kernels.py and test_talker_projections.py (also `gpu`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

REFERENCE = Path(__file__).parent.parent / "benchmarks" / "data" / "reference_codes_tiny_1.7b-cv.json"
SAMPLES_PER_FRAME = 1920
FP32_WAVE_TOL = 1e-4  # the codec waveform tolerance of the CPU parity tests
# Served audio against the CPU decode of the official codes, relative to the waveform's peak: the
# GPU codec's convolutions (TF32, compiled) moved it by ~2% of the peak on an H100; one wrong frame
# changes ~0.2 s of it by about the peak itself.
SERVED_WAVE_REL_TOL = 0.05


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def reference_checkpoint(reference, tiny_checkpoint) -> Path:
    """The checkpoint the reference codes were made on, generated here from the same seed."""
    made = reference["checkpoint"]
    assert made["scale"] == "tiny"
    path = tiny_checkpoint(made["variant"], made["seed"])
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == reference["model_sha256"], (
        "this checkpoint differs from the one the reference codes were made on; "
        "regenerate them with benchmarks/make_reference_codes.py")
    return path


def reference_request(item: dict, max_frames: int):
    from vllm_qwen3tts.engine import SynthesisParams, SynthesisRequest

    r = item["request"]
    return SynthesisRequest(text=r["text"], speaker=r["speaker"], language=r["language"], instructions=r["instruct"],
                            non_streaming_mode=True, params=SynthesisParams(temperature=0.0, max_frames=max_frames))


def whole_decode(model_dir: Path, codes: np.ndarray) -> np.ndarray:
    """The eager float32 codec decode of a whole utterance, on the CPU."""
    from vllm_qwen3tts.codec.decoder import CodecDecoder

    decoder = CodecDecoder.from_checkpoint(model_dir)
    with torch.inference_mode():
        return decoder(torch.from_numpy(codes)[None])[0].numpy()


# ------------------------------------------------------------------------------------ the talker


@pytest.fixture(scope="module")
def gpu_engine(reference_checkpoint):
    """The engine API on the GPU in float32: Model Runner V2, CUDA graphs, async scheduling."""
    from vllm_qwen3tts.engine import Qwen3TTS

    with Qwen3TTS(reference_checkpoint, device="cuda", dtype="float32", max_model_len=1024, max_num_seqs=16,
                  gpu_memory_utilization=0.2) as tts:
        yield tts


def test_greedy_fp32_codes_through_the_engine_equal_the_official_ones(gpu_engine, reference):
    """A batch of every reference request twice over, in one engine with Model Runner V2 and CUDA
    graphs for the decoder and for frame completion: every frame identical."""
    requests = [reference_request(item, reference["max_frames"]) for item in reference["references"]] * 2
    vllm_config = gpu_engine._running.llm.vllm_config
    assert getattr(vllm_config, "use_v2_model_runner", False), "the GPU path is Model Runner V2"
    assert vllm_config.compilation_config.cudagraph_mode.name != "NONE", "CUDA graphs are on by default"
    results = gpu_engine.generate(requests)
    expected = [item["codes"] for item in reference["references"]] * 2
    for i, (result, codes) in enumerate(zip(results, expected)):
        assert result.codes.tolist() == codes, f"request {i}: codes differ from the official ones"


def test_text_in_pieces_on_model_runner_v2_gives_the_codes_of_the_whole_text(gpu_engine, reference, monkeypatch):
    """`stream_text` on the production path (Model Runner V2, CUDA graphs, and the async scheduling
    vLLM 0.26 runs on GPUs, whose paused sessions the adapter rolls back), with the GPU gate
    (`TTSEngine.supports_text_streaming`) lifted for the test: the text cut at random with pauses,
    beside an ordinary request; a request whose first frame already holds; and one whose length is
    forced (every turn holds as text comes, min frames = max frames). Each gives the codes of the
    whole text spoken at once in streaming text mode; the request beside is unaffected."""
    import random
    import threading
    import time

    from vllm_qwen3tts.synthesis import TTSEngine

    monkeypatch.setattr(TTSEngine, "supports_text_streaming", staticmethod(lambda: True))
    vllm_config = gpu_engine._running.llm.vllm_config
    assert getattr(vllm_config, "use_v2_model_runner", False)
    assert vllm_config.scheduler_config.async_scheduling, "the rollback under test is async scheduling's"
    items = reference["references"]

    def random_cuts(text, rng):
        i = 0
        while i < len(text):
            step = rng.randint(1, 4)
            yield text[i:i + step]
            i += step
            time.sleep(rng.choice([0.0, 0.0, 0.02, 0.15]))  # some pauses longer than many frames

    def first_frame_holds(text, rng):
        first, rest = text.split(" ", 1)
        yield first
        yield " "  # the first word is final: the request starts with one text token, none after it
        time.sleep(0.3)
        yield rest

    for n, item in enumerate(items[:2]):
        ordinary = dataclasses.replace(reference_request(item, 48), non_streaming_mode=False)
        forced = dataclasses.replace(ordinary, params=dataclasses.replace(ordinary.params, min_frames=48))
        for name, req, writer in [("random cuts", ordinary, random_cuts), ("first frame holds", ordinary, first_frame_holds),
                                  ("forced length", forced, random_cuts)]:
            whole = gpu_engine.generate([req])[0]
            other = reference_request(items[-1], 48)
            beside: list = []
            running = threading.Thread(target=lambda: beside.append(gpu_engine.generate([other])[0]))
            running.start()
            codes = np.concatenate([c.codes for c in gpu_engine.stream_text(req, writer(req.text, random.Random(n)))])
            running.join(300)
            np.testing.assert_array_equal(codes, whole.codes, err_msg=f"request {n}, {name}")
            assert beside[0].codes.tolist() == gpu_engine.generate([other])[0].codes.tolist()


@pytest.fixture(scope="module")
def gpu_server(reference_checkpoint, tmp_path_factory):
    """`vllm-qwen3tts serve` on the GPU in float32 (so its greedy codes can equal the reference's)."""
    from server_harness import running_server

    tmp = tmp_path_factory.mktemp("gpu-server")
    with running_server(tmp, ["--model", str(reference_checkpoint), "--dtype", "float32", "--max-model-len", "1024",
                              "--max-num-seqs", "8", "--gpu-memory-utilization", "0.2"],
                        device="cuda", timeout_s=600, as_server=True) as server:
        yield server


def speech_body(item: dict, max_frames: int) -> dict:
    r = item["request"]
    extra = {"language": r["language"], "non_streaming_mode": True, "temperature": 0.0, "max_new_tokens": max_frames}
    return {"input": r["text"], "voice": r["speaker"], "instructions": r["instruct"], "extra_body": extra}


def test_greedy_fp32_speech_over_http_is_the_official_codes_decoded(gpu_server, reference, reference_checkpoint):
    """Every reference request through the OpenAI client: the audio is the official codes decoded,
    so the served codes were the official ones (a different frame would change it far beyond
    the tolerance); streamed, the same audio again."""
    import openai

    client = openai.OpenAI(base_url=f"{gpu_server.base}/v1", api_key="unused", max_retries=0, timeout=300)
    for i, item in enumerate(reference["references"]):
        body = speech_body(item, reference["max_frames"])
        pcm = client.audio.speech.create(model="tts-1", response_format="pcm", **body).content
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
        expected = whole_decode(reference_checkpoint, np.asarray(item["codes"]))
        assert audio.shape == expected.shape, f"request {i}: {audio.size} samples, expected {expected.size}"
        tolerance = SERVED_WAVE_REL_TOL * np.abs(expected).max()
        assert np.abs(audio - expected).max() <= tolerance, f"request {i}: not the official codes' audio"
        if i == 0:
            with client.audio.speech.with_streaming_response.create(
                    model="tts-1", response_format="pcm", stream_format="audio", **body) as response:
                streamed = b"".join(response.iter_bytes())
            streamed_audio = np.frombuffer(streamed, dtype="<i2").astype(np.float32) / 32768
            assert streamed_audio.shape == expected.shape
            assert np.abs(streamed_audio - expected).max() <= tolerance


def test_a_served_request_end_to_end(gpu_server):
    """The README's first call, on the GPU: a WAV file that decodes to 24 kHz speech; the server
    says it is ready and idle afterwards."""
    import io

    import httpx
    import openai
    import soundfile as sf

    client = openai.OpenAI(base_url=f"{gpu_server.base}/v1", api_key="unused", max_retries=0, timeout=300)
    wav = client.audio.speech.create(model="tts-1", voice="ryan", input="Hello from the GPU.",
                                     response_format="wav", extra_body={"max_new_tokens": 30}).content
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == 24000 and 0 < audio.size <= 30 * SAMPLES_PER_FRAME and audio.size % SAMPLES_PER_FRAME == 0
    assert np.abs(audio).max() > 0
    assert httpx.get(f"{gpu_server.base}/ready", timeout=10).status_code == 200


# --------------------------------------------------------------------- frame completion (graphs)


def test_frame_completion_in_cuda_graphs_gives_the_eager_codes(reference_checkpoint):
    """The code predictor's 15 sub-steps, compiled and captured per batch bucket, against the same
    steps run eagerly: identical codes for greedy and seeded rows, at batches that fill a
    bucket and that pad one (3 rows in a bucket of 4), over several steps."""
    from vllm_qwen3tts.model.prompt import SpeechRequest, build_prompt
    from vllm_qwen3tts.talker.frame_graphs import FrameCompleter
    from vllm_qwen3tts.talker.protocol import SubtalkerParams, TalkerRequest
    from vllm_qwen3tts.talker.state import TalkerState
    from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer
    from vllm_qwen3tts.tools.talker_parts import load_talker_components

    parts = load_talker_components(reference_checkpoint, device="cuda", dtype=torch.float32)
    tokenizer = load_text_tokenizer(reference_checkpoint)
    cfg = parts.config.talker
    hidden_size = cfg.decoder.hidden_size
    subtalkers = [SubtalkerParams(temperature=0.0), SubtalkerParams(temperature=0.9, top_k=50, top_p=0.9),
                  SubtalkerParams(temperature=0.7, top_k=0, top_p=1.0), SubtalkerParams(temperature=0.0)]
    requests = [TalkerRequest(build_prompt(parts.config, tokenizer, SpeechRequest(
        text=f"Request number {i} of the frame graph test.", speaker="ryan", non_streaming_mode=True)), sub, seed=11 + i)
        for i, sub in enumerate(subtalkers)]

    def run(use_graphs: bool) -> list[torch.Tensor]:
        state = TalkerState(cfg, max_slots=8, max_positions=512, max_frames=64, max_ref_frames=16, device="cuda",
                            dtype=torch.float32)
        for slot, req in enumerate(requests):
            state.add_request(slot, f"r{slot}", req.to_extra_args(), len(req.recipe), len(req.recipe))
        completer = FrameCompleter(state, parts.embeddings, parts.code_predictor, hidden_size, max_batch=8,
                                   dtype=torch.float32, use_graphs=use_graphs)
        assert completer.use_graphs == use_graphs
        out = []
        gen = torch.Generator(device="cuda").manual_seed(0)
        for step in range(6):
            rows = [0, 1, 2, 3] if step % 2 == 0 else [1, 2, 3]  # a full bucket, then one padded
            slots = torch.tensor(rows, device="cuda")
            last = torch.tensor([len(requests[r].recipe) - 1 + step for r in rows], device="cuda")
            code0 = torch.randint(0, cfg.num_audio_codes, (len(rows),), generator=gen, device="cuda")
            hidden = torch.randn(len(rows), hidden_size, generator=gen, device="cuda")
            with torch.inference_mode():
                out.append(completer(slots, last, code0, hidden, torch.ones(len(rows), dtype=torch.bool,
                                                                            device="cuda")).clone().cpu())
        if use_graphs:
            assert completer.graphs, "the graphs were captured and replayed"
            assert completer.compiled, "the predictor was compiled before capture (see the log for why not)"
        return out

    eager, graphed = run(False), run(True)
    for step, (a, b) in enumerate(zip(eager, graphed)):
        assert torch.equal(a, b), f"step {step}: codes differ between eager and CUDA-graph frame completion"


# ------------------------------------------------------------------------------ codec (graphs)


def test_codec_graphs_give_each_stream_the_eager_audio(reference_checkpoint):
    """The codec worker's GPU decoder (compiled, channels-last, CUDA graphs over its grid) against
    an eager one on the same GPU and against the CPU decode of each whole utterance: streams in
    batches padded to the grid, ragged chunks, and a chunk longer than any graph."""
    from vllm_qwen3tts.codec.worker import CodecWorker, CodecWorkerConfig

    base = CodecWorkerConfig(model_dir=str(reference_checkpoint), device="cuda", dtype="float32", max_streams=6,
                             max_batch=8, graph_chunk_lengths=(2, 4, 8, 16, 25))
    graphed = CodecWorker(base)
    eager = CodecWorker(dataclasses.replace(base, compile=False, channels_last=False, cuda_graphs=False))
    assert graphed.decoder_pool.captured_shapes, "the production worker captured its graphs"
    assert not eager.decoder_pool.captured_shapes
    rows = [4, 0, 2]
    schedules = {4: [2, 4, 8, 25, 3], 0: [2, 4, 8, 16, 30], 2: [1, 3, 8, 25, 7]}
    rng = np.random.default_rng(0)
    codes = {row: rng.integers(0, 2048, size=(sum(schedules[row]), 16), dtype=np.int64) for row in rows}
    audio = {"graphed": {row: [] for row in rows}, "eager": {row: [] for row in rows}}
    for name, worker in (("graphed", graphed), ("eager", eager)):
        pool = worker.decoder_pool
        pool.reset(rows)
        for step in range(5):
            chunks = [codes[row][sum(schedules[row][:step]): sum(schedules[row][: step + 1])] for row in rows]
            length = max(pool.run_length(c.shape[0]) for c in chunks)
            with torch.inference_mode():
                for row, samples in zip(rows, pool.decode(rows, chunks, length)):
                    audio[name][row].append(samples)
    for row in rows:
        g, e = np.concatenate(audio["graphed"][row]), np.concatenate(audio["eager"][row])
        assert g.shape == e.shape == (codes[row].shape[0] * SAMPLES_PER_FRAME,)
        assert np.abs(g - e).max() <= FP32_WAVE_TOL, f"stream {row}: graphs differ from eager"
        assert np.abs(e - whole_decode(reference_checkpoint, codes[row])).max() <= FP32_WAVE_TOL
