"""One or several codec workers behind the one client interface the engine uses.

With more than one GPU (vLLM data parallelism, or a stage split that puts audio decoding on a
GPU of its own) the server runs one codec worker per device. `CodecPool` opens each new stream
on the worker with the fewest open streams and sends all of that stream's chunks there (a
stream's decoder state lives in one worker); reference encodings go round-robin. Codes travel
through the API process anyway, so a stream need not decode on the GPU that generated it.
"""

from __future__ import annotations

import itertools

import numpy as np

from .client import CodecClient, CodecError, ReferenceEncoding
from .protocol import CodecWorkerStats, sum_stats


class CodecPool:
    def __init__(self, clients: list[CodecClient]):
        if not clients:
            raise ValueError("a codec pool needs at least one client")
        self.clients = clients
        self._worker_of: dict[str, int] = {}  # open stream -> index of its worker
        self._open = [0] * len(clients)
        self._next_encoder = itertools.cycle(range(len(clients)))

    async def open_stream(self, stream_id: str, context_codes: np.ndarray | None = None, **kw) -> None:
        if stream_id in self._worker_of:
            raise CodecError(f"stream {stream_id!r} is already open")
        i = min(range(len(self.clients)), key=self._open.__getitem__)
        self._worker_of[stream_id] = i
        self._open[i] += 1
        try:
            await self.clients[i].open_stream(stream_id, context_codes, **kw)
        except BaseException:
            self._forget(stream_id)
            raise

    async def decode(self, stream_id: str, codes: np.ndarray, final: bool = False, **kw) -> np.ndarray:
        try:
            return await self._client(stream_id).decode(stream_id, codes, final, **kw)
        finally:
            if final:  # the worker frees a stream after its final chunk, decoded or not
                self._forget(stream_id)

    async def close_stream(self, stream_id: str, **kw) -> None:
        i = self._worker_of.get(stream_id)
        if i is None:
            return  # never opened here, or already finished: closing is idempotent
        self._forget(stream_id)
        await self.clients[i].close_stream(stream_id, **kw)

    async def encode_reference(self, audio: bytes, ref_text: str | None = None, x_vector_only: bool = False,
                               **kw) -> ReferenceEncoding:
        return await self.clients[next(self._next_encoder)].encode_reference(audio, ref_text, x_vector_only, **kw)

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

    def _client(self, stream_id: str) -> CodecClient:
        i = self._worker_of.get(stream_id)
        if i is None:
            raise CodecError(f"stream {stream_id!r} is not open (never opened, finished or closed)")
        return self.clients[i]

    def _forget(self, stream_id: str) -> None:
        i = self._worker_of.pop(stream_id, None)
        if i is not None:
            self._open[i] -= 1
