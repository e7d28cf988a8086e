"""`vllm.endpoint_plugins` entry point: `/v1/audio/speech` and friends on `vllm serve`.

Installing the package is enough: `vllm serve Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice` serves them
(the talker plugin has vLLM load this one, which vLLM would otherwise load only when
VLLM_PLUGINS names it, and sets what the talker needs of vLLM's configuration). The server's
settings come from QWEN3TTS_* variables (`base.settings.ServerSettings`), and from
`--additional-config '{"qwen3tts": {"max_concurrency_per_key": 4, ...}}'`, which wins;
`vllm-qwen3tts serve` writes the variables from its flags.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from argparse import Namespace
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

logger = logging.getLogger("vllm.qwen3tts.server")  # under vLLM's logger: its handler and level apply

PLUGIN_NAME = "qwen3_tts_speech"


class ArrivalTime:
    """Stamps each request with the moment the app first sees it (`request.state.arrival`,
    `time.perf_counter()`), before its body is read and validated: the speech routes count
    latency from there, because under a burst of requests reading and validating bodies takes
    time the route's own clock would not count."""

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
        """Our routes (replacing vLLM's of the same path and method, as vLLM 0.32 does itself and
        0.26 does not), behind `guard.SpeechGuard`, which serves no other route, and which takes
        over vLLM's own API-key check (`seal_app`). Nothing for a model that is not Qwen3-TTS:
        the plugin loads wherever the package is installed (`talker.plugin.register`)."""
        from .guard import SpeechGuard
        from .routes import router
        from .validation import install as install_validation

        self.serving = serves_speech(getattr(app.state, "args", None))
        if not self.serving:
            logger.info("the speech endpoints are not served: %s is not a Qwen3-TTS checkpoint",
                        getattr(getattr(app.state, "args", None), "model", "the model"))
            return
        replace_routes(app, router)
        install_validation(app)  # errors in our shape, an OpenAPI document of this server (validation.py)
        replace_routes(app, models_router)
        app.add_middleware(SpeechGuard, state=app.state)
        app.add_middleware(ArrivalTime)
        seal_app(app)
        self._app = app

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None or not getattr(self, "serving", True):
            return  # vLLM's CPU-only render server (no engine), or not a Qwen3-TTS model
        from ..base.model_source import resolve_checkpoint
        from ..base.settings import (ADDITIONAL_CONFIG_KEY, process_settings, set_process_settings, settings_line,
                                     with_options)
        from ..base.vllm_adapter import before_engine_shutdown, current_platform
        from ..codec.pool import CodecPool, default_codec_streams
        from ..codec.supervisor import CodecSupervisor
        from ..codec.worker import launched_workers_from_env
        from ..synthesis import ChunkSchedule, TTSEngine
        from .metrics import speech_metrics, watch_event_loop
        from .service import SpeechService

        # a hub id: the snapshot vLLM's engine read (the same cache, revision and download dir)
        model_dir = resolve_checkpoint(args.model, getattr(args, "revision", None), getattr(args, "download_dir", None))
        settings = with_options(process_settings().server,
                                (getattr(args, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY, {}))
        settings = with_vllm_api_keys(settings, vllm_api_keys(getattr(self, "_app", None), state))
        set_process_settings(dataclasses.replace(process_settings(), server=settings))  # one view in this process
        logger.info("speech server settings: %s", settings_line(settings))  # the keys masked
        vllm_config = engine_client.vllm_config
        on_gpu = current_platform.device_type == "cuda"
        max_streams = settings.codec_streams
        if max_streams is None:
            max_streams = default_codec_streams(vllm_config.scheduler_config.max_num_seqs)
        elif max_streams < 1:
            raise ValueError(f"--codec-streams (QWEN3TTS_CODEC_STREAMS) must be at least 1, not {max_streams}")
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
        pool = CodecPool(clients, max_streams=max_streams)
        # restarts a worker that dies, like the first: same device, stream slots and chunk lengths
        supervisor = CodecSupervisor(pool, workers, max_streams, chunk_lengths)
        engine = TTSEngine(engine_client, pool, model_dir, max_model_len=vllm_config.model_config.max_model_len,
                           chunk_schedule=ChunkSchedule(light_load_streams=settings.light_load_streams))
        names = args.served_model_name or [args.model]
        served = [names] if isinstance(names, str) else list(names)
        service = SpeechService(engine, settings, served, codec_supervisor=supervisor,
                                llm_priority=vllm_config.scheduler_config.policy == "priority")
        state.qwen3tts = service
        # on SIGTERM/SIGINT vLLM shuts its engine down first: the server drains before that
        before_engine_shutdown(engine_client, service.before_engine_shutdown)
        # keep a reference: a bare task could be garbage-collected mid-flight
        state.qwen3tts_warmup = asyncio.create_task(service.warm_up())
        state.qwen3tts_codec_watch = asyncio.create_task(service.watch_codec())
        state.qwen3tts_codec_supervisor = asyncio.create_task(supervisor.run())
        state.qwen3tts_engine_watch = asyncio.create_task(service.watch_engine())
        state.qwen3tts_loop_watch = asyncio.create_task(watch_event_loop(speech_metrics().event_loop_lag))
        logger.info("speech endpoints ready to warm up on %s (codec workers %s on %s)", model_dir,
                    [w.pid for w in workers], devices)


def serves_speech(args: Namespace | None) -> bool:
    """Whether vLLM's arguments name a Qwen3-TTS checkpoint (a directory or a hub id)."""
    from ..base.config import MODEL_TYPE
    from ..base.model_source import model_type_of

    if args is None or not getattr(args, "model", None):
        return True  # an app built without vLLM's arguments (tests): serve
    return model_type_of(args.model, getattr(args, "revision", None), getattr(args, "download_dir", None)) == MODEL_TYPE


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
    from ..codec.client import CodecClient
    from ..codec.supervisor import provision_worker
    from ..codec.worker import DEFAULT_STARTUP_TIMEOUT_S

    timeout_s = DEFAULT_STARTUP_TIMEOUT_S if timeout_s is None else timeout_s
    clients = []
    for worker in workers:
        client = CodecClient()
        client.connect(worker.address)
        clients.append(client)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(provision_worker(w, c, max_streams, chunk_lengths, timeout_s)
                               for w, c in zip(workers, clients)))
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


# ---------------------------------------------------------------------------------- routes and keys

models_router = APIRouter()
_STARTED = int(time.time())


@models_router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """OpenAI's model list: the served model names, and no file path (vLLM's own list gives the
    checkpoint's absolute path as `root`)."""
    svc = getattr(request.app.state, "qwen3tts", None)
    if svc is None:
        return JSONResponse({"error": {"message": "the speech service is not initialised", "type": "server_error",
                                       "param": None, "code": "not_ready"}}, status_code=503)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": _STARTED, "owned_by": "vllm-qwen3tts", "root": name,
         "parent": None} for name in svc.served_model_names]})


def replace_routes(app: FastAPI, router: APIRouter) -> None:
    """Include `router`, dropping the app's earlier routes of the same path and method (the
    first match serves a request, and vLLM 0.26 adds plugin routes after its own)."""
    ours = [r for r in router.routes if isinstance(r, APIRoute)]
    kept = []
    for route in app.router.routes:
        if isinstance(route, APIRoute):
            taken = set().union(*(r.methods for r in ours if r.path == route.path))
            if taken & route.methods:
                if not route.methods - taken:
                    continue
                route = copy.copy(route)
                route.methods = route.methods - taken
        kept.append(route)
    app.router.routes[:] = kept
    app.include_router(router)


def seal_app(app: FastAPI) -> None:
    """Once vLLM has added all its routes and middlewares (when the app builds its middleware
    stack, at the end of vLLM's `build_app`):

    - vLLM's `--api-key` (or VLLM_API_KEY) middleware is left out. It admits only its own keys,
      and checks only paths under /v1, /v2, /inference and /cohere: our tenants' keys would get
      its 401 there. Its keys are kept in `app.state.qwen3tts_vllm_api_keys`, for `init_state` to
      make them speech keys: the guard then checks every key on every path it serves.
    - the routes the guard does not serve leave the OpenAPI document, which then describes the
      server as it answers."""
    from ..base.vllm_adapter import vllm_api_key_middleware_tokens
    from .guard import SERVED

    build = app.build_middleware_stack
    app.state.qwen3tts_vllm_api_keys = []

    def build_middleware_stack():
        kept = []
        for middleware in app.user_middleware:
            tokens = vllm_api_key_middleware_tokens(middleware)
            if tokens is None:
                kept.append(middleware)
            else:
                known = app.state.qwen3tts_vllm_api_keys
                known += [t for t in tokens if t and t not in known]
        app.user_middleware[:] = kept
        for route in app.routes:
            if isinstance(route, APIRoute) and not any(r.path == route.path for r in SERVED):
                route.include_in_schema = False
        app.openapi_schema = None
        return build()

    app.build_middleware_stack = build_middleware_stack


def vllm_api_keys(app: FastAPI | None, state) -> list[str]:
    """The keys of vLLM's own `--api-key` / VLLM_API_KEY (`seal_app`)."""
    if app is not None and app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()  # vLLM builds it in build_app; if not, now
    return list(getattr(state, "qwen3tts_vllm_api_keys", []))


def with_vllm_api_keys(settings, keys: list[str]):
    """`settings` whose speech keys include vLLM's (each a tenant of its own, default limits)."""
    extra = tuple(k for k in keys if k not in settings.api_keys)
    return dataclasses.replace(settings, api_keys=settings.api_keys + extra) if extra else settings
