"""The speech service behind the HTTP routes: settings, voice resolution, admission,
and synthesis of (possibly long, sentence-split) input as one audio stream.

One `SpeechService` lives per API-server process. It wraps the vLLM engine
client vLLM hands to endpoint plugins, starts the codec worker, and owns the
voice store and the tenant registry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ..codec.protocol import sum_stats
from ..engine import SAMPLE_RATE, ChunkSchedule, SynthesisParams, SynthesisRequest, TTSEngine, VoiceProfile
from ..prompt import PromptError
from .metrics import codec_stats_collector, speech_metrics
from .schemas import OPENAI_VOICES, APIError, SpeechBody, bad_request
from .speed import TimeStretcher
from .tenants import (AdmissionController, Overloaded, RateLimited, Tenant, TenantLimits, TenantRegistry,
                      TooManyConcurrent, Unauthorized)
from .text_split import split_sentences
from .voices import VoiceExists, VoiceNotFound, VoiceQuotaExceeded, VoiceStore

logger = logging.getLogger("vllm.qwen3tts.server")  # under vLLM's logger: its handler and level apply

TASK_TYPES = {"custom_voice": "CustomVoice", "voice_design": "VoiceDesign", "base": "Base"}
# OpenAI's speech model names, accepted as aliases of the served model (drop-in clients send them)
OPENAI_TTS_MODELS = {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"}


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


@dataclass(frozen=True)
class ServerSettings:
    """Server options. Under `vllm serve` they come from QWEN3TTS_* environment variables
    (vLLM's command line has no room for plugin flags); `vllm-qwen3tts serve` sets them."""

    voices_dir: Path = Path(os.path.expanduser("~/.cache/vllm_qwen3tts/voices"))
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    default_max_concurrency: int = 16
    default_requests_per_minute: int = 600
    max_queued_requests: int = 256
    max_input_chars: int = 20_000
    max_segment_chars: int = 300
    allow_url_ref_audio: bool = False
    max_ref_audio_bytes: int = 10 * 1024 * 1024
    ref_audio_fetch_timeout_s: float = 10.0
    # One codec worker per entry; empty: one on the talker's device, or with vLLM data
    # parallelism on a GPU, one on each rank's GPU (`codec_devices_for`).
    codec_devices: tuple[str, ...] = ()
    warmup: bool = True
    max_frames_per_segment: int | None = None  # cap on generated frames per sentence (None: the model's room)
    # A request arriving while at most this many streams are being synthesized gets a 1-frame
    # first chunk (sooner first audio), beyond that 2 frames (ChunkSchedule.for_load); 0: always 2.
    light_load_streams: int = ChunkSchedule.light_load_streams

    @classmethod
    def from_env(cls) -> "ServerSettings":
        e = os.environ.get
        keys_file = e("QWEN3TTS_API_KEYS_FILE")
        return cls(
            voices_dir=Path(e("QWEN3TTS_VOICES_DIR") or cls.voices_dir),
            api_keys=tuple(_env_list("QWEN3TTS_API_KEYS")),
            api_keys_file=Path(keys_file) if keys_file else None,
            default_max_concurrency=int(e("QWEN3TTS_MAX_CONCURRENCY_PER_KEY", cls.default_max_concurrency)),
            default_requests_per_minute=int(e("QWEN3TTS_REQUESTS_PER_MINUTE_PER_KEY", cls.default_requests_per_minute)),
            max_queued_requests=int(e("QWEN3TTS_MAX_QUEUED_REQUESTS", cls.max_queued_requests)),
            max_input_chars=int(e("QWEN3TTS_MAX_INPUT_CHARS", cls.max_input_chars)),
            allow_url_ref_audio=e("QWEN3TTS_ALLOW_URL_REF_AUDIO", "0") == "1",
            max_ref_audio_bytes=int(e("QWEN3TTS_MAX_REF_AUDIO_BYTES", cls.max_ref_audio_bytes)),
            codec_devices=tuple(_env_list("QWEN3TTS_CODEC_DEVICES") or _env_list("QWEN3TTS_CODEC_DEVICE")),
            warmup=e("QWEN3TTS_WARMUP", "1") == "1",
            max_frames_per_segment=int(e("QWEN3TTS_MAX_FRAMES")) if e("QWEN3TTS_MAX_FRAMES") else None,
            light_load_streams=int(e("QWEN3TTS_LIGHT_LOAD_STREAMS", cls.light_load_streams)),
        )


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


class SpeechService:
    def __init__(self, engine: TTSEngine, settings: ServerSettings, served_model_names: list[str],
                 codec_workers: list | None = None, llm_priority: bool = False):
        self.engine = engine
        self.config = engine.config
        self.settings = settings
        self.served_model_names = served_model_names
        self.codec_workers = list(codec_workers or [])
        self.llm_priority = llm_priority  # vLLM runs with --scheduling-policy priority
        # Limits apply per key; with no keys configured everyone is one anonymous tenant,
        # bounded only by the global queue bound.
        self.tenants = TenantRegistry.from_sources(
            keys=list(settings.api_keys), keys_file=settings.api_keys_file,
            default_limits=TenantLimits(settings.default_max_concurrency, settings.default_requests_per_minute),
        )
        self.admission = AdmissionController(max_queued_requests=settings.max_queued_requests)
        self.voices = VoiceStore(settings.voices_dir)
        self.metrics = speech_metrics()
        self.ready = False
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
            logger.info("speech service ready")
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

    def healthy(self) -> bool:
        return all(worker.is_alive() for worker in self.codec_workers)

    def shutdown(self) -> None:
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
        """Async context manager holding the tenant's admission; HTTP errors on refusal."""
        service = self

        class _Admit:
            async def __aenter__(self):
                try:
                    self._cm = service.admission.admit(tenant)
                    ticket = await self._cm.__aenter__()
                except RateLimited as e:
                    service.metrics.requests.labels(tenant.name, endpoint, "429").inc()
                    raise APIError(429, f"rate limit of {tenant.requests_per_minute} requests/minute exceeded",
                                   type="rate_limit_error", code="rate_limit_exceeded",
                                   headers={"Retry-After": str(int(np.ceil(e.retry_after_s)))}) from e
                except TooManyConcurrent as e:
                    service.metrics.requests.labels(tenant.name, endpoint, "429").inc()
                    raise APIError(429, f"at most {tenant.max_concurrency} concurrent requests per key",
                                   type="rate_limit_error", code="concurrency_limit_exceeded",
                                   headers={"Retry-After": str(int(np.ceil(e.retry_after_s)))}) from e
                except Overloaded as e:
                    service.metrics.requests.labels(tenant.name, endpoint, "503").inc()
                    raise APIError(503, "the server is at capacity; retry shortly", type="server_error",
                                   code="overloaded", headers={"Retry-After": "1"}) from e
                service.metrics.in_flight.inc()
                return ticket

            async def __aexit__(self, *exc):
                service.metrics.in_flight.dec()
                return await self._cm.__aexit__(*exc)

        return _Admit()

    # ------------------------------------------------------------------ requests

    async def prepare(self, body: SpeechBody, tenant: Tenant, priority: int = 0, split: bool = True,
                      received: float | None = None) -> SpeechJob:
        """Validate everything before any audio is sent, so errors are HTTP errors. `split`: cut
        long input at sentence boundaries (off for text that arrives already as a sentence).
        `received`: when the request arrived (`time.perf_counter()`; default now), which the
        job's latencies (time to first audio, wall time) count from."""
        received = time.perf_counter() if received is None else received
        kind = self.config.tts_model_type
        if body.task_type is not None and body.task_type != TASK_TYPES[kind]:
            raise bad_request(f"task_type {body.task_type} does not match the served checkpoint "
                              f"({TASK_TYPES[kind]})", param="task_type", code="unsupported_task_type")
        if body.model and body.model not in self.served_model_names and body.model not in OPENAI_TTS_MODELS:
            raise APIError(404, f"model {body.model!r} is not served here; available: {', '.join(self.served_model_names)}",
                           param="model", code="model_not_found")
        text = body.input.strip()
        if not text:
            raise bad_request("input is empty", param="input", code="empty_input")
        if len(text) > self.settings.max_input_chars:
            raise bad_request(f"input has {len(text)} characters; at most {self.settings.max_input_chars}",
                              param="input", code="input_too_long")
        if body.min_new_tokens and body.max_new_tokens and body.min_new_tokens > body.max_new_tokens:
            raise bad_request("min_new_tokens is larger than max_new_tokens", param="min_new_tokens")
        speaker, voice = await self._resolve_voice(body, tenant)
        params = SynthesisParams(
            temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, subtalker_temperature=body.subtalker_temperature,
            subtalker_top_k=body.subtalker_top_k, subtalker_top_p=body.subtalker_top_p,
            max_frames=_capped(body.max_new_tokens, self.settings.max_frames_per_segment), seed=body.seed,
            min_frames=body.min_new_tokens or 2,
        )
        instructions = body.instructions if kind != "base" else None
        if kind == "base" and body.instructions:
            raise bad_request("Base checkpoints do not take instructions", param="instructions")
        segments = [
            SynthesisRequest(text=piece, speaker=speaker, language=body.language or "auto", instructions=instructions,
                             voice=voice, non_streaming_mode=body.non_streaming_mode, params=params,
                             first_chunk_frames=body.initial_codec_chunk_frames or None)
            for piece in (split_sentences(text, max_chars=self.settings.max_segment_chars) if split else [text])
        ]
        if not segments:
            raise bad_request("input has nothing to speak", param="input", code="empty_input")
        input_tokens = 0
        for seg in segments:
            try:
                prompt, _ = self.engine.prepare(seg)
            except PromptError as e:
                raise bad_request(str(e), param=_param_of(str(e))) from e
            input_tokens += len(prompt["prompt_token_ids"])
        self.metrics.prepare.observe(time.perf_counter() - received)
        return SpeechJob(segments, body.speed, input_tokens, tenant, priority if self.llm_priority else 0,
                         started=received)

    async def _resolve_voice(self, body: SpeechBody, tenant: Tenant) -> tuple[str | None, VoiceProfile | None]:
        kind = self.config.tts_model_type
        name = (body.voice_name or "").strip()
        if kind == "custom_voice":
            if body.ref_audio:
                raise bad_request("this checkpoint (CustomVoice) cannot clone voices; ref_audio needs a Base checkpoint",
                                  param="ref_audio", code="unsupported_task_type")
            speakers = self.config.talker.spk_id
            key = name.lower()
            if not key:
                key = next((s for s in OPENAI_VOICES.values() if s in speakers), self.config.speakers[0])
            if key in speakers:
                return key, None
            if key in OPENAI_VOICES and OPENAI_VOICES[key] in speakers:
                return OPENAI_VOICES[key], None
            raise bad_request(f"unknown voice {name!r}; available: {', '.join(self.available_voice_names(tenant))}",
                              param="voice", code="voice_not_found")
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
                          f"{' (no saved voice ' + repr(name) + ')' if name else ''}", param="voice",
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
            raise bad_request(str(e), param="ref_audio", code="invalid_ref_audio") from e
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
            raise bad_request(f"ref_audio scheme {parsed.scheme!r} is not accepted", param="ref_audio",
                              code="invalid_ref_audio")
        payload = ref.split(",", 1)[1] if ref.startswith("data:") else ref
        if len(payload) > limit * 4 // 3 + 8:
            raise APIError(413, f"ref_audio exceeds {limit} bytes", param="ref_audio", code="ref_audio_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request("ref_audio is not valid base64 (or a data: URI)", param="ref_audio",
                              code="invalid_ref_audio") from e

    # ------------------------------------------------------------------ synthesis

    async def pcm_stream(self, job: SpeechJob, request_id: str) -> AsyncIterator[np.ndarray]:
        """float32 PCM of all segments in order, speed applied, as it is generated."""
        stretcher = TimeStretcher(job.speed, SAMPLE_RATE) if job.speed != 1.0 else None
        first = True
        first_audio_s = None
        outcome = "cancelled"
        audio_samples = 0
        self.metrics.waiting_first_audio.inc()
        try:
            for i, seg in enumerate(job.segments):
                async for chunk in self.engine.stream(seg, f"{request_id}-{i}", priority=job.priority):
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
        except Exception:
            outcome = "error"
            raise
        finally:
            if first:
                self.metrics.waiting_first_audio.dec()
            # one structured (JSON) line per request, for log pipelines
            logger.info(json.dumps({
                "event": "speech", "request_id": request_id, "tenant": job.tenant.name, "outcome": outcome,
                "segments": len(job.segments), "input_tokens": job.input_tokens, "frames": job.frames,
                "audio_s": round(audio_samples / SAMPLE_RATE, 3), "speed": job.speed,
                "ttfa_ms": None if first_audio_s is None else round(1000 * first_audio_s, 1),
                "wall_s": round(time.perf_counter() - job.started, 3),
            }))


def _capped(requested: int | None, cap: int | None) -> int | None:
    if cap is None:
        return requested
    return cap if requested is None else min(requested, cap)


def _param_of(message: str) -> str | None:
    for param in ("language", "voice", "instructions", "input", "temperature", "top_p", "top_k", "repetition_penalty"):
        if param in message:
            return param
    if "speaker" in message:
        return "voice"
    return None


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
        raise bad_request(f"ref_audio URL host {host!r} does not resolve", param="ref_audio",
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


__all__ = ["ServerSettings", "SpeechJob", "SpeechService", "fetch_public_url", "VoiceExists", "VoiceQuotaExceeded"]
