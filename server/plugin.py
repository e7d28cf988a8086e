"""`vllm.endpoint_plugins` entry point: `/v1/audio/speech` and friends on `vllm serve`.

vLLM loads endpoint plugins only when named in VLLM_PLUGINS, which is a single
allowlist across all plugin groups, so a deployment lists both:

    VLLM_PLUGINS=qwen3_tts,qwen3_tts_speech vllm serve CHECKPOINT_DIR

`vllm-qwen3tts serve` does that (and more) for you. Server options come from
QWEN3TTS_* environment variables (see `service.ServerSettings`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from argparse import Namespace
from pathlib import Path

from fastapi import FastAPI

logger = logging.getLogger("vllm.qwen3tts.server")  # under vLLM's logger: its handler and level apply

PLUGIN_NAME = "qwen3_tts_speech"


class ArrivalTime:
    """Stamps each request with the moment the app first sees it (`request.state.arrival`,
    `time.perf_counter()`), before its body is read and validated: the speech routes count
    latency from there. With 128 requests arriving at once the client saw first audio ~450 ms
    later than the route's own clock said (benchmarks/NOTES.md §14)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("state", {})["arrival"] = time.perf_counter()
        await self.app(scope, receive, send)


class SpeechEndpointPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from .routes import router

        app.add_middleware(ArrivalTime)
        app.include_router(router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:  # vLLM's CPU-only render server: no engine, no speech
            return
        from vllm.platforms import current_platform

        from ..codec.pool import CodecPool
        from ..codec.worker import launched_workers_from_env
        from ..engine import ChunkSchedule, TTSEngine
        from .metrics import speech_metrics, watch_event_loop
        from .service import ServerSettings, SpeechService

        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise ValueError(f"vllm-qwen3tts serves local checkpoint directories; {args.model!r} is not one")
        settings = ServerSettings.from_env()
        vllm_config = engine_client.vllm_config
        on_gpu = current_platform.device_type == "cuda"
        max_streams = max(64, 2 * vllm_config.scheduler_config.max_num_seqs)
        chunk_lengths = ChunkSchedule().distinct_sizes()
        launched = launched_workers_from_env()
        if launched:
            # `vllm-qwen3tts serve` started them before vLLM: they loaded and compiled while the
            # engine started, and allocate their stream pools only now that its KV cache is sized.
            workers, clients = await provision_launched_workers(launched, max_streams, chunk_lengths)
            devices = [w.device for w in workers]
        else:
            devices = list(settings.codec_devices) or codec_devices_for(vllm_config.parallel_config, on_gpu)
            workers, clients = await start_workers(model_dir, devices, max_streams, chunk_lengths)
        engine = TTSEngine(engine_client, CodecPool(clients), model_dir, max_model_len=vllm_config.model_config.max_model_len,
                           chunk_schedule=ChunkSchedule(light_load_streams=settings.light_load_streams))
        names = args.served_model_name or [args.model]
        served = [names] if isinstance(names, str) else list(names)
        service = SpeechService(engine, settings, served, codec_workers=workers,
                                llm_priority=vllm_config.scheduler_config.policy == "priority")
        state.qwen3tts = service
        # keep a reference: a bare task could be garbage-collected mid-flight
        state.qwen3tts_warmup = asyncio.create_task(service.warm_up())
        state.qwen3tts_codec_watch = asyncio.create_task(service.watch_codec())
        state.qwen3tts_loop_watch = asyncio.create_task(watch_event_loop(speech_metrics().event_loop_lag))
        logger.info("speech endpoints ready to warm up on %s (codec workers %s on %s)", model_dir,
                    [w.pid for w in workers], devices)


async def start_workers(model_dir: Path, devices: list[str], max_streams: int, chunk_lengths: tuple[int, ...]):
    """Codec workers started now, one per device, in parallel (plain `vllm serve`: the engine is
    ready by now, so their compile comes after it)."""
    from ..codec.client import CodecClient
    from ..codec.worker import CodecWorkerConfig, start_codec_worker

    def start(device: str):
        return start_codec_worker(CodecWorkerConfig(
            model_dir=str(model_dir), device=device, dtype=None, max_streams=max_streams,
            graph_chunk_lengths=chunk_lengths,
        ))

    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(loop.run_in_executor(None, start, d) for d in devices), return_exceptions=True)
    workers = [w for w in results if not isinstance(w, BaseException)]
    if len(workers) < len(results):
        for w in workers:
            w.stop()
        raise next(r for r in results if isinstance(r, BaseException))
    clients = []
    for worker in workers:
        client = CodecClient()
        client.connect(worker.address)
        clients.append(client)
    return workers, clients


async def provision_launched_workers(workers: list, max_streams: int, chunk_lengths: tuple[int, ...],
                                     timeout_s: float | None = None):
    """Connect to workers `vllm-qwen3tts serve` launched and provision them, waiting for any still
    compiling; fails at once, not at the timeout, if one exits. Stops them all on failure."""
    from ..codec.client import CodecClient, CodecError
    from ..codec.worker import DEFAULT_STARTUP_TIMEOUT_S, CodecWorkerStartError

    timeout_s = DEFAULT_STARTUP_TIMEOUT_S if timeout_s is None else timeout_s
    clients = []
    for worker in workers:
        client = CodecClient()
        client.connect(worker.address)
        clients.append(client)

    async def provision(worker, client) -> None:
        call = asyncio.ensure_future(client.provision(max_streams, chunk_lengths, timeout_s=timeout_s))
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=0.5)
                if not call.done() and not worker.is_alive():
                    raise CodecWorkerStartError(f"the codec worker (pid {worker.pid}) exited before it was "
                                                "ready; its log is above")
            try:
                call.result()
            except CodecError as e:
                raise CodecWorkerStartError(f"the codec worker (pid {worker.pid}) failed to start: {e}") from None
        finally:
            call.cancel()

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(provision(w, c) for w, c in zip(workers, clients)))
    except BaseException:
        for client in clients:
            client.close()
        for worker in workers:
            worker.stop()
        raise
    logger.info("codec workers provisioned for %d streams; waited %.1f s for them after the engine",
                max_streams, time.perf_counter() - t0)
    return workers, clients


def codec_devices_for(parallel_config, on_gpu: bool) -> list[str]:
    """Where codec workers go by default: beside the talker; with data parallelism on GPUs, one
    per local rank, on the first GPU of that rank (ranks take `tensor_parallel_size` GPUs each,
    in order)."""
    if not on_gpu:
        return ["cpu"]
    ranks = max(1, int(getattr(parallel_config, "data_parallel_size_local", 1) or 1))
    if ranks == 1:
        return ["cuda"]
    tp = int(getattr(parallel_config, "tensor_parallel_size", 1) or 1)
    return [f"cuda:{rank * tp}" for rank in range(ranks)]
