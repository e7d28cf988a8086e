"""The speech service behind the HTTP routes: voice resolution, admission, and synthesis of (possibly long, sentence-split) input as one audio stream.

One `SpeechService` lives per API-server process. It wraps the vLLM engine
client vLLM hands to endpoint plugins, starts the codec worker, and owns the
voice store and the tenant registry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import psutil

from ..base.settings import ServerSettings
from ..base.vllm_adapter import engine_errored
from ..codec.client import CodecUnavailableError
from ..codec.pool import CodecBusyError
from ..codec.protocol import sum_stats
from ..model.incremental_text import IncrementalTokenizer
from ..synthesis import MAX_PROMPT_POSITIONS, SAMPLE_RATE, SynthesisParams, SynthesisRequest, TTSEngine, VoiceProfile
from ..base.params import ParamError, PromptTooLong, is_blank, quoted
from ..base.params import PromptError
from .metrics import codec_stats_collector, speech_metrics
from .schemas import OPENAI_VOICES, APIError, SpeechBody, bad_request
from .speed import TimeStretcher
from .validation import input_limit, instructions_limit
from .tenants import (AdmissionController, Overloaded, RateLimited, Tenant, TenantLimits, TenantRegistry,
                      TooManyConcurrent, Unauthorized)
from .text_split import IncrementalSplitter, first_cut, split_sentences
from .voices import VoiceExists, VoiceNotFound, VoiceQuotaExceeded, VoiceStore

logger = logging.getLogger("vllm.qwen3tts.server")  # under vLLM's logger: its handler and level apply

TASK_TYPES = {"custom_voice": "CustomVoice", "voice_design": "VoiceDesign", "base": "Base"}
# OpenAI's speech model names, accepted as aliases of the served model (drop-in clients send them)
OPENAI_TTS_MODELS = {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"}
# Retry-After of a 503 while no codec worker serves: about what restarting one takes once compiled.
CODEC_RETRY_AFTER_S = 5
# Exit status of the API server once vLLM's engine core has died (vLLM itself would exit 0).
ENGINE_DEAD_EXIT_STATUS = 1


@dataclass
class SpeechJob:
    """A validated request: its sentence segments and everything they share."""

    segments: list[SynthesisRequest]
    speed: float
    input_tokens: int
    tenant: Tenant
    priority: int = 0
    started: float = field(default_factory=time.perf_counter)
    frames: int = 0
    finish_reason: str = "stop"
    request_id: str | None = None  # what the client and the log lines call it (X-Request-Id); None: pcm_stream's


class SpeechService:
    def __init__(self, engine: TTSEngine, settings: ServerSettings, served_model_names: list[str],
                 codec_workers: list | None = None, llm_priority: bool = False, codec_supervisor=None):
        self.engine = engine
        self.config = engine.config
        self.settings = settings
        self.served_model_names = served_model_names
        # A `codec.supervisor.CodecSupervisor` restarts workers that die (its list is kept current).
        self.codec_supervisor = codec_supervisor
        self.codec_workers = codec_supervisor.workers if codec_supervisor is not None else list(codec_workers or [])
        self.engine_died = False  # vLLM's engine core died while serving (`watch_engine`)
        self._engine_shut_down = False  # vLLM was told to shut its engine down
        # Shutting down (`drain`): draining refuses new speech requests and WebSocket sessions;
        # stopping (the grace period is over) ends those left.
        self.draining = False
        self.stopping = False
        self._open_work = 0  # speech requests and WebSocket sessions in flight (`admit`, `open_session`)
        self._streams: dict[str, int] = {}  # request id -> its segments, of each pcm_stream running
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built outside an event loop: no drain on shutdown
            self._loop = None
        self.llm_priority = llm_priority  # vLLM runs with --scheduling-policy priority
        # Limits apply per key; with no keys configured everyone is one anonymous tenant,
        # bounded only by the global queue bound.
        self.tenants = TenantRegistry.from_sources(
            keys=list(settings.api_keys), keys_file=settings.api_keys_file,
            default_limits=TenantLimits(settings.default_max_concurrency, settings.default_requests_per_minute),
        )
        self.admission = AdmissionController(max_queued_requests=settings.max_queued_requests)
        # Codec stream slots promised to admitted requests: one each, for the request's whole life,
        # so that a request's later sentences (one stream each, one at a time) never find the pool
        # taken by requests admitted after it.
        self.codec_slots_reserved = 0
        self.voices = VoiceStore(settings.voices_dir)
        self.metrics = speech_metrics()
        self.ready = False
        self.start_s: float | None = None  # process start to ready
        self._clone_cache: OrderedDict[str, VoiceProfile] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    async def warm_up(self) -> None:
        """One short synthesis so the first user does not pay for lazy initialisation."""
        try:
            if self.settings.warmup:
                req = self._warmup_request()
                async for _ in self.engine.stream(req):
                    pass
            self.ready = True
            # how long a restart of this server takes, for a dying engine's 503 (vLLM cannot restart it)
            self.start_s = time.time() - psutil.Process().create_time()
            logger.info("speech service ready %.1f s after the process started", self.start_s)
        except Exception:
            logger.exception("warm-up failed; /ready stays 503")

    def _warmup_request(self) -> SynthesisRequest:
        params = SynthesisParams(max_frames=4, min_frames=4, temperature=0.0)
        kind = self.config.tts_model_type
        if kind == "custom_voice":
            return SynthesisRequest("Warm up.", speaker=self.config.speakers[0], params=params)
        if kind == "voice_design":
            return SynthesisRequest("Warm up.", instructions="A clear voice.", params=params)
        xvec = [0.0] * self.config.talker.decoder.hidden_size
        return SynthesisRequest("Warm up.", voice=VoiceProfile(xvector=xvec), params=params)

    async def watch_codec(self, poll_s: float = 5.0, log_every_s: float = 10.0) -> None:
        """Poll the codec worker's counters for /metrics, and log its load while it works: how
        busy it is and how well it batches say whether audio decoding is what limits the server."""
        collector = codec_stats_collector()
        logged, logged_at = None, time.monotonic()
        delay = 0.0  # the first poll right away: /metrics has the codec's series once the server is ready
        while True:
            await asyncio.sleep(delay)
            delay = poll_s
            try:
                per_worker = await self.engine.codec.worker_stats(timeout_s=poll_s)  # a CodecPool
            except Exception as e:  # noqa: BLE001 - the health check reports a dead worker
                logger.debug("codec stats unavailable: %s", e)
                continue
            collector.latest = per_worker
            stats = sum_stats(per_worker)
            now = time.monotonic()
            if now - logged_at < log_every_s:
                continue
            if logged is not None and stats.chunks_decoded > logged.chunks_decoded:
                dt = now - logged_at
                calls = stats.batches_run - logged.batches_run
                chunks = stats.chunks_decoded - logged.chunks_decoded
                logger.info("codec worker%s: %.1f audio-s/s, %.1f calls/s of %.1f chunks on average, busy %.0f%%, "
                            "%d streams open", "s" if len(per_worker) > 1 else "",
                            (stats.frames_decoded - logged.frames_decoded) / 12.5 / dt, calls / dt,
                            chunks / max(calls, 1),
                            100 * (stats.decode_seconds - logged.decode_seconds) / dt / len(per_worker),
                            stats.active_streams)
            logged, logged_at = stats, now

    @property
    def ready(self) -> bool:
        """Warmed up and able to take a request now (`not_ready_reason` is None): what /ready says."""
        return self.not_ready_reason() is None

    @ready.setter
    def ready(self, warmed_up: bool) -> None:
        self._warmed_up = warmed_up

    def unavailable_reason(self) -> str | None:
        """Why the server cannot serve as configured right now, or None: vLLM's engine has stopped
        (the server is exiting), or a codec worker is down (being restarted, or given up on)."""
        if self.engine_died or engine_errored(self.engine.engine):
            return "the vLLM engine has stopped; the server is exiting"
        if self.codec_supervisor is not None:
            problems = self.codec_supervisor.problems()
        else:
            problems = [f"codec worker {i} (pid {w.pid}) has exited" for i, w in enumerate(self.codec_workers)
                        if not w.is_alive()]
        return "; ".join(problems) or None

    def healthy(self) -> bool:
        return self.unavailable_reason() is None

    def codec_retry_after_s(self) -> int:
        """Whole seconds a client refused for want of a codec worker should wait: until the one
        being restarted should serve again, else CODEC_RETRY_AFTER_S."""
        back = self.codec_supervisor.expected_back_s() if self.codec_supervisor is not None else None
        return CODEC_RETRY_AFTER_S if back is None else max(1, math.ceil(back))

    def restart_retry_after_s(self) -> int:
        """Whole seconds a client refused because the engine died should wait: as long as this
        server took to start (its replacement should take as long), else CODEC_RETRY_AFTER_S."""
        return CODEC_RETRY_AFTER_S if self.start_s is None else max(1, math.ceil(self.start_s))

    def check_can_synthesize(self) -> None:
        """Raise 503 + Retry-After unless synthesis can start now (the engine runs and at least
        one codec worker serves), so that a request is refused before any audio headers."""
        if self.engine_died or engine_errored(self.engine.engine):
            raise engine_unavailable("the speech engine has stopped; the server is restarting", self.restart_retry_after_s())
        if not self.engine.codec.live_workers():
            raise codec_unavailable(self.unavailable_reason() or "no codec worker is running", self.codec_retry_after_s())

    def synthesis_error(self, error: Exception) -> APIError | None:
        """The 503 for a synthesis that failed because the engine or the codec went away (not
        because of the request), or None for any other failure."""
        if isinstance(error, APIError):
            return None
        if self.engine_died or engine_errored(self.engine.engine):
            return engine_unavailable("the speech engine stopped during synthesis; the server is restarting",
                                      self.restart_retry_after_s())
        if isinstance(error, CodecUnavailableError):
            return codec_unavailable(f"audio decoding failed: {error}", self.codec_retry_after_s())
        return None

    def before_engine_shutdown(self) -> None:
        """Called just before vLLM shuts its engine down (`vllm_adapter.before_engine_shutdown`).
        On SIGTERM/SIGINT that call comes from a worker thread while the server still answers:
        drain first (`drain`, up to `shutdown_grace_s`), so that what is in flight finishes.
        Then no codec worker is restarted any more (stopping is part of the shutdown), and the
        engine's end is a shutdown, not a death (`watch_engine`)."""
        try:
            asyncio.get_running_loop()
            on_loop = True  # vLLM's second call, as it exits (or a shutdown from the loop): never block it
        except RuntimeError:
            on_loop = False
        if not on_loop and self._loop is not None and not self.draining:
            grace_s = self.settings.shutdown_grace_s
            try:
                asyncio.run_coroutine_threadsafe(self.drain(grace_s), self._loop).result(timeout=grace_s + 30)
            except Exception:  # noqa: BLE001 - a failed drain must not stop the shutdown
                logger.exception("draining the speech server failed; shutting down now")
        self._engine_shut_down = True
        if self.codec_supervisor is not None:
            self.codec_supervisor.stop_restarting()

    async def drain(self, grace_s: float, stop_wait_s: float = 10.0) -> None:
        """Stop admitting and let what is in flight finish, for at most `grace_s` seconds.

        New speech requests and WebSocket sessions get 503 `shutting_down` and /ready says 503
        from now on; speech requests, streams and WebSocket sessions already open go on (a
        session's next sentences too). When the grace period ends with some still open, they
        are ended (`stopping`): their engine requests are aborted, so that each ends at once
        as any failure after its first audio does (an error event on SSE and the WebSocket, an
        early end of raw audio, a 503 for a whole file) instead of waiting on an engine that
        is about to stop; this waits up to `stop_wait_s` for their synthesis to end."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.draining = True
        logger.info("shutting down: draining %d speech requests and sessions in flight, for up to %g s",
                    self._open_work, grace_s)
        while self._open_work and loop.time() - started < grace_s:
            await asyncio.sleep(0.05)
        if self._open_work:
            self.stopping = True
            ids = [f"{rid}-{i}" for rid, segments in self._streams.items() for i in range(segments)]
            logger.warning("shutdown grace period of %g s is over: ending %d speech requests and sessions still "
                           "in flight (%d streams)", grace_s, self._open_work, len(self._streams))
            if ids:
                try:
                    await self.engine.engine.abort(ids)
                except Exception:  # noqa: BLE001 - the engine is going away anyway
                    logger.warning("aborting the engine requests in flight failed", exc_info=True)
            stopped = loop.time()
            while self._streams and loop.time() - stopped < stop_wait_s:
                await asyncio.sleep(0.05)
        self.stopping = True  # nothing starts synthesis while the engine shuts down
        logger.info("drained in %.1f s; %d speech requests and sessions left", loop.time() - started, self._open_work)

    @contextlib.contextmanager
    def open_session(self):
        """Hold a WebSocket session open: `drain` waits for it (its sentences are admitted one by
        one, as requests of the session). The caller has checked `check_accepting` (the route,
        where a refusal becomes the session's error event), with no await since."""
        self._open_work += 1
        try:
            yield
        finally:
            self._open_work -= 1

    def check_accepting(self, every: bool = False) -> None:
        """Raise 503 `shutting_down` + Retry-After for new work once the server drains (`every`:
        also for the next sentence of an open session, once `drain`'s grace period is over)."""
        if self.stopping or (self.draining and not every):
            raise shutting_down()

    async def watch_engine(self, poll_s: float = 0.1, exit_after_s: float = 10.0) -> None:
        """Once vLLM's engine core dies, exit the process with ENGINE_DEAD_EXIT_STATUS, so that a
        supervisor restarts it: vLLM cannot restart its engine, and its own watchdog stops the HTTP
        server within seconds but exits 0. The exit happens when vLLM's shutdown cancels this task
        (or after `exit_after_s`, if vLLM keeps the server up). A shutdown vLLM was asked for (a
        signal, `before_engine_shutdown`) is not a death."""
        client = self.engine.engine
        while not (engine_errored(client) and not self._engine_shut_down):
            await asyncio.sleep(poll_s)
        self.engine_died = True
        logger.critical("the vLLM engine core has died; the server exits with status %d so that its supervisor "
                        "restarts it", ENGINE_DEAD_EXIT_STATUS)
        try:
            await asyncio.sleep(exit_after_s)
        finally:
            raise SystemExit(ENGINE_DEAD_EXIT_STATUS)

    def shutdown(self) -> None:
        if self.codec_supervisor is not None:
            self.codec_supervisor.stop()
            return
        try:
            self.engine.codec.close()
        finally:
            for worker in self.codec_workers:
                worker.stop()

    # ------------------------------------------------------------------ tenants

    def authenticate(self, authorization: str | None) -> Tenant:
        try:
            return self.tenants.authenticate(authorization)
        except Unauthorized as e:
            raise APIError(401, str(e) or "invalid or missing API key", type="authentication_error",
                           code="invalid_api_key") from e

    def admit(self, tenant: Tenant, endpoint: str):
        """Async context manager holding the tenant's admission and one codec stream slot; HTTP
        errors on refusal, all before any audio headers. `endpoint` "speech": a request of its
        own, refused once the server drains, and waited for by `drain`; "websocket": a sentence
        of an open session (`open_session` is what drains)."""
        service = self
        new_work = endpoint == "speech"

        class _Admit:
            async def __aenter__(self):
                try:
                    service.check_accepting(every=not new_work)
                except APIError:
                    service.metrics.requests.labels(tenant.name, endpoint, "503").inc()
                    raise
                if service.codec_slots_free() == 0:
                    service.metrics.requests.labels(tenant.name, endpoint, "503").inc()
                    service.check_can_synthesize()  # no worker in service is not "busy"
                    raise codec_busy()
                service.codec_slots_reserved += 1  # no await since the check above
                try:
                    ticket = await self._enter()
                except BaseException:
                    service.codec_slots_reserved -= 1
                    raise
                service.metrics.in_flight.inc()
                service._open_work += int(new_work)
                return ticket

            async def _enter(self):
                try:
                    self._cm = service.admission.admit(tenant)
                    return await self._cm.__aenter__()
                except RateLimited as e:
                    service.metrics.requests.labels(tenant.name, endpoint, "429").inc()
                    raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                                   headers={"Retry-After": str(int(np.ceil(e.retry_after_s)))}) from e
                except TooManyConcurrent as e:
                    service.metrics.requests.labels(tenant.name, endpoint, "429").inc()
                    raise APIError(429, str(e), type="rate_limit_error", code="concurrency_limit_exceeded",
                                   headers={"Retry-After": str(int(np.ceil(e.retry_after_s)))}) from e
                except Overloaded as e:
                    service.metrics.requests.labels(tenant.name, endpoint, "503").inc()
                    raise APIError(503, "the server is at capacity; retry shortly", type="server_error",
                                   code="overloaded", headers={"Retry-After": "1"}) from e

            async def __aexit__(self, *exc):
                service._open_work -= int(new_work)
                service.metrics.in_flight.dec()
                service.codec_slots_reserved -= 1
                return await self._cm.__aexit__(*exc)

        return _Admit()

    def codec_slots_free(self) -> int | None:
        """Codec stream slots a new request could be promised now on the workers in service (None:
        not known, or no worker serves, which `check_can_synthesize` refuses): those neither
        reserved by an admitted request nor still held by a stream whose close is on its way.
        An admitted request holds at most one stream at a time."""
        pool = self.engine.codec
        if not hasattr(pool, "free_slots") or not pool.live_workers():
            return None
        free = pool.free_slots()
        return None if free is None else max(0, min(free, pool.capacity() - self.codec_slots_reserved))

    def not_ready_reason(self) -> str | None:
        """Why /ready answers 503 now, or None: warming up, unable to serve
        (`unavailable_reason`), or every codec stream slot taken."""
        if self.draining:
            return f"shutting down: draining {self._open_work} speech requests and sessions in flight"
        if not self._warmed_up:
            return "warming up"
        reason = self.unavailable_reason()
        if reason is None and self.codec_slots_free() == 0:
            reason = "every codec stream slot is in use"
        return reason

    # ------------------------------------------------------------------ requests

    async def prepare(self, body: SpeechBody, tenant: Tenant, priority: int = 0, split: bool = True,
                      received: float | None = None) -> SpeechJob:
        """Validate everything before any audio is sent, so errors are HTTP errors. `split`: cut
        long input at sentence boundaries (off for text that arrives already as a sentence).
        `received`: when the request arrived (`time.perf_counter()`; default now), which the
        job's latencies (time to first audio, wall time) count from."""
        received = time.perf_counter() if received is None else received
        self.check_can_synthesize()
        kind = self.config.tts_model_type
        if body.task_type is not None and body.task_type != TASK_TYPES[kind]:
            raise bad_request(f"task_type {body.task_type} does not match the served checkpoint "
                              f"({TASK_TYPES[kind]})", param="task_type", code="unsupported_task_type")
        if body.model and body.model not in self.served_model_names and body.model not in OPENAI_TTS_MODELS:
            raise APIError(404, f"model {quoted(body.model)} is not served here; available: "
                           f"{', '.join(self.served_model_names)}", param="model", code="model_not_found")
        # The schema's bounds (SpeechBody) hold already; these are the ones of this server's settings
        # and checkpoint, which its OpenAPI document states (validation.describe_server).
        if is_blank(body.input):
            raise bad_request("input is empty", param="input", code="empty_input")
        if len(body.input) > input_limit(self):
            raise bad_request(f"input must be at most {input_limit(self)} characters, got {len(body.input)}",
                              param="input", code="input_too_long")
        text = body.input.strip()
        language = body.language
        if language is not None and not (language.isascii() and language.lower() in self.config.languages):
            raise bad_request(f"language must be one of {', '.join(self.config.languages)} (any case), got "
                              f"{quoted(language)}", param="language", code="unsupported_language")
        if body.instructions:
            if kind == "base":
                raise bad_request("Base checkpoints do not take instructions", param="instructions")
            if not self.config.supports_instruct:
                raise bad_request("this checkpoint (0.6B CustomVoice) does not take instructions",
                                  param="instructions")
            limit = instructions_limit(self.engine)
            if len(body.instructions) > limit:
                raise bad_request(f"instructions must be at most {limit} characters on this server (what its model "
                                  f"length leaves room for), got {len(body.instructions)}", param="instructions",
                                  code="instructions_too_long")
        speaker, voice = await self._resolve_voice(body, tenant)
        # max_new_tokens is capped by the server's frame limit here and by the model's room in the
        # engine; min_new_tokens by whatever maximum results (both documented in SpeechBody).
        params = SynthesisParams(
            temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, subtalker_temperature=body.subtalker_temperature,
            subtalker_top_k=body.subtalker_top_k, subtalker_top_p=body.subtalker_top_p,
            max_frames=_capped(body.max_new_tokens, self.settings.max_frames_per_segment), seed=body.seed,
            min_frames=body.min_new_tokens or 2,
        )
        instructions = body.instructions or None

        def segment(piece: str) -> SynthesisRequest:
            return SynthesisRequest(text=piece, speaker=speaker, language=language or "auto", instructions=instructions,
                                    voice=voice, non_streaming_mode=body.non_streaming_mode, params=params,
                                    first_chunk_frames=body.initial_codec_chunk_frames or None)

        # Sentences; one the model has no room for (a 2,000-character word, say) is cut in halves
        # until each fits, so that any input within the limits is spoken.
        pending = list(reversed(split_sentences(text, max_chars=self.settings.max_segment_chars) if split else [text]))
        segments: list[SynthesisRequest] = []
        input_tokens = 0
        while pending:
            piece = pending.pop()
            request = segment(piece)
            try:
                prompt, _ = self.engine.prepare(request)
            except PromptTooLong as e:
                if len(piece) < 2:  # what leaves no room is the conditioning, not the text
                    culprit = "instructions" if instructions else "ref_audio" if voice and voice.ref_codes else "input"
                    raise bad_request(str(e), param=culprit, code="input_too_long") from e
                pending += reversed(_halves(piece))
                continue
            except ParamError as e:
                raise bad_request(str(e), param=e.param, code="invalid_value") from e
            except PromptError as e:
                raise bad_request(str(e), param=_param_of(str(e))) from e
            segments.append(request)
            input_tokens += len(prompt["prompt_token_ids"])
        if not segments:
            raise bad_request("input has nothing to speak", param="input", code="empty_input")
        self.metrics.prepare.observe(time.perf_counter() - received)
        return SpeechJob(segments, body.speed, input_tokens, tenant, priority if self.llm_priority else 0,
                         started=received)

    def request_frames(self, job: SpeechJob) -> int:
        """The most frames the request of `job`'s one segment can make: its frame budget
        (max_new_tokens, capped by --max-frames; else the checkpoint's), the model's room after its
        prompt, and the talker's text track (MAX_PROMPT_POSITIONS). A long token-mode utterance
        continues in a new request before its text nears it (`TextCuts`)."""
        _, _, budget = self.engine.resolve_params(job.segments[0].params)
        return max(1, min(budget, self.engine.max_model_len - job.input_tokens, MAX_PROMPT_POSITIONS))

    async def _resolve_voice(self, body: SpeechBody, tenant: Tenant) -> tuple[str | None, VoiceProfile | None]:
        kind = self.config.tts_model_type
        name = body.voice_name or ""
        if kind == "custom_voice":
            if body.ref_audio:
                raise bad_request("this checkpoint (CustomVoice) cannot clone voices; ref_audio needs a Base checkpoint",
                                  param="ref_audio", code="unsupported_task_type")
            speakers = self.config.talker.spk_id
            key = name.lower() if name.isascii() else "?"  # ASCII case only, as the OpenAPI document's pattern
            if not key:
                key = next((s for s in OPENAI_VOICES.values() if s in speakers), self.config.speakers[0])
            if key in speakers:
                return key, None
            if key in OPENAI_VOICES and OPENAI_VOICES[key] in speakers:
                return OPENAI_VOICES[key], None
            raise bad_request(f"unknown voice {quoted(name)}; available: "
                              f"{', '.join(self.available_voice_names(tenant))}", param="voice", code="voice_not_found")
        if kind == "voice_design":
            if body.ref_audio:
                raise bad_request("VoiceDesign checkpoints cannot clone voices", param="ref_audio",
                                  code="unsupported_task_type")
            return None, None  # the voice comes from `instructions`; any voice name is accepted
        # Base: an inline reference, or a saved voice of this tenant
        if body.ref_audio:
            audio = await self._load_ref_audio(body.ref_audio)
            return None, await self.clone(audio, body.ref_text, body.x_vector_only_mode)
        if name:
            try:
                return None, self.voices.get(tenant.id, name).profile
            except VoiceNotFound:
                pass
        raise bad_request(f"Base checkpoints clone voices: pass ref_audio (+ ref_text) or the name of a saved voice"
                          f"{' (no saved voice ' + quoted(name) + ')' if name else ''}", param="voice",
                          code="voice_not_found")

    def available_voice_names(self, tenant: Tenant) -> list[str]:
        names = list(self.config.speakers)
        if self.config.tts_model_type == "custom_voice":
            names += [v for v, s in OPENAI_VOICES.items() if s in self.config.talker.spk_id]
        names += [v.name for v in self.voices.list(tenant.id)]
        return names

    async def clone(self, audio: bytes, ref_text: str | None, x_vector_only: bool) -> VoiceProfile:
        """Voice-clone profile, computed once per (audio, transcript, mode) and cached."""
        if not x_vector_only and not (ref_text or "").strip():
            raise bad_request("ref_text (the transcript of ref_audio) is required unless x_vector_only_mode is set",
                              param="ref_text")
        key = hashlib.sha256(audio + b"\0" + (ref_text or "").encode() + bytes([x_vector_only])).hexdigest()
        if key in self._clone_cache:
            self._clone_cache.move_to_end(key)
            return self._clone_cache[key]
        try:
            profile = await self.engine.clone_voice(audio, None if x_vector_only else ref_text, x_vector_only)
        except PromptError as e:
            if isinstance(e.__cause__, CodecUnavailableError):  # the codec, not the audio
                raise codec_unavailable(f"voice cloning is unavailable: {e.__cause__}", self.codec_retry_after_s()) from e
            raise bad_request(_reference_problem(str(e)), param="ref_audio", code="invalid_ref_audio") from e
        self._clone_cache[key] = profile
        while len(self._clone_cache) > 256:
            self._clone_cache.popitem(last=False)
        return profile

    async def _load_ref_audio(self, ref: str) -> bytes:
        limit = self.settings.max_ref_audio_bytes
        parsed = urlparse(ref) if len(ref) < 4096 else None
        if parsed is not None and parsed.scheme in ("http", "https"):
            if not self.settings.allow_url_ref_audio:
                raise bad_request("ref_audio URLs are disabled on this server; send base64 audio",
                                  param="ref_audio", code="url_ref_audio_disabled")
            return await fetch_public_url(ref, limit, self.settings.ref_audio_fetch_timeout_s)
        if parsed is not None and parsed.scheme in ("file", "ftp"):
            raise bad_request(f"ref_audio scheme {quoted(parsed.scheme)} is not accepted", param="ref_audio",
                              code="invalid_ref_audio")
        return decode_inline_audio(ref, limit)

    # ------------------------------------------------------------------ synthesis

    async def pcm_stream(self, job: SpeechJob, request_id: str, text: AsyncIterator[str] | None = None,
                         min_text_tokens: int = 0) -> AsyncIterator[np.ndarray]:
        """float32 PCM of all segments in order, speed applied, as it is generated. `request_id`:
        unique, the engine's requests are `request_id-0`, `-1`, ... `text`: the text of the job's
        one segment, arriving in pieces while it is spoken (`TTSEngine.stream_text`, which starts
        once `min_text_tokens` of it are final)."""
        stretcher = TimeStretcher(job.speed, SAMPLE_RATE) if job.speed != 1.0 else None
        first = True
        first_audio_s = None
        outcome = "cancelled"
        audio_samples = 0
        self.metrics.waiting_first_audio.inc()
        self._streams[request_id] = len(job.segments)  # what `drain` aborts once its grace period is over
        try:
            for i, seg in enumerate(job.segments):
                self.check_accepting(every=True)  # the grace period is over: no next sentence
                # closed here and now when the consumer stops, not when the generator is collected
                source = (self.engine.stream(seg, f"{request_id}-{i}", priority=job.priority) if text is None
                          else self.engine.stream_text(seg, text, f"{request_id}-{i}", priority=job.priority,
                                                       min_text_tokens=min_text_tokens))
                async with contextlib.aclosing(source) as chunks:
                    async for chunk in chunks:
                        self.check_accepting(every=True)  # the grace period is over: end it now
                        job.frames += len(chunk.codes)
                        if chunk.finish_reason == "length":
                            job.finish_reason = "length"
                        pcm = stretcher.process(chunk.audio) if stretcher else chunk.audio
                        if pcm.size:
                            if first:
                                first = False
                                first_audio_s = time.perf_counter() - job.started
                                self.metrics.waiting_first_audio.dec()
                                self.metrics.time_to_first_audio.observe(first_audio_s)
                            audio_samples += pcm.size
                            yield pcm
            if stretcher:
                tail = stretcher.flush()
                if tail.size:
                    audio_samples += tail.size
                    yield tail
            seconds = audio_samples / SAMPLE_RATE
            self.metrics.audio_seconds.labels(job.tenant.name).inc(seconds)
            if seconds > 0:
                self.metrics.real_time_factor.observe((time.perf_counter() - job.started) / seconds)
            outcome = job.finish_reason
        except Exception as e:
            outcome = "error"
            if isinstance(e, CodecBusyError):  # filled up since admission
                raise codec_busy() from e
            unavailable = self.synthesis_error(e)  # the codec or the engine went away: 503, not 500
            if unavailable is not None:
                raise unavailable from e
            raise
        finally:
            self._streams.pop(request_id, None)
            if first:
                self.metrics.waiting_first_audio.dec()
            # one structured (JSON) line per request, for log pipelines
            logger.info(json.dumps({
                "event": "speech", "request_id": job.request_id or request_id,
                **({"engine_request_id": request_id} if job.request_id not in (None, request_id) else {}),
                "tenant": job.tenant.name, "outcome": outcome,
                "segments": len(job.segments), "input_tokens": job.input_tokens, "frames": job.frames,
                "audio_s": round(audio_samples / SAMPLE_RATE, 3), "speed": job.speed,
                "ttfa_ms": None if first_audio_s is None else round(1000 * first_audio_s, 1),
                "wall_s": round(time.perf_counter() - job.started, 3),
            }))


@dataclass(frozen=True)
class TextCuts:
    """Where a request of a long token-mode utterance ends its text, in text tokens committed: at the
    first sentence end from `sentence` on, else at the first word boundary from `word` on, else at
    the next piece from `anywhere` on. The rest of the utterance continues in a new request."""

    sentence: int
    word: int
    anywhere: int

    @classmethod
    def for_frames(cls, frames: int) -> "TextCuts":
        """The cuts of a request that can make `frames` frames. Streaming text mode takes one text
        token per frame, and speech runs at ~2-5 frames per text token: from frames/5 tokens on,
        more text might not be spoken within the request; a text of frames/2 is cut anywhere, so
        that every token it takes is still read (one a frame) before its frames run out."""
        return cls(max(1, frames // 5), max(1, frames // 3), max(1, frames // 2))


class UtteranceText:
    """One token-mode utterance's text, handed out as the texts of the requests that speak it in turn.

    `take()` gives the utterance's next piece (None: its text is complete). A request's text
    (`pieces`) runs to the utterance's end or, once it nears what the request can speak
    (`TextCuts`), to a sentence end (`text_split`'s rules), else a word boundary; the text after
    the cut starts the next request (`next_start`). A cut never falls inside text a request has
    taken already (the engine may have spoken it), so text a request took beyond a sentence end
    (other than whitespace) lets that end pass. A request that ends by itself (EOS) leaves the
    text it did not take to the next one."""

    def __init__(self, take: Callable[[], Awaitable[str | None]], tokenizer: Any):
        self._take = take
        self._tokenizer = tokenizer  # the engine's text tokenizer
        self.rest = ""  # text after the last cut: the next request's
        self.ended = False  # `take` has said the utterance's text is complete
        self._taken: list[str] = []

    @property
    def text(self) -> str:
        """Every piece taken so far, as sent."""
        return "".join(self._taken)

    async def _next_piece(self) -> str | None:
        if self.ended:
            return None
        piece = await self._take()
        if piece is None:
            self.ended = True
        else:
            self._taken.append(piece)
        return piece

    async def next_start(self) -> str | None:
        """The next request's first text (not blank, leading whitespace dropped), or None once the
        utterance has nothing more to speak."""
        while is_blank(self.rest):
            piece = await self._next_piece()
            if piece is None:
                self.rest = ""
                return None
            self.rest += piece
        first, self.rest = self.rest.lstrip(), ""
        return first

    async def pieces(self, first: str, cuts: TextCuts) -> AsyncIterator[str]:
        """The text of the request that starts with `first` (`next_start`), in pieces, to its end."""
        tokens = IncrementalTokenizer(self._tokenizer)  # counts as the engine's request does
        sentences = IncrementalSplitter(max_chars=1 << 30, min_chars=0)  # sentence ends only, each at once
        text, scan, unscanned = "", 0, 0  # text[:scan]: up to the last sentence end found
        piece: str | None = first
        parts, i, cut = [], 0, None
        try:
            while piece is not None:
                parts = _PARTS.findall(piece)  # a long piece is weighed a few characters at a time
                for i, part in enumerate(parts):
                    start = len(text)  # text[:start] has been taken by the request
                    text += part
                    tokens.append(part)
                    committed = len(tokens.ids)
                    for sentence in sentences.feed(part):
                        # the splitter keeps every non-whitespace character, in order: count them off
                        unscanned += sum(not c.isspace() for c in sentence)
                        while unscanned > 0 and scan < len(text):
                            unscanned -= not text[scan].isspace()
                            scan += 1
                        if committed >= cuts.sentence and not text[scan:start].strip():
                            cut = max(scan, start)
                            break
                    if cut is None and committed >= cuts.word:
                        cut = first_cut(text, start)
                    if cut is None and committed >= cuts.anywhere and start > 0:
                        cut = start
                    if cut is not None:
                        self.rest = text[cut:] + "".join(parts[i + 1:])
                        if cut > start:
                            yield text[start:cut]
                        return
                    yield part
                piece = await self._next_piece()
        except GeneratorExit:  # the request ended by itself: the next one starts with what it did not take
            if cut is None:
                self.rest = "".join(parts[i + 1:])
            raise


# A piece's parts (`UtteranceText.pieces`): a word with the whitespace before it, at most 16 characters.
_PARTS = re.compile(r"\s*\S{1,16}|\s+")


def codec_unavailable(message: str, retry_after_s: int) -> APIError:
    """503 + Retry-After while no codec worker can serve (one is restarted automatically)."""
    return APIError(503, message, type="server_error", code="codec_unavailable",
                    headers={"Retry-After": str(retry_after_s)})


def engine_unavailable(message: str, retry_after_s: int) -> APIError:
    """503 + Retry-After once vLLM's engine has died (this server exits; its supervisor restarts it)."""
    return APIError(503, message, type="server_error", code="engine_unavailable",
                    headers={"Retry-After": str(retry_after_s)})


def shutting_down() -> APIError:
    """503 + Retry-After once the server drains for its shutdown: another instance (or this one
    restarted) should take the request."""
    return APIError(503, "the server is shutting down; retry shortly (another instance takes the request)",
                    type="server_error", code="shutting_down", headers={"Retry-After": "1"})


def codec_busy() -> APIError:
    """503 + Retry-After while every codec stream slot is taken."""
    return APIError(503, "every audio decoding slot is in use; retry shortly", type="server_error",
                    code="codec_busy", headers={"Retry-After": "1"})


def _capped(requested: int | None, cap: int | None) -> int | None:
    if cap is None:
        return requested
    return cap if requested is None else min(requested, cap)


def _param_of(message: str) -> str | None:
    """The request parameter a PromptError without one (not a ParamError) is about."""
    for param in ("language", "voice", "instructions", "ref_text", "input"):
        if param in message:
            return param
    if "speaker" in message:
        return "voice"
    if "reference" in message or "x-vector" in message:
        return "ref_audio"
    return None


def decode_inline_audio(ref: str, limit: int) -> bytes:
    """The bytes of reference audio sent inline: base64, or a `data:<type>;base64,<base64>` URI;
    413 beyond `limit` bytes, 400 for anything else."""
    payload = ref
    if ref.startswith("data:"):
        header, comma, payload = ref.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_request("a ref_audio data: URI must read data:<media type>;base64,<base64 audio>",
                              param="ref_audio", code="invalid_ref_audio")
    if len(payload) > limit * 4 // 3 + 8:
        raise APIError(413, f"ref_audio exceeds {limit} bytes", param="ref_audio", code="ref_audio_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request("ref_audio is not valid base64 (or a data: URI)", param="ref_audio",
                          code="invalid_ref_audio") from e


def _halves(text: str) -> list[str]:
    """`text` (stripped, two characters or more) in two non-empty pieces: at the whitespace
    nearest its middle when there is one in the middle half, else at the middle."""
    middle = len(text) // 2
    spaces = [i for i in (text.rfind(" ", len(text) // 4, middle + 1), text.find(" ", middle, 3 * len(text) // 4))
              if i > 0]
    cut = min(spaces, key=lambda i: abs(i - middle)) if spaces else middle
    return [piece for piece in (text[:cut].strip(), text[cut:].strip()) if piece]


def _reference_problem(message: str) -> str:
    """A codec worker's reason for refusing reference audio, without the libraries' details
    (soundfile's and PyAV's own messages, exception names): what the client can act on."""
    reason = message.removeprefix("reference audio: ").split(" (", 1)[0]
    if reason.startswith("codec worker error"):
        return "ref_audio could not be encoded as a voice reference"
    return f"ref_audio: {reason[:200]}"


async def fetch_public_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """Download reference audio from a public http(s) URL: private, loopback, link-local
    and other non-global addresses are refused (no server-side request forgery), the
    size and the time are bounded, and redirects are not followed."""
    import httpx

    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        raise bad_request("ref_audio URL has no host", param="ref_audio", code="invalid_ref_audio")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise bad_request(f"ref_audio URL host {quoted(host)} does not resolve", param="ref_audio",
                          code="invalid_ref_audio") from e
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or any(not a.is_global for a in addresses):
        raise bad_request("ref_audio URL points to a private or loopback address", param="ref_audio",
                          code="forbidden_ref_audio_url")
    # Connect to the address we checked (a second lookup could answer differently), keeping
    # the name for the Host header and for TLS (SNI and certificate checks).
    pinned = f"[{addresses[0]}]" if addresses[0].version == 6 else str(addresses[0])
    target = parsed._replace(netloc=f"{pinned}:{port}").geturl()
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", target, headers={"Host": parsed.netloc},
                                     extensions={"sni_hostname": host}) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"ref_audio URL answered HTTP {resp.status_code}", param="ref_audio",
                                      code="invalid_ref_audio")
                data = bytearray()
                async for piece in resp.aiter_bytes():
                    data += piece
                    if len(data) > max_bytes:
                        raise APIError(413, f"ref_audio exceeds {max_bytes} bytes", param="ref_audio",
                                       code="ref_audio_too_large")
                return bytes(data)
    except httpx.HTTPError as e:
        raise bad_request(f"could not fetch ref_audio: {e}", param="ref_audio", code="invalid_ref_audio") from e


__all__ = ["SpeechJob", "SpeechService", "TextCuts", "UtteranceText", "fetch_public_url", "VoiceExists",
           "VoiceQuotaExceeded"]
