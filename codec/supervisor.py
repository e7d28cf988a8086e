"""Keeps the codec workers of a `CodecPool` alive.

A worker that dies (its process exits, or its socket disconnects) is noticed at once and taken
out of the pool: its in-flight streams fail with `CodecUnavailableError` and new streams go to
the other workers. It is then started again like the first (same checkpoint, device, stream
slots and CUDA-graph chunk lengths) and put back once provisioned. Restarts wait longer each
time, and after `RestartPolicy.max_restarts` within `window_s` the worker stays down (and the
server's health check says so), so a worker that cannot start does not spin.

Either kind of worker handle works (`worker.CodecWorkerHandle`, `worker.LaunchedCodecWorker`):
both start their replacement with `replacement()`, which returns at once; `provision_worker`
then waits until it serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .client import CodecClient, CodecError
from .pool import CodecPool
from .worker import DEFAULT_STARTUP_TIMEOUT_S, CodecWorkerStartError, describe_exit

logger = logging.getLogger("vllm.qwen3tts.codec")  # under vLLM's logger when it runs in the server


class WorkerHandle(Protocol):
    address: str

    @property
    def pid(self) -> int | None: ...
    @property
    def device(self) -> str: ...
    @property
    def exitcode(self) -> int | None: ...
    def is_alive(self) -> bool: ...
    def stop(self) -> None: ...
    def replacement(self) -> "WorkerHandle": ...


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5  # before the first restart; doubles with each restart in the window
    max_delay_s: float = 30.0
    max_restarts: int = 5  # within window_s; one more failure and the worker stays down
    window_s: float = 600.0
    expected_start_s: float = 30.0  # a worker's start until one has been timed here (a GPU worker's compile)
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    poll_s: float = 0.2  # how often a worker's process is checked (a disconnect is noticed at once)

    def delay_s(self, recent_restarts: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** recent_restarts)


async def provision_worker(worker: WorkerHandle, client: CodecClient, max_streams: int,
                           graph_chunk_lengths: tuple[int, ...], timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
    """Wait until `worker` (reached through `client`) serves with `max_streams` stream slots and
    CUDA graphs for `graph_chunk_lengths` (a worker started provisioned with the same values only
    confirms them). Raises `CodecWorkerStartError` at once, not at the timeout, if it exits first."""
    call = asyncio.ensure_future(client.provision(max_streams, graph_chunk_lengths, timeout_s=timeout_s))
    try:
        while not call.done():
            await asyncio.wait({call}, timeout=0.5)
            if not call.done() and not worker.is_alive():
                raise CodecWorkerStartError(f"the codec worker (pid {worker.pid}) exited before it was ready; "
                                            "its log is above")
        try:
            call.result()
        except CodecError as e:
            raise CodecWorkerStartError(f"the codec worker (pid {worker.pid}) failed to start: {e}") from None
    finally:
        call.cancel()


class CodecSupervisor:
    """Watches the workers behind `pool` (`workers[i]` serves `pool.clients[i]`) and restarts the
    ones that die. `run()` watches until cancelled; `problems()` says what is out of service."""

    def __init__(self, pool: CodecPool, workers: list[WorkerHandle], max_streams: int,
                 graph_chunk_lengths: tuple[int, ...], policy: RestartPolicy | None = None):
        if len(workers) != len(pool.clients):
            raise ValueError(f"{len(workers)} workers for {len(pool.clients)} pool clients")
        self.pool = pool
        self.workers = workers  # replaced in place as workers are restarted
        self.max_streams = max_streams
        self.graph_chunk_lengths = tuple(graph_chunk_lengths)
        self.policy = policy or RestartPolicy()
        self.restarts = 0  # successful restarts, all workers
        self._recent: list[deque[float]] = [deque() for _ in workers]  # restart times within the window
        self._doing: dict[int, str] = {}  # worker index -> what the supervisor is doing about it
        self._back_at: dict[int, float] = {}  # worker index -> when (monotonic) it should serve again
        self.last_start_s: float | None = None  # how long the last restart took, once one has
        self._stopping = False

    async def run(self) -> None:
        await asyncio.gather(*(self._keep_alive(i) for i in range(len(self.workers))))

    def problems(self) -> list[str]:
        """One line per worker out of service (why, and what is being done), or whose process has
        exited a moment ago and is about to be taken out; empty while all serve."""
        lines = []
        for i, worker in enumerate(self.workers):
            why = self.pool.down.get(i)
            if why is None and not worker.is_alive():
                why = describe_exit(worker.exitcode)
            if why is not None:
                doing = self._doing.get(i)
                lines.append(f"codec worker {i} ({worker.device}) {why}" + (f"; {doing}" if doing else ""))
        return lines

    def expected_back_s(self) -> float | None:
        """Seconds until the first worker being restarted should serve again (its restart's delay
        plus the last restart's duration), or None while none is being restarted: what a 503's
        Retry-After tells clients."""
        if not self._back_at:
            return None
        return max(0.0, min(self._back_at.values()) - time.monotonic())

    def stop_restarting(self) -> None:
        """Restart nothing more (the server is shutting down: its workers may be stopping too)."""
        self._stopping = True

    def stop(self) -> None:
        """Restart nothing more; close the pool's connections and stop every worker (blocks)."""
        self._stopping = True
        self.pool.close()
        for worker in self.workers:
            worker.stop()

    # ------------------------------------------------------------------------------------------

    async def _keep_alive(self, i: int) -> None:
        while not self._stopping:
            why = await self._wait_until_gone(i)
            if self._stopping:
                return
            worker = self.workers[i]
            self.pool.mark_down(i, why)
            self._doing[i] = "restarting"
            logger.error("codec worker %d (pid %s, %s) %s; its streams failed; restarting it",
                         i, worker.pid, worker.device, why)
            await asyncio.to_thread(worker.stop)  # reaped, socket directory removed
            if not await self._restart(i):
                return

    async def _wait_until_gone(self, i: int) -> str:
        worker, client = self.workers[i], self.pool.clients[i]
        disconnected = asyncio.ensure_future(client.wait_disconnected())
        try:
            while worker.is_alive() and not disconnected.done():
                await asyncio.wait({disconnected}, timeout=self.policy.poll_s)
        finally:
            disconnected.cancel()
        deadline = time.monotonic() + 1.0  # a process that is exiting closes its sockets first
        while worker.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return "dropped its connection" if worker.is_alive() else describe_exit(worker.exitcode)

    async def _restart(self, i: int) -> bool:
        """Start worker `i` again until it serves (True), or give up under the policy (False)."""
        policy, recent = self.policy, self._recent[i]
        while not self._stopping:
            now = time.monotonic()
            while recent and now - recent[0] > policy.window_s:
                recent.popleft()
            if len(recent) >= policy.max_restarts:
                self._doing[i] = (f"not restarted again: {len(recent)} restarts within {policy.window_s:g} s; "
                                  "restart the server")
                logger.critical("codec worker %d (%s) failed %d times within %g s; it stays down",
                                i, self.workers[i].device, len(recent), policy.window_s)
                self._back_at.pop(i, None)
                return False
            delay = policy.delay_s(len(recent))
            self._back_at[i] = time.monotonic() + delay + (self.last_start_s or policy.expected_start_s)
            await asyncio.sleep(delay)
            recent.append(time.monotonic())
            self._doing[i] = f"restarting (attempt {len(recent)} within {policy.window_s:g} s)"
            started = time.monotonic()
            try:
                worker, client = await self._start_like(self.workers[i])
            except CodecWorkerStartError as e:
                self._doing[i] = f"restart failed: {e}"
                logger.error("codec worker %d (%s) could not be restarted: %s", i, self.workers[i].device, e)
                continue
            if self._stopping:
                client.close()
                await asyncio.to_thread(worker.stop)
                return False
            self.workers[i] = worker
            self.pool.replace(i, client)
            self._doing.pop(i, None)
            self._back_at.pop(i, None)
            self.last_start_s = time.monotonic() - started
            self.restarts += 1
            logger.warning("codec worker %d (%s) restarted as pid %s in %.1f s", i, worker.device, worker.pid,
                           time.monotonic() - started)
            return True
        return False

    async def _start_like(self, old: WorkerHandle) -> tuple[WorkerHandle, CodecClient]:
        try:
            # on the event loop's thread: a launched worker exits with the thread that started it
            worker = old.replacement()
        except OSError as e:
            raise CodecWorkerStartError(f"could not start a process: {e}") from e
        client = CodecClient()
        client.connect(worker.address)
        try:
            await provision_worker(worker, client, self.max_streams, self.graph_chunk_lengths,
                                   self.policy.startup_timeout_s)
        except BaseException:
            client.close()
            await asyncio.to_thread(worker.stop)
            raise
        return worker, client
