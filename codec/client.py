"""asyncio client of the codec worker (`worker.py`), for the API-server process.

One DEALER socket carries any number of concurrent requests: each gets a sequence number
and a future, and a reader task resolves futures as replies arrive, in whatever order the
worker's batching produces them. A socket monitor notices when the worker goes away, so
callers get a `CodecError` instead of waiting forever.

All methods must be called from one event loop (the one that first sends a request).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .protocol import (
    ENCODER,
    REPLY_DECODER,
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
    Request,
    StatsReply,
    array_frame,
    expect_frames,
    read_array,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


class CodecError(RuntimeError):
    """The codec worker refused or failed a request, or could not be reached; the message says which."""


class CodecUnavailableError(CodecError):
    """The worker cannot serve at all (not reachable, went away, or no worker is up), as opposed
    to refusing one request: the request may succeed later, on this worker once it is back or
    on another."""


class CodecTimeoutError(CodecUnavailableError, TimeoutError):
    """No reply within the request's timeout."""


@dataclass(frozen=True)
class ReferenceEncoding:
    """Voice-clone conditioning computed by the worker (see `voice_clone.VoiceCloneProfile`)."""

    xvector: np.ndarray  # float32 [talker hidden]
    ref_codes: np.ndarray | None  # int64 [T_ref, 16]; None in x-vector-only mode


class CodecClient:
    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.address: str | None = None
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing: set[asyncio.Task] = set()  # closes sent after abandoned opens
        self._pending: dict[int, asyncio.Future] = {}
        self._seq = itertools.count()
        self._connected = False
        self._lost_connection = False  # connected once, then disconnected, not yet reconnected
        self._disconnected: asyncio.Event | None = None  # set with _lost_connection; made in the loop

    def connect(self, address: str) -> None:
        if self._socket is not None:
            raise RuntimeError(f"this CodecClient is already connected to {self.address}")
        self.address = address
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a worker that is not there: a send waits for a live connection
        # (bounded by the request timeout) instead of piling up for a restart.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._socket.connect(address)

    def close(self, reason: str = "the codec client was closed") -> None:
        """Fail whatever is pending (`CodecUnavailableError(reason)`) and release the socket. Open
        streams are not closed on the worker; close them first (or let the worker's idle timeout
        reclaim them)."""
        for task in [*self._tasks, *self._closing]:
            if not task.done():
                task.cancel()
        self._tasks.clear()
        self._fail_pending(CodecUnavailableError(reason))
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._context.term()
            self._socket = self._monitor = self._context = None

    # -- operations -------------------------------------------------------------------------------

    async def open_stream(
        self, stream_id: str, context_codes: np.ndarray | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Reserve a decoder slot for `stream_id`. `context_codes` [T, 16] (voice-clone
        reference codes) prime it: the stream's audio is then the continuation of theirs.

        An open that times out or is cancelled is followed by a close of `stream_id` (so do not
        open that id again): the worker may still carry the open out, and would otherwise hold
        the slot for nobody until its idle reclaim."""
        if context_codes is None:
            request, frames = OpenStream(self._next_seq(), stream_id), []
        else:
            header, buffer = array_frame(_as_codes(context_codes))
            request, frames = OpenStream(self._next_seq(), stream_id, header), [buffer]
        try:
            await self._call(request, frames, Done, timeout_s)
        except (CodecTimeoutError, asyncio.CancelledError):
            self._close_after_abandoned_open(stream_id)
            raise

    async def decode(
        self, stream_id: str, codes: np.ndarray, final: bool = False, *, timeout_s: float | None = None
    ) -> np.ndarray:
        """Next frames [n, 16] of an open stream -> float32 PCM [n * 1920] at 24 kHz (a
        read-only array). `final` closes the stream after this chunk."""
        header, buffer = array_frame(_as_codes(codes))
        reply, frames = await self._call(
            DecodeChunk(self._next_seq(), stream_id, header, final), [buffer], DecodedAudio, timeout_s
        )
        (samples,) = _reply_arrays([reply.samples], frames)
        return samples

    async def close_stream(self, stream_id: str, *, timeout_s: float | None = None) -> None:
        """Free the stream's slot (an abort); closing a stream that is not open is not an error."""
        await self._call(CloseStream(self._next_seq(), stream_id), [], Done, timeout_s)

    async def encode_reference(
        self,
        audio: bytes,
        ref_text: str | None = None,
        x_vector_only: bool = False,
        *,
        timeout_s: float | None = None,
    ) -> ReferenceEncoding:
        """Encoded reference audio (wav, flac, mp3, ...) -> x-vector and, unless
        `x_vector_only`, the reference codes. ICL mode needs `ref_text`."""
        reply, frames = await self._call(
            EncodeReference(self._next_seq(), ref_text, x_vector_only), [bytes(audio)], EncodedReference, timeout_s
        )
        if reply.ref_codes is None:
            (xvector,) = _reply_arrays([reply.xvector], frames)
            return ReferenceEncoding(xvector=xvector, ref_codes=None)
        xvector, ref_codes = _reply_arrays([reply.xvector, reply.ref_codes], frames)
        return ReferenceEncoding(xvector=xvector, ref_codes=ref_codes)

    async def provision(
        self, max_streams: int, graph_chunk_lengths: tuple[int, ...], *, timeout_s: float | None = None
    ) -> None:
        """Have a worker started with `--wait-for-provision` allocate its stream pool (and capture
        its CUDA graphs); returns once streams can be opened. The worker answers only after it
        has loaded and compiled, so `timeout_s` must cover its whole start."""
        await self._call(Provision(self._next_seq(), max_streams, tuple(graph_chunk_lengths)), [], Done, timeout_s)

    async def stats(self, *, timeout_s: float | None = None) -> CodecWorkerStats:
        reply, _ = await self._call(GetStats(self._next_seq()), [], StatsReply, timeout_s)
        return reply.stats

    # -- plumbing ---------------------------------------------------------------------------------

    def _close_after_abandoned_open(self, stream_id: str) -> None:
        """Send a close behind an open whose reply we stopped waiting for. The worker handles one
        client's requests in order, so the close lands after the open if the open arrives at
        all; closing a stream that is not open is no error."""
        if self._socket is None or self._lost_connection:
            return  # the worker is gone, and its streams with it

        async def close() -> None:
            try:
                await self.close_stream(stream_id)
            except CodecError as e:
                logger.warning("closing codec stream %s after its open was abandoned: %s", stream_id, e)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _next_seq(self) -> int:
        return next(self._seq)

    async def _call(
        self, request: Request, frames: list, expected: type, timeout_s: float | None
    ) -> tuple[Reply, list[bytes]]:
        if self._socket is None:
            raise CodecUnavailableError("the codec client is not connected")
        if self._lost_connection:
            raise CodecUnavailableError(f"the codec worker at {self.address} is not reachable (connection lost)")
        self._start_tasks()
        future = asyncio.get_running_loop().create_future()
        self._pending[request.seq] = future
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._socket.send_multipart([ENCODER.encode(request), *frames], copy=False)
                reply, reply_frames = await future
        except TimeoutError:
            raise CodecTimeoutError(
                f"no reply from the codec worker at {self.address} within {timeout:g} s "
                f"({type(request).__name__})"
            ) from None
        finally:
            self._pending.pop(request.seq, None)
        if isinstance(reply, Failure):
            raise CodecError(reply.message)
        if not isinstance(reply, expected):
            raise CodecError(f"the codec worker answered {type(request).__name__} with {type(reply).__name__}")
        return reply, reply_frames

    async def wait_disconnected(self) -> None:
        """Return once the connection to the worker is lost (it exited or closed its socket)."""
        if self._socket is None:
            return
        self._start_tasks()
        await self._disconnected.wait()

    @property
    def connection_lost(self) -> bool:
        """Connected once, then disconnected (and not reconnected since)."""
        return self._lost_connection

    def _start_tasks(self) -> None:
        if not self._tasks:
            self._disconnected = asyncio.Event()
            if self._lost_connection:
                self._disconnected.set()
            self._tasks = [asyncio.create_task(self._read_replies()), asyncio.create_task(self._watch_connection())]

    async def _read_replies(self) -> None:
        try:
            await self._dispatch_replies()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket broke under us: nothing pending can complete now
            logger.exception("codec client reader stopped")
            self._fail_pending(CodecUnavailableError(f"codec client reader stopped: {type(e).__name__}: {e}"))

    async def _dispatch_replies(self) -> None:
        while True:
            parts = await self._socket.recv_multipart()
            try:
                reply = REPLY_DECODER.decode(parts[0])
            except Exception as e:
                logger.error("undecodable reply from the codec worker: %s", e)
                continue
            if reply.seq == UNKNOWN_SEQ:
                logger.error("the codec worker could not read one of our requests: %s", reply)
                continue
            future = self._pending.get(reply.seq)
            if future is not None and not future.done():  # otherwise it timed out: drop the reply
                future.set_result((reply, parts[1:]))

    async def _watch_connection(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected, self._lost_connection = True, False
                self._disconnected.clear()
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected, self._lost_connection = False, True
                self._disconnected.set()
                self._fail_pending(
                    CodecUnavailableError(f"lost the connection to the codec worker at {self.address} (did it exit?)")
                )

    def _fail_pending(self, error: CodecError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


def _reply_arrays(headers: list[ArrayHeader], frames: list[bytes]) -> list[np.ndarray]:
    try:
        expect_frames(frames, len(headers), "reply")
        return [read_array(header, frame) for header, frame in zip(headers, frames)]
    except ProtocolError as e:
        raise CodecError(f"malformed reply from the codec worker: {e}") from None


def _as_codes(codes) -> np.ndarray:
    """Codes as int64 (the worker checks shape and range; here only the type must be right)."""
    array = np.asarray(codes)
    if array.dtype.kind not in "iu":
        raise TypeError(f"codec codes must be integers, got {array.dtype}")
    return array.astype(np.int64, copy=False)

