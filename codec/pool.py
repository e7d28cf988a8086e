"""One or several codec workers behind the one client interface the engine uses.

With more than one GPU (vLLM data parallelism, or a stage split that puts audio decoding on a
GPU of its own) the server runs one codec worker per device. `CodecPool` opens each new stream
on the worker with the fewest open streams and sends all of that stream's chunks there (a
stream's decoder state lives in one worker); reference encodings go round-robin. Codes travel
through the API process anyway, so a stream need not decode on the GPU that generated it.

A worker that dies is taken out (`mark_down`: its streams fail at once, new ones go to the
others) until its replacement is put in (`replace`); `codec/supervisor.py` does both.
"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np

from .client import CodecClient, CodecError, CodecUnavailableError, ReferenceEncoding
from .protocol import CodecWorkerStats, sum_stats


class CodecBusyError(CodecError):
    """Every stream slot of the workers in service is taken: a new stream must wait or be refused."""


def default_codec_streams(max_num_seqs: int) -> int:
    """Stream slots per codec worker unless configured: room for every running request of the
    engine and as many more finishing their audio or waiting in vLLM's queue."""
    return max(64, 2 * max_num_seqs)


class CodecPool:
    def __init__(self, clients: list[CodecClient], max_streams: int | None = None):
        """`max_streams`: the stream slots each worker was provisioned with (None: unknown, never full)."""
        if not clients:
            raise ValueError("a codec pool needs at least one client")
        self.clients = clients
        self.max_streams = max_streams
        # open stream -> (index of its worker, that worker's generation when the stream opened)
        self._worker_of: dict[str, tuple[int, int]] = {}
        self._open = [0] * len(clients)
        self._generation = [0] * len(clients)  # +1 each time a worker is taken out
        self._down: dict[int, str] = {}  # worker index -> why it is out of service
        self._next_encoder = itertools.cycle(range(len(clients)))

    # -- workers coming and going ------------------------------------------------------------------

    def mark_down(self, i: int, reason: str) -> None:
        """Take worker `i` out of service: its pending calls and every stream open on it fail now
        (with `CodecUnavailableError`), and new streams go to the other workers."""
        self._down[i] = reason
        self._generation[i] += 1
        self._open[i] = 0
        self.clients[i].close(f"codec worker {i} {reason}")

    def replace(self, i: int, client: CodecClient) -> None:
        """Put worker `i` back in service, as the worker `client` is connected to."""
        old, self.clients[i] = self.clients[i], client
        if old is not client:
            old.close()
        self._down.pop(i, None)

    @property
    def down(self) -> dict[int, str]:
        """Workers out of service: index -> why."""
        return dict(self._down)

    def live_workers(self) -> list[int]:
        return [i for i in range(len(self.clients)) if i not in self._down]

    def _unavailable(self) -> CodecUnavailableError:
        reasons = "; ".join(f"worker {i}: {why}" for i, why in sorted(self._down.items()))
        return CodecUnavailableError(f"no codec worker is available ({reasons})")

    # -- the client interface ----------------------------------------------------------------------

    async def open_stream(self, stream_id: str, context_codes: np.ndarray | None = None, **kw) -> None:
        if stream_id in self._worker_of:
            raise CodecError(f"stream {stream_id!r} is already open")
        live = self.live_workers()
        if not live:
            raise self._unavailable()
        i = min(live, key=self._open.__getitem__)
        if self.max_streams is not None and self._open[i] >= self.max_streams:
            raise CodecBusyError(f"all {self.max_streams * len(live)} codec stream slots are in use")
        self._worker_of[stream_id] = (i, self._generation[i])
        self._open[i] += 1
        try:
            await self.clients[i].open_stream(stream_id, context_codes, **kw)
        except BaseException:
            self._forget(stream_id)
            raise

    async def decode(self, stream_id: str, codes: np.ndarray, final: bool = False, **kw) -> np.ndarray:
        try:
            audio = await self._client(stream_id).decode(stream_id, codes, final, **kw)
        except asyncio.CancelledError:
            raise  # the final chunk may not have been sent: the stream stays open here, for close_stream
        except BaseException:
            if final:  # the worker frees a stream after its final chunk, decoded or not
                self._forget(stream_id)
            raise
        if final:
            self._forget(stream_id)
        return audio

    async def close_stream(self, stream_id: str, **kw) -> None:
        placed = self._worker_of.get(stream_id)
        if placed is None:
            return  # never opened here, or already finished: closing is idempotent
        self._forget(stream_id)
        i, generation = placed
        if generation != self._generation[i]:
            return  # its worker died, and the stream with it
        await self.clients[i].close_stream(stream_id, **kw)

    async def encode_reference(self, audio: bytes, ref_text: str | None = None, x_vector_only: bool = False,
                               **kw) -> ReferenceEncoding:
        live = self.live_workers()
        if not live:
            raise self._unavailable()
        i = next(self._next_encoder)
        while i not in live:
            i = next(self._next_encoder)
        return await self.clients[i].encode_reference(audio, ref_text, x_vector_only, **kw)

    async def worker_stats(self, **kw) -> list[CodecWorkerStats]:
        return [await c.stats(**kw) for c in self.clients]

    async def stats(self, **kw) -> CodecWorkerStats:
        """The workers' counters summed."""
        return sum_stats(await self.worker_stats(**kw))

    def close(self) -> None:
        for client in self.clients:
            client.close()

    @property
    def open_streams(self) -> list[int]:
        """Open streams per worker, as this pool routed them."""
        return list(self._open)

    def capacity(self) -> int | None:
        """Stream slots of the workers in service (None: unknown)."""
        return None if self.max_streams is None else self.max_streams * len(self.live_workers())

    def free_slots(self) -> int | None:
        """Stream slots a new stream could take now on the workers in service (None: capacity
        unknown). As the worker counts them, or sooner taken and later freed: a slot is taken from
        the moment the open is sent until the final chunk's reply, or until the close is sent
        (the worker handles it before any open sent after it)."""
        if self.max_streams is None:
            return None
        return sum(max(0, self.max_streams - self._open[i]) for i in self.live_workers())

    def _client(self, stream_id: str) -> CodecClient:
        placed = self._worker_of.get(stream_id)
        if placed is None:
            raise CodecError(f"stream {stream_id!r} is not open (never opened, finished or closed)")
        i, generation = placed
        if generation != self._generation[i]:
            why = self._down.get(i, "it was replaced")
            raise CodecUnavailableError(f"the codec worker decoding stream {stream_id!r} is gone ({why})")
        return self.clients[i]

    def _forget(self, stream_id: str) -> None:
        placed = self._worker_of.pop(stream_id, None)
        if placed is not None and placed[1] == self._generation[placed[0]]:
            self._open[placed[0]] -= 1
