"""The codec worker: a separate process that turns talker frames into 24 kHz audio.

It owns the codec decoder (and, for Base checkpoints, the codec encoder and speaker
encoder used for voice cloning) so that the API server process never needs CUDA. Clients
(`CodecClient`, one or more per API-server process) talk to it over a zmq ROUTER socket (wire
format: `protocol.py`).

Streams live in a fixed pool of `max_streams` decoder-state rows (`pooled_decoder.py`). The
loop drains every pending message, then decodes all pending chunks in as few batched calls as
pays (chunks of different lengths share a call, padded), so requests that stream
concurrently share decoder calls without any waiting window: whatever arrives while a batch
runs forms the next batch. Each stream's audio equals a single whole-utterance decode of its
codes (`CodecDecoder.decode_chunk`).

Start it from Python with `start_codec_worker(config)`, or as a shared instance with
`python -m vllm_qwen3tts.codec.worker --model DIR --address ipc:///path/codec.sock`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import msgspec
import numpy as np
import torch
import zmq

from vllm_qwen3tts.base.settings import launched_codec_workers, process_settings
from vllm_qwen3tts.base.config import load_tts_config

from .decoder import MIN_COMPILED_SIZE, CodecDecoder
from .pooled_decoder import DecodeGrid, PooledDecoder
from .protocol import (
    ENCODER,
    REQUEST_DECODER,
    UNKNOWN_SEQ,
    ArrayHeader,
    CloseStream,
    CodecWorkerStats,
    DecodeChunk,
    DecodedAudio,
    Done,
    EncodedReference,
    EncodeReference,
    Failure,
    GetStats,
    OpenStream,
    ProtocolError,
    Provision,
    Reply,
    StatsReply,
    array_frame,
    expect_frames,
    read_array,
)
from .voice_clone import VoiceCloneEncoders, create_voice_clone_profile, load_voice_clone_encoders

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The loop wakes at least this often to notice a stop signal, a dead parent or idle streams.
POLL_INTERVAL_MS = 200
STOP_GRACE_S = 5.0
# Loading real weights onto a busy GPU and compiling the decoder with a cold Inductor cache and a
# busy CPU can take minutes.
DEFAULT_STARTUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class CodecWorkerConfig:
    model_dir: str  # a Qwen3-TTS checkpoint directory
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str | None = None  # float32 | bfloat16 | float16; None: bfloat16 on CUDA, float32 on CPU
    max_streams: int = 64  # decoder-state slots, i.e. streams open at once
    max_batch: int = 64  # streams per decoder call
    max_chunk_frames: int = 500  # largest chunk one decode request may carry (40 s of audio)
    # Load the codec encoder and speaker encoder for `encode_reference`. None: exactly when
    # the checkpoint is a Base model (the only kind that ships a speaker encoder).
    voice_clone: bool | None = None
    num_threads: int | None = None  # torch CPU threads in the worker; None: torch's default
    # A stream that receives nothing for this long is freed. It reclaims the slots of a client
    # that died without closing its streams (e.g. a crashed API-server process sharing this
    # worker); no live request pauses that long between chunks. None: never.
    stream_idle_timeout_s: float | None = 600.0
    # torch.compile the decoder on CUDA, as one graph dynamic in batch and chunk length, so the
    # elementwise work around its convolutions fuses. Compiled at start (minutes the first time,
    # much less once Inductor has it on disk). Default: the settings' QWEN3TTS_COMPILE.
    compile: bool = field(default_factory=lambda: process_settings().tuning.compile)
    # On CUDA, run the decoder's convs on channels-last tensors (`CodecDecoder.use_channels_last`),
    # the layout cuDNN's tensor-core kernels take. Default: the settings' QWEN3TTS_CODEC_CHANNELS_LAST.
    channels_last: bool = field(default_factory=lambda: process_settings().tuning.codec_channels_last)
    # On CUDA, capture the decoder as CUDA graphs for batches of up to `max_batch` chunks of these
    # lengths (the server's chunk schedule: 2, 4, 8, 16, then 25 frames); a batch is padded to
    # the grid (chunks to the call's length, rows to the next batch size). Longer chunks decode
    # eagerly. Default: the settings' QWEN3TTS_CODEC_GRAPHS.
    cuda_graphs: bool = field(default_factory=lambda: process_settings().tuning.codec_graphs)
    graph_chunk_lengths: tuple[int, ...] = (2, 4, 8, 16, 25)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("max_streams", "max_batch", "max_chunk_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


class CodecWorkerStartError(RuntimeError):
    """The worker process exited or stalled before it could serve."""


def compile_decoder(decoder: CodecDecoder) -> bool:
    """torch.compile the decoder as a whole (`CodecDecoder.compile_whole`), compiled now by one
    small ragged decode; the decoder stays eager if compilation fails. Returns whether it is
    compiled."""
    t0 = time.perf_counter()
    try:
        decoder.compile_whole()
        size = MIN_COMPILED_SIZE
        with torch.inference_mode():
            device = decoder.pre_conv.weight.device
            codes = torch.zeros(size, size, decoder.config.num_quantizers, dtype=torch.long, device=device)
            decoder.decode_chunk(codes, decoder.new_stream_state(size),
                                 torch.full((size,), size, dtype=torch.long, device=device))
    except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly
        logger.warning("torch.compile of the codec decoder failed, decoding eagerly: %s", e)
        decoder.compile_whole(enabled=False)
        return False
    logger.info("codec decoder compiled in %.1f s", time.perf_counter() - t0)
    return True


# ----------------------------------------------------------------------------------------------
# serving state


class RequestError(Exception):
    """A request the worker refuses; its message goes back to that request's client only."""


StreamKey = tuple[bytes, str]  # (client socket identity, stream id): clients cannot collide


@dataclass
class StreamSlots:
    """Which row of the decoder-state pool each open stream owns."""

    capacity: int
    slot_of: dict[StreamKey, int] = field(default_factory=dict)
    last_used: dict[StreamKey, float] = field(default_factory=dict)
    free: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.free = list(range(self.capacity - 1, -1, -1))  # pop() hands out slot 0 first

    def acquire(self, key: StreamKey) -> int:
        if key in self.slot_of:
            raise RequestError(f"stream {key[1]!r} is already open")
        if not self.free:
            raise RequestError(f"all {self.capacity} codec stream slots are in use; try again later")
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.touch(key)
        return slot

    def lookup(self, key: StreamKey) -> int:
        slot = self.slot_of.get(key)
        if slot is None:
            raise RequestError(f"stream {key[1]!r} is not open (never opened, finished or closed)")
        self.touch(key)
        return slot

    def touch(self, key: StreamKey) -> None:
        self.last_used[key] = time.monotonic()

    def release(self, key: StreamKey) -> bool:
        slot = self.slot_of.pop(key, None)
        self.last_used.pop(key, None)
        if slot is None:
            return False
        self.free.append(slot)
        return True

    def idle_since(self, deadline: float) -> list[StreamKey]:
        return [key for key, t in self.last_used.items() if t < deadline]

    @property
    def active(self) -> int:
        return len(self.slot_of)


@dataclass
class DecodeJob:
    client: bytes
    seq: int
    key: StreamKey
    slot: int
    codes: np.ndarray  # [n, num_quantizers] int64
    final: bool

    @property
    def frames(self) -> int:
        return self.codes.shape[0]


@dataclass
class IncomingMessage:
    client: bytes  # ROUTER identity of the sending socket
    header: bytes | memoryview
    frames: list[memoryview]


SendReply = Callable[[bytes, Reply, list], None]  # (client, header, data frames)


class CodecWorker:
    """Models, the stream pool and request handling; knows nothing about sockets."""

    def __init__(self, config: CodecWorkerConfig, provision: bool = True):
        """Load the models and compile the decoder. With `provision`, also allocate the stream
        pool and capture the CUDA graphs for `config.max_streams` streams; without it, that
        waits for `provision()` (a `Provision` request), so the large allocations can be made
        after the engine beside this worker has sized its KV cache."""
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda" means the current (first visible) GPU
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        dtype = config.torch_dtype
        self.decoder = CodecDecoder.from_checkpoint(config.model_dir, device=self.device, dtype=dtype)
        # Why `encode_reference` is refused, when it is.
        self.no_voice_clone_reason: str | None = None
        if config.voice_clone is None:
            tts = load_tts_config(config.model_dir)
            if not tts.supports_voice_clone:
                self.no_voice_clone_reason = (
                    f"voice cloning needs a Base checkpoint; this codec worker serves a {tts.tts_model_type} "
                    f"checkpoint ({config.model_dir})"
                )
        elif not config.voice_clone:
            self.no_voice_clone_reason = "voice cloning is disabled in this codec worker (voice_clone=False)"
        self.encoders: VoiceCloneEncoders | None = (
            None
            if self.no_voice_clone_reason
            else load_voice_clone_encoders(config.model_dir, device=self.device, dtype=dtype)
        )
        self.num_quantizers = self.decoder.config.num_quantizers
        self.codebook_size = self.decoder.config.codebook_size
        on_gpu = self.device.type == "cuda"
        if config.channels_last and on_gpu:
            self.decoder.use_channels_last()
        self.compiled = config.compile and on_gpu and compile_decoder(self.decoder)
        self.decoder_pool: PooledDecoder | None = None  # set by provision()
        self.slots = StreamSlots(0)
        # Rows of streams opened since their last use, reset by their first decoder call: an open
        # then does no GPU work, and it arrives while the talker prefills that request (its
        # kernels and ours take turns on the GPU without MPS).
        self.unreset_slots: set[int] = set()
        self.batches_run = 0
        self.chunks_decoded = 0
        self.frames_decoded = 0
        self.largest_batch = 0
        self.decode_seconds = 0.0
        if provision:
            self.provision(config.max_streams, config.graph_chunk_lengths)

    def provision(self, max_streams: int, graph_chunk_lengths: tuple[int, ...]) -> None:
        """Allocate `max_streams` decoder-state rows and capture the CUDA graphs for chunks of
        `graph_chunk_lengths` frames. Once only: the same values again are a no-op."""
        graph_chunk_lengths = tuple(graph_chunk_lengths)
        if self.decoder_pool is not None:
            if (max_streams, graph_chunk_lengths) != (self.config.max_streams, self.config.graph_chunk_lengths):
                raise RequestError(
                    f"this codec worker is already provisioned for {self.config.max_streams} streams and chunks "
                    f"of {list(self.config.graph_chunk_lengths)} frames; it cannot be provisioned again differently"
                )
            return
        if max_streams < 1:
            raise RequestError(f"max_streams must be at least 1, got {max_streams}")
        if not all(0 < n <= self.config.max_chunk_frames for n in graph_chunk_lengths):
            raise RequestError(
                f"graph chunk lengths must lie in [1, {self.config.max_chunk_frames}], got {list(graph_chunk_lengths)}"
            )
        t0 = time.perf_counter()
        config = self.config
        graphs = config.cuda_graphs and self.device.type == "cuda"
        # a compiled decoder serves batches of MIN_COMPILED_SIZE and up: smaller ones are padded
        min_batch = MIN_COMPILED_SIZE if self.compiled else 1
        grid = DecodeGrid.up_to(config.max_batch, graph_chunk_lengths, min_batch) if graphs else None
        pool = PooledDecoder(self.decoder, max_streams, grid)
        if graphs:
            try:
                with torch.inference_mode():
                    pool.capture_graphs()
            except Exception as e:  # noqa: BLE001 - a capture failure costs speed, not service
                logger.warning("CUDA graph capture of the codec decoder failed, decoding eagerly: %s", e)
                pool = PooledDecoder(self.decoder, max_streams, None)
        self.decoder_pool = pool
        self.slots = StreamSlots(max_streams)
        self.config = dataclasses.replace(config, max_streams=max_streams, graph_chunk_lengths=graph_chunk_lengths)
        logger.info("codec worker provisioned for %d streams in %.1f s", max_streams, time.perf_counter() - t0)

    @property
    def provisioned(self) -> bool:
        return self.decoder_pool is not None

    # -- one round of the loop -------------------------------------------------------------------

    @torch.inference_mode()
    def process(self, messages: list[IncomingMessage], send: SendReply) -> None:
        """Handle every drained message, in order per stream, decoding chunks in batches.

        Decodes are collected and run together; a message touching a stream that already
        has a chunk waiting (a second chunk, a close) first runs what is waiting, so each
        stream still sees its requests in the order they were sent. Reference encodings
        wait until the round's chunks are decoded: they are slow and latency-insensitive.
        """
        pending: dict[StreamKey, DecodeJob] = {}
        encodings: list[tuple[IncomingMessage, EncodeReference]] = []
        for message in messages:
            try:
                request = REQUEST_DECODER.decode(message.header)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                send(message.client, Failure(UNKNOWN_SEQ, f"malformed codec request: {e}"), [])
                continue
            if isinstance(request, EncodeReference):
                encodings.append((message, request))
                continue
            if isinstance(request, GetStats):
                self._decode_pending(pending, send)
                send(message.client, StatsReply(request.seq, self.stats()), [])
                continue
            if isinstance(request, Provision):
                self._decode_pending(pending, send)
                self._provision(message, request, send)
                continue
            key = (message.client, request.stream_id)
            if key in pending:
                self._decode_pending(pending, send)
            failure = None
            try:
                if not self.provisioned:
                    raise RequestError("the codec worker has no stream pool yet: no client has provisioned it")
                if isinstance(request, DecodeChunk):
                    pending[key] = self._decode_job(message, request, key)
                elif isinstance(request, OpenStream):
                    self._open(key, request, message.frames)
                    send(message.client, Done(request.seq), [])
                elif isinstance(request, CloseStream):
                    self.slots.release(key)  # closing twice, or after the final chunk, is fine
                    send(message.client, Done(request.seq), [])
            except (RequestError, ProtocolError) as e:
                failure = str(e)
            except Exception as e:  # a bug or a device error: fail this request, keep serving
                logger.exception("codec request %s on stream %r failed", type(request).__name__, request.stream_id)
                failure = f"codec worker error: {type(e).__name__}: {e}"
            if failure is not None:
                send(message.client, Failure(request.seq, failure), [])
                if isinstance(request, DecodeChunk) and request.final:
                    self.slots.release(key)  # the client is done with the stream either way
        self._decode_pending(pending, send)
        for message, request in encodings:
            self._encode_reference(message, request, send)

    def _provision(self, message: IncomingMessage, request: Provision, send: SendReply) -> None:
        try:
            self.provision(request.max_streams, request.graph_chunk_lengths)
        except RequestError as e:
            send(message.client, Failure(request.seq, str(e)), [])
            return
        except Exception as e:  # e.g. out of GPU memory: the client reports it and stops the worker
            logger.exception("provisioning the codec worker failed")
            send(message.client, Failure(request.seq, f"codec worker error: {type(e).__name__}: {e}"), [])
            return
        send(message.client, Done(request.seq), [])

    def reclaim_idle_streams(self) -> None:
        timeout = self.config.stream_idle_timeout_s
        if timeout is None:
            return
        for key in self.slots.idle_since(time.monotonic() - timeout):
            logger.warning("freeing codec stream %r: nothing received for %.0f s", key[1], timeout)
            self.slots.release(key)

    def stats(self) -> CodecWorkerStats:
        return CodecWorkerStats(
            max_streams=self.slots.capacity,
            active_streams=self.slots.active,
            free_slots=len(self.slots.free),
            batches_run=self.batches_run,
            chunks_decoded=self.chunks_decoded,
            largest_batch=self.largest_batch,
            frames_decoded=self.frames_decoded,
            decode_seconds=self.decode_seconds,
        )

    # -- streams ----------------------------------------------------------------------------------

    def _read_codes(self, header: ArrayHeader, frame: memoryview, what: str, min_frames: int) -> np.ndarray:
        codes = read_array(header, frame)
        if codes.dtype.kind != "i":
            raise RequestError(f"{what} must be integers, got {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != self.num_quantizers or codes.shape[0] < min_frames:
            raise RequestError(f"{what} must have shape [frames, {self.num_quantizers}], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise RequestError(
                f"{what} must lie in [0, {self.codebook_size}), got values in [{codes.min()}, {codes.max()}]"
            )
        return codes.astype(np.int64, copy=False)

    def _open(self, key: StreamKey, request: OpenStream, frames: list[memoryview]) -> None:
        expect_frames(frames, 0 if request.context is None else 1, "open")
        context = None
        if request.context is not None:
            context = self._read_codes(request.context, frames[0], "context codes", min_frames=0)
        slot = self.slots.acquire(key)
        try:
            if context is None or context.shape[0] == 0:
                self.unreset_slots.add(slot)
                return
            self.unreset_slots.discard(slot)
            self.decoder_pool.reset(slot)
            # Decoding the reference codes leaves the state where a decode of
            # concat(reference, generated) would be after the reference (ICL mode).
            # Streaming is exact, so the pieces can be of any size; their audio is dropped.
            self.decoder_pool.prime(slot, context, self.config.max_chunk_frames)
        except BaseException:
            self.slots.release(key)
            raise

    def _decode_job(self, message: IncomingMessage, request: DecodeChunk, key: StreamKey) -> DecodeJob:
        expect_frames(message.frames, 1, "decode")
        codes = self._read_codes(request.codes, message.frames[0], "codes", min_frames=1)
        if codes.shape[0] > self.config.max_chunk_frames:
            raise RequestError(
                f"a chunk of {codes.shape[0]} frames exceeds max_chunk_frames={self.config.max_chunk_frames}; "
                "send it in smaller chunks"
            )
        slot = self.slots.lookup(key)
        return DecodeJob(message.client, request.seq, key, slot, codes, request.final)

    def _decode_pending(self, pending: dict[StreamKey, DecodeJob], send: SendReply) -> None:
        jobs = list(pending.values())
        pending.clear()
        if not jobs:
            return
        for length, members in self.decoder_pool.plan_calls([job.frames for job in jobs], self.config.max_batch):
            self._decode_batch([jobs[i] for i in members], length, send)

    def _decode_batch(self, jobs: list[DecodeJob], length: int, send: SendReply) -> None:
        try:
            audio = self._run_decoder(jobs, length)
        except Exception:
            if len(jobs) == 1:
                job = jobs[0]
                logger.exception("codec decode failed on stream %r", job.key[1])
                send(job.client, Failure(job.seq, "codec decode failed (see the worker log)"), [])
                self._finish(job)
                return
            # The batch's state rows were not written back; decoding each stream alone
            # confines the failure to the stream that causes it.
            logger.warning("batched decode of %d streams failed; retrying them one by one", len(jobs))
            for job in jobs:
                self._decode_batch([job], length, send)
            return
        for job, samples in zip(jobs, audio):
            header, buffer = array_frame(samples)
            send(job.client, DecodedAudio(job.seq, header), [buffer])
            self._finish(job)

    def _run_decoder(self, jobs: list[DecodeJob], length: int) -> list[np.ndarray]:
        """Decode one chunk of each job as a batch; the advanced states go back to the pool."""
        t0 = time.perf_counter()
        fresh = [job.slot for job in jobs if job.slot in self.unreset_slots]
        if fresh:
            self.decoder_pool.reset(fresh)
            self.unreset_slots.difference_update(fresh)
        samples = self.decoder_pool.decode([job.slot for job in jobs], [job.codes for job in jobs], length)
        self.decode_seconds += time.perf_counter() - t0
        self.batches_run += 1
        self.chunks_decoded += len(jobs)
        self.frames_decoded += sum(job.frames for job in jobs)
        self.largest_batch = max(self.largest_batch, len(jobs))
        return samples

    def _finish(self, job: DecodeJob) -> None:
        # A final chunk frees the slot even when it failed: the client is done with the stream.
        if job.final:
            self.slots.release(job.key)

    # -- voice cloning ----------------------------------------------------------------------------

    def _encode_reference(self, message: IncomingMessage, request: EncodeReference, send: SendReply) -> None:
        try:
            if self.encoders is None:
                raise RequestError(self.no_voice_clone_reason)
            expect_frames(message.frames, 1, "encode_reference")
            profile = create_voice_clone_profile(
                self.encoders, bytes(message.frames[0]), request.ref_text, x_vector_only=request.x_vector_only
            )
        except (RequestError, ValueError) as e:  # includes unreadable audio and ProtocolError
            send(message.client, Failure(request.seq, str(e)), [])
            return
        except Exception as e:
            logger.exception("reference encoding failed")
            send(message.client, Failure(request.seq, f"codec worker error: {type(e).__name__}: {e}"), [])
            return
        xvector_header, xvector = array_frame(profile.xvector.float().cpu().numpy())
        frames = [xvector]
        codes_header = None
        if profile.ref_codes is not None:
            codes_header, codes = array_frame(profile.ref_codes.to(torch.int64).cpu().numpy())
            frames.append(codes)
        send(message.client, EncodedReference(request.seq, xvector_header, codes_header), frames)


# ----------------------------------------------------------------------------------------------
# the process


def serve(
    config: CodecWorkerConfig,
    address: str,
    *,
    parent_pid: int | None = None,
    on_ready: Callable[[], None] | None = None,
    provision: bool = True,
) -> None:
    """Load the models, bind `address` and serve until SIGTERM / SIGINT (or until the process
    `parent_pid` is gone, so a spawned worker never outlives a crashed parent). Without
    `provision`, streams can be opened only after a client's `Provision` request."""
    from vllm_qwen3tts.tools.stack_sampler import start_from_env

    # diagnostics, off unless QWEN3TTS_STACK_SAMPLES_DIR is set; here, so that workers spawned by
    # the server and workers launched before vLLM by `vllm-qwen3tts serve` both sample
    start_from_env("codec-worker")
    worker = CodecWorker(config, provision=provision)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    socket_file = _ipc_socket_file(address)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)

    def send(client: bytes, reply: Reply, frames: list) -> None:
        socket.send_multipart([client, ENCODER.encode(reply), *frames], copy=False)

    logger.info(
        "codec worker serving %s on %s (%s, %s, %s, voice cloning %s)",
        config.model_dir, address, worker.device, config.torch_dtype,
        f"{worker.slots.capacity} stream slots" if worker.provisioned else "waiting to be provisioned",
        "on" if worker.encoders is not None else "off",
    )
    if on_ready is not None:
        on_ready()
    try:
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("codec worker's parent process %d is gone; exiting", parent_pid)
                break
            if poller.poll(POLL_INTERVAL_MS):
                messages = list(_drain(socket))
                try:
                    worker.process(messages, send)
                except Exception:  # requests are failed one by one inside; this is a last resort
                    logger.exception("codec worker round failed; some requests may go unanswered")
            worker.reclaim_idle_streams()
    finally:
        socket.close()
        context.term()
        if socket_file is not None:
            _remove_socket_file(*socket_file)
        logger.info("codec worker on %s stopped", address)


def _ipc_socket_file(address: str) -> tuple[str, int] | None:
    """(path, inode) of the file an `ipc://` bind created; libzmq leaves it behind on close."""
    path = address.removeprefix("ipc://")
    if path == address or path.startswith("@"):  # not ipc, or a Linux abstract socket (no file)
        return None
    return path, os.stat(path).st_ino


def _remove_socket_file(path: str, inode: int) -> None:
    # Only our own file: a worker started meanwhile on the same address owns a new one.
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _drain(socket: zmq.Socket) -> Iterator[IncomingMessage]:
    while True:
        try:
            parts = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if len(parts) < 2:  # a ROUTER always prepends the identity; a bare identity carries nothing
            continue
        yield IncomingMessage(client=parts[0].bytes, header=parts[1].buffer, frames=[p.buffer for p in parts[2:]])


def _spawned_worker_main(
    config: CodecWorkerConfig, address: str, parent_pid: int, ready: Connection | None, socket_dir: str | None
) -> None:
    _configure_logging()
    on_ready = None if ready is None else (lambda: ready.send(("ready", None)))
    try:
        serve(config, address, parent_pid=parent_pid, on_ready=on_ready)
    except BaseException as e:
        # Before `ready` this is what start_codec_worker reports; after it nobody reads it.
        if ready is not None:
            try:
                ready.send(("failed", f"{type(e).__name__}: {e}"))
            except OSError:
                pass
        raise
    finally:
        if socket_dir is not None:  # the parent removes it too, unless it died first
            shutil.rmtree(socket_dir, ignore_errors=True)


def _configure_logging() -> None:
    if not logging.getLogger().handlers:  # a spawned process starts without any configuration
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s codec-worker[%(process)d] %(message)s"
        )


# ----------------------------------------------------------------------------------------------
# handles of worker processes
#
# Two kinds, one interface (pid, address, device, is_alive, exitcode, stop, replacement):
# `CodecWorkerHandle` for a worker spawned by this Python process, `LaunchedCodecWorker` for one
# `vllm-qwen3tts serve` started before it exec'd vLLM (only its pid survives the exec).


def _stop_process(pid: int, is_alive: Callable[[], bool], socket_dir: str | None) -> None:
    """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; returns once the process is gone (`is_alive`
    must reap it) and its socket directory is removed. Idempotent."""
    try:
        if is_alive():
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_alive():
                logger.warning("codec worker %d ignored SIGTERM for %.0f s; killing it", pid, STOP_GRACE_S)
                os.kill(pid, signal.SIGKILL)
                while is_alive():
                    time.sleep(0.05)
    except ProcessLookupError:
        pass
    if socket_dir is not None:
        shutil.rmtree(socket_dir, ignore_errors=True)


def describe_exit(exitcode: int | None) -> str:
    """How a worker ended, from an exit code in `multiprocessing`'s convention (-N: signal N)."""
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class CodecWorkerHandle:
    """A worker process spawned by `start_codec_worker` or `spawn_codec_worker`. Stopped by
    `stop()`, or at the latest when the handle is garbage-collected or the interpreter exits."""

    def __init__(self, process: BaseProcess, address: str, socket_dir: str | None, config: CodecWorkerConfig):
        self.process = process
        self.address = address
        self.socket_dir = socket_dir
        self.config = config
        self._finalizer = weakref.finalize(self, _stop_process, process.pid, process.is_alive, socket_dir)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def device(self) -> str:
        return self.config.device

    def is_alive(self) -> bool:
        return self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        """None while it runs; negative: the signal that ended it."""
        return self.process.exitcode

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; removes the socket directory. Idempotent."""
        self._finalizer()

    def replacement(self) -> "CodecWorkerHandle":
        """A new worker like this one (same configuration, hence the same provisioning), started
        now; returns at once. It serves once loaded: `provision` it to wait for that."""
        return spawn_codec_worker(self.config, address=None if self.socket_dir is not None else self.address)


def _spawn(config: CodecWorkerConfig, address: str | None, ready: Connection | None) -> CodecWorkerHandle:
    socket_dir = None
    if address is None:
        socket_dir = tempfile.mkdtemp(prefix="qwen3tts-codec-")
        address = f"ipc://{socket_dir}/codec.sock"
    # spawn, not fork: the parent may hold CUDA state or threads, and vLLM requires it.
    process = multiprocessing.get_context("spawn").Process(
        target=_spawned_worker_main,
        args=(config, address, os.getpid(), ready, socket_dir),
        name="qwen3tts-codec-worker",
        # multiprocessing terminates daemonic children at interpreter exit (and would instead
        # wait forever for a non-daemonic one that our finalizer has not yet stopped).
        daemon=True,
    )
    try:
        process.start()
    except BaseException:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    return CodecWorkerHandle(process, address, socket_dir, config)


def spawn_codec_worker(config: CodecWorkerConfig, *, address: str | None = None) -> CodecWorkerHandle:
    """Spawn a worker process and return at once, while it loads; requests sent meanwhile wait
    for it (`CodecClient.provision` is the way to wait until it serves)."""
    return _spawn(config, address, None)


def start_codec_worker(
    config: CodecWorkerConfig,
    *,
    address: str | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> CodecWorkerHandle:
    """Spawn a worker process and return once it serves. `address` defaults to an `ipc://`
    socket in a fresh temporary directory (removed by `stop()`).

    Raises `CodecWorkerStartError` with the child's error (e.g. a bad checkpoint path) if it
    fails to load, or if it is not ready within `startup_timeout_s`.
    """
    ready_recv, ready_send = multiprocessing.get_context("spawn").Pipe(duplex=False)
    try:
        handle = _spawn(config, address, ready_send)
    except BaseException:
        ready_recv.close()
        raise
    finally:
        ready_send.close()  # so that the child's death shows up as EOF on our end
    try:
        _wait_until_ready(handle.process, ready_recv, startup_timeout_s)
    except BaseException:
        handle.stop()
        raise
    finally:
        ready_recv.close()
    return handle


def _wait_until_ready(process: BaseProcess, ready: Connection, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CodecWorkerStartError(f"the codec worker was not ready within {timeout_s:g} s")
        if not ready.poll(min(remaining, 0.5)):
            continue
        try:
            status, detail = ready.recv()
        except EOFError:
            process.join(1.0)
            raise CodecWorkerStartError(
                f"the codec worker exited (exit code {process.exitcode}) before it was ready"
            ) from None
        if status == "ready":
            return
        raise CodecWorkerStartError(f"the codec worker failed to start: {detail}")


# ----------------------------------------------------------------------------------------------
# workers started before the server process execs vLLM


@dataclass
class LaunchedCodecWorker:
    """A worker started by `launch_codec_worker` as a child of this process. `vllm-qwen3tts
    serve` launches workers and then execs vLLM's API server, which keeps the process id, so
    the server is still their parent: it can provision them, watch them, stop, reap and replace
    them. Same interface as `CodecWorkerHandle`."""

    pid: int
    address: str
    device: str
    socket_dir: str | None = None
    model_dir: str | None = None  # the checkpoint, for `replacement`
    _exitcode: int | None = field(default=None, init=False, repr=False, compare=False)

    def is_alive(self) -> bool:
        if self._exitcode is not None:  # reaped: the pid may belong to another process by now
            return False
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)  # also reaps it once it has exited
        except ChildProcessError:  # reaped already, or not our child
            try:
                os.kill(self.pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        if done == 0:
            return True
        self._exitcode = os.waitstatus_to_exitcode(status)
        return False

    @property
    def exitcode(self) -> int | None:
        """None while it runs (or when it was not our child); negative: the signal that ended it."""
        return self._exitcode

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; removes the socket directory. Idempotent."""
        _stop_process(self.pid, self.is_alive, self.socket_dir)

    def replacement(self) -> "LaunchedCodecWorker":
        """A new worker like this one (same checkpoint and device), launched now; returns at once.
        It waits to be provisioned like the first. Call it from a thread that lives as long as the
        server (the event loop's): the worker exits when the thread that started it ends."""
        if not self.model_dir:
            raise CodecWorkerStartError(f"codec worker {self.pid} was launched without its checkpoint directory; "
                                        "it cannot be started again")
        return launch_codec_worker(self.model_dir, self.device)


def launch_codec_worker(model_dir: str, device: str, env: dict[str, str] | None = None) -> LaunchedCodecWorker:
    """Start a worker as a subprocess and return at once. It loads the models and compiles the
    decoder while whatever else starts; it allocates its stream pool only when provisioned
    (`CodecClient.provision`). It exits when this process (strictly: the thread that called
    this) dies."""
    socket_dir = tempfile.mkdtemp(prefix="qwen3tts-codec-")
    address = f"ipc://{socket_dir}/codec.sock"
    argv = [sys.executable, "-m", "vllm_qwen3tts.codec.worker", "--model", model_dir, "--address", address,
            "--device", device, "--wait-for-provision", "--parent-pid", str(os.getpid()), "--socket-dir", socket_dir]
    try:
        process = subprocess.Popen(argv, env=env)
    except BaseException:
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    return LaunchedCodecWorker(process.pid, address, device, socket_dir, model_dir)


def launched_workers_to_env(workers: list[LaunchedCodecWorker]) -> str:
    return json.dumps([{f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.init} for w in workers])


def launched_workers_from_env(environ: dict[str, str] | None = None) -> list[LaunchedCodecWorker]:
    """The workers `vllm-qwen3tts serve` launched for this server (none under plain `vllm serve`)."""
    text = launched_codec_workers(environ)
    return [LaunchedCodecWorker(**item) for item in json.loads(text)] if text else []


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_qwen3tts.codec.worker",
        description="Run one Qwen3-TTS codec worker that several API-server processes can share.",
    )
    parser.add_argument("--model", required=True, help="Qwen3-TTS checkpoint directory")
    parser.add_argument("--address", required=True, help="zmq address to bind, e.g. ipc:///run/qwen3tts/codec.sock")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-streams", type=int, default=CodecWorkerConfig.max_streams)
    parser.add_argument("--max-batch", type=int, default=CodecWorkerConfig.max_batch)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--wait-for-provision", action="store_true",
                        help="load and compile now, but allocate the stream pool only when a client sends "
                             "Provision (which then sets the number of streams)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (our parent) is gone")
    parser.add_argument("--socket-dir", default=None, help="a directory of ours to remove at exit")
    args = parser.parse_args(argv)
    _configure_logging()
    # Until serve() installs its graceful handler: unwind, so that the socket directory goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)
    config = CodecWorkerConfig(
        model_dir=args.model, device=args.device, dtype=args.dtype,
        max_streams=args.max_streams, max_batch=args.max_batch, num_threads=args.threads,
    )
    try:
        serve(config, args.address, parent_pid=args.parent_pid, provision=not args.wait_for_provision)
    finally:
        if args.socket_dir is not None:
            shutil.rmtree(args.socket_dir, ignore_errors=True)


def _exit_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies, even while it is still loading or compiling
    (the serving loop also polls for it, but only once it runs)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the serving loop's poll remains
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        raise SystemExit(f"codec worker: parent process {parent_pid} is gone")


if __name__ == "__main__":
    main()
