"""Codec worker process and its asyncio client, over real sockets: streamed audio equals a
whole-utterance decode whatever the chunking and batching, ICL priming, stream lifecycle,
refusals that leave everything else running, reference encoding, and process lifecycle."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
import zmq

from vllm_qwen3tts.codec.client import CodecClient, CodecError, CodecTimeoutError, CodecUnavailableError
from vllm_qwen3tts.codec.decoder import CodecDecoder
from vllm_qwen3tts.codec.pool import CodecPool
from vllm_qwen3tts.codec.supervisor import CodecSupervisor, RestartPolicy, provision_worker
from vllm_qwen3tts.codec.voice_clone import create_voice_clone_profile, load_voice_clone_encoders
from vllm_qwen3tts.codec.worker import (
    CodecWorkerConfig,
    CodecWorkerHandle,
    CodecWorkerStartError,
    LaunchedCodecWorker,
    launch_codec_worker,
    start_codec_worker,
)

SAMPLES_PER_FRAME = 1920
FP32_TOL = 1e-4  # spec §8.3, codec waveform, fp32
MAX_STREAMS = 4
IDLE_TIMEOUT_S = 1.0  # of the disposable worker


def random_codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, size=(frames, 16), dtype=np.int64)


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def spawned_processes() -> set[int]:
    """Pids of this process's multiprocessing-spawned children (not its resource tracker), in its
    session (not those of the servers that conftest's `background` starts meanwhile, each in a
    session of its own)."""
    pids = set()
    session = os.getsid(0)
    for child in psutil.Process().children(recursive=True):
        try:
            if any("spawn_main" in arg for arg in child.cmdline()) and os.getsid(child.pid) == session:
                pids.add(child.pid)
        except (psutil.Error, ProcessLookupError):  # exited meanwhile
            pass
    return pids


def tone_wav(seconds: float, sr: int = 24000) -> bytes:
    """A modulated tone with noise, as WAV bytes: enough structure for varied codes."""
    t = np.arange(int(seconds * sr)) / sr
    audio = 0.4 * np.sin(2 * np.pi * 180 * t + 2 * np.sin(2 * np.pi * 3 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * t))
    audio += 0.05 * np.random.default_rng(0).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, audio.astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def with_client(address: str | list[str], scenario: Callable[..., Awaitable], clients: int = 1):
    """Run `scenario(*clients)` in a fresh event loop with connected `CodecClient`s: `clients` of
    them to `address`, or one to each address of a list."""
    addresses = [address] * clients if isinstance(address, str) else address

    async def main():
        connected = []
        for each in addresses:
            client = CodecClient(timeout_s=30)
            client.connect(each)
            connected.append(client)
        try:
            return await scenario(*connected)
        finally:
            for client in connected:
                client.close()

    return asyncio.run(main())


async def stream_through(client: CodecClient, stream_id: str, codes: np.ndarray, schedule: list[int]) -> np.ndarray:
    """Decode `codes` chunk by chunk on an open stream; the last chunk is final."""
    assert sum(schedule) == codes.shape[0]
    pieces, start = [], 0
    for i, n in enumerate(schedule):
        audio = await client.decode(stream_id, codes[start : start + n], final=i == len(schedule) - 1)
        assert audio.dtype == np.float32 and audio.shape == (n * SAMPLES_PER_FRAME,)
        pieces.append(audio)
        start += n
    return np.concatenate(pieces)


@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread():
    """2-core machine with a worker process beside us: one torch thread each. It also makes
    the in-process reference computations take the same path as the worker's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("0.6b-base")


@pytest.fixture(scope="module")
def worker(base_checkpoint) -> CodecWorkerHandle:
    handle = start_codec_worker(
        CodecWorkerConfig(str(base_checkpoint), max_streams=MAX_STREAMS, max_batch=8, num_threads=1),
        startup_timeout_s=60,
    )
    yield handle
    handle.stop()


@pytest.fixture
def disposable_worker(tiny_checkpoint) -> CodecWorkerHandle:
    """A worker of a non-Base checkpoint that a test may stop or kill; idle streams expire fast."""
    handle = start_codec_worker(
        CodecWorkerConfig(
            str(tiny_checkpoint("0.6b-custom_voice")), num_threads=1, stream_idle_timeout_s=IDLE_TIMEOUT_S
        ),
        startup_timeout_s=60,
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def decoder(base_checkpoint) -> CodecDecoder:
    return CodecDecoder.from_checkpoint(base_checkpoint)


def whole_decode(decoder: CodecDecoder, codes: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return decoder(torch.from_numpy(codes)[None])[0].numpy()


# ----------------------------------------------------------------------------------------------
# streaming


def test_concurrent_streams_equal_whole_decodes_and_share_decoder_calls(worker, decoder):
    """Four streams on two clients (whose stream ids collide on purpose), each with its own
    low-latency start and chunk sizes, interleaved by the event loop."""
    schedules = {
        (0, "x"): [1, 4, 8, 8, 8],
        (0, "y"): [2, 4, 8, 8],
        (1, "x"): [1, 4, 8, 16],
        (1, "y"): [2, 8, 8, 8, 8],
    }
    codes = {key: random_codes(sum(s), seed=i) for i, (key, s) in enumerate(schedules.items())}

    async def scenario(*clients):
        before = await clients[0].stats()

        async def one(key):
            client, stream_id = clients[key[0]], key[1]
            await client.open_stream(stream_id)
            return await stream_through(client, stream_id, codes[key], schedules[key])

        audio = await asyncio.gather(*(one(key) for key in schedules))
        return before, dict(zip(schedules, audio)), await clients[0].stats()

    before, streamed, after = with_client(worker.address, scenario, clients=2)
    for key in schedules:
        assert max_err(streamed[key], whole_decode(decoder, codes[key])) <= FP32_TOL, key
    chunks = sum(len(s) for s in schedules.values())
    assert after.chunks_decoded - before.chunks_decoded == chunks
    assert after.batches_run - before.batches_run < chunks  # some calls decoded several streams
    assert after.largest_batch > 1
    assert after.active_streams == before.active_streams  # final chunks freed their slots


def test_stream_primed_with_context_continues_the_reference(worker, decoder):
    """ICL: the stream's audio is the tail of decoding concat(reference codes, generated codes)."""
    reference, generated = random_codes(30, seed=10), random_codes(20, seed=11)

    async def scenario(client):
        await client.open_stream("icl", context_codes=reference)
        return await stream_through(client, "icl", generated, [2, 8, 10])

    streamed = with_client(worker.address, scenario)
    expected = whole_decode(decoder, np.concatenate([reference, generated]))[30 * SAMPLES_PER_FRAME :]
    assert max_err(streamed, expected) <= FP32_TOL
    # the context is not a no-op: without it the same codes sound different
    assert max_err(streamed, whole_decode(decoder, generated)) > 10 * FP32_TOL


# ----------------------------------------------------------------------------------------------
# stream lifecycle


def test_close_mid_stream_frees_the_slot_and_leaves_other_streams_intact(worker, decoder):
    kept, aborted = random_codes(12, seed=20), random_codes(12, seed=21)

    async def scenario(client):
        idle = await client.stats()
        await client.open_stream("kept")
        await client.open_stream("aborted")
        first = await client.decode("kept", kept[:3])
        await client.decode("aborted", aborted[:3])
        assert (await client.stats()).active_streams == idle.active_streams + 2

        await client.close_stream("aborted")
        after_close = await client.stats()
        assert after_close.active_streams == idle.active_streams + 1
        assert after_close.free_slots == idle.free_slots - 1
        with pytest.raises(CodecError, match="'aborted' is not open"):
            await client.decode("aborted", aborted[3:6])
        await client.close_stream("aborted")  # closing again is harmless

        rest = await client.decode("kept", kept[3:], final=True)
        assert (await client.stats()).active_streams == idle.active_streams
        with pytest.raises(CodecError, match="'kept' is not open"):  # final closed it
            await client.decode("kept", kept[:1])
        return np.concatenate([first, rest])

    streamed = with_client(worker.address, scenario)
    assert max_err(streamed, whole_decode(decoder, kept)) <= FP32_TOL


def test_a_reused_slot_starts_fresh_even_in_a_shared_decoder_call(worker, decoder):
    """An open only marks its row; the row is reset by the stream's first decoder call, which may
    also carry other streams' chunks."""
    dirty, fresh, other = random_codes(9, seed=30), random_codes(10, seed=31), random_codes(10, seed=32)

    async def scenario(client):
        await client.open_stream("other")
        other_head = await client.decode("other", other[:4])
        await client.open_stream("dirty")
        await client.decode("dirty", dirty)  # leaves its row mid-stream
        await client.close_stream("dirty")
        await client.open_stream("fresh")  # free rows are a stack: the same row comes back
        fresh_audio, other_tail = await asyncio.gather(client.decode("fresh", fresh, final=True),
                                                       client.decode("other", other[4:], final=True))
        return fresh_audio, np.concatenate([other_head, other_tail])

    fresh_audio, other_audio = with_client(worker.address, scenario)
    assert max_err(fresh_audio, whole_decode(decoder, fresh)) <= FP32_TOL
    assert max_err(other_audio, whole_decode(decoder, other)) <= FP32_TOL


def test_full_pool_refuses_new_streams_until_a_slot_is_freed(worker):
    async def scenario(client):
        free = (await client.stats()).free_slots
        assert free > 0
        for i in range(free):
            await client.open_stream(f"s{i}")
        with pytest.raises(CodecError, match=f"all {MAX_STREAMS} codec stream slots are in use"):
            await client.open_stream("one-too-many")
        await client.close_stream("s0")
        await client.open_stream("one-too-many")
        for stream_id in ["one-too-many", *(f"s{i}" for i in range(1, free))]:
            await client.close_stream(stream_id)
        assert (await client.stats()).free_slots == free

    with_client(worker.address, scenario)


def test_an_open_given_up_on_while_the_worker_is_busy_does_not_hold_a_slot(worker):
    """The client stops waiting for an open (timeout) that the busy worker carries out later: the
    slot comes back as soon as the worker is free, not after the idle reclaim (600 s here)."""
    async def given_up_open(client, attempt: int) -> bool:
        """An open sent while the worker decodes 500 frames (seconds on this CPU): True if the
        client gave up on it. False if it was answered in time after all (a worker so slow to
        start that decode that it drained both together, and answered the open first)."""
        await client.open_stream(f"long-{attempt}")
        decoding = asyncio.ensure_future(client.decode(f"long-{attempt}", random_codes(500, seed=50), final=True))
        await asyncio.sleep(0.3)
        try:
            await client.open_stream("given-up", timeout_s=0.05)
        except CodecTimeoutError:
            return True
        finally:
            await decoding
        await client.close_stream("given-up")
        return False

    async def scenario(client):
        before = (await client.stats()).active_streams
        for attempt in range(3):
            if await given_up_open(client, attempt):
                break
        else:
            pytest.fail("the worker answered every open in time: nothing was given up on")
        deadline = time.monotonic() + 30  # a bound on the wait, not on the worker's speed
        while (await client.stats()).active_streams != before:
            assert time.monotonic() < deadline, "the abandoned open still holds its slot"
            await asyncio.sleep(0.1)
        with pytest.raises(CodecError, match="not open"):
            await client.decode("given-up", random_codes(1, seed=51))

    with_client(worker.address, scenario)


def test_bad_requests_fail_alone_and_the_worker_keeps_serving(worker, decoder):
    codes = random_codes(6, seed=30)

    async def scenario(client):
        await client.open_stream("good")
        first = await client.decode("good", codes[:2])
        with pytest.raises(CodecError, match=r"shape \[frames, 16\], got \[2, 15\]"):
            await client.decode("good", codes[:2, :15])
        with pytest.raises(CodecError, match=r"shape \[frames, 16\], got \[0, 16\]"):
            await client.decode("good", codes[:0])
        out_of_range = codes[2:4].copy()
        out_of_range[1, 7] = 5000
        with pytest.raises(CodecError, match=r"must lie in \[0, 2048\)"):
            await client.decode("good", out_of_range)
        with pytest.raises(CodecError, match=r"must lie in \[0, 2048\)"):
            await client.decode("good", -codes[2:4] - 1)
        with pytest.raises(CodecError, match="already open"):
            await client.open_stream("good")
        with pytest.raises(CodecError, match="context codes must have shape"):
            await client.open_stream("other", context_codes=codes[0])
        # none of that touched the stream's state
        rest = await client.decode("good", codes[2:], final=True)

        # a refused final chunk still ends its stream: the client is done with it
        await client.open_stream("doomed")
        with pytest.raises(CodecError, match="must lie in"):
            await client.decode("doomed", out_of_range, final=True)
        with pytest.raises(CodecError, match="'doomed' is not open"):
            await client.decode("doomed", codes[:1])
        return np.concatenate([first, rest])

    streamed = with_client(worker.address, scenario)
    assert max_err(streamed, whole_decode(decoder, codes)) <= FP32_TOL


def test_undecodable_message_gets_an_error_reply(worker):
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        socket.connect(worker.address)
        socket.send_multipart([b"\xc1 not msgpack", b"stray frame"])
        assert b"malformed codec request" in socket.recv_multipart()[0]
    finally:
        socket.close()
        context.term()

    async def still_serving(client):
        assert (await client.stats()).max_streams == MAX_STREAMS

    with_client(worker.address, still_serving)


# ----------------------------------------------------------------------------------------------
# voice cloning


def test_reference_encoding_equals_the_in_process_profile(worker, base_checkpoint):
    audio = tone_wav(2.0)

    async def scenario(client):
        icl = await client.encode_reference(audio, "a short reference")
        xvector_only = await client.encode_reference(audio, x_vector_only=True)
        return icl, xvector_only

    icl, xvector_only = with_client(worker.address, scenario)
    profile = create_voice_clone_profile(load_voice_clone_encoders(base_checkpoint), audio, "a short reference")
    assert icl.ref_codes.dtype == np.int64 and icl.ref_codes.shape == (25, 16)  # 2 s at 12.5 Hz
    np.testing.assert_array_equal(icl.ref_codes, profile.ref_codes.numpy())
    assert icl.xvector.dtype == np.float32
    assert max_err(icl.xvector, profile.xvector.float().numpy()) <= 1e-5
    assert xvector_only.ref_codes is None
    np.testing.assert_array_equal(xvector_only.xvector, icl.xvector)


def test_unusable_references_are_refused_with_the_reason(worker):
    async def scenario(client):
        with pytest.raises(CodecError, match="could not decode"):
            await client.encode_reference(b"RIFF this is not audio", "text")
        with pytest.raises(CodecError, match="ref_text .* is required"):
            await client.encode_reference(tone_wav(1.0), None)
        await client.stats()  # and the worker is fine

    with_client(worker.address, scenario)


def test_non_base_worker_refuses_reference_encoding(disposable_worker):
    async def scenario(client):
        with pytest.raises(CodecError, match="voice cloning needs a Base checkpoint.*custom_voice"):
            await client.encode_reference(tone_wav(1.0), "text")
        await client.open_stream("still-decodes")
        assert (await client.decode("still-decodes", random_codes(2, seed=40))).shape == (2 * SAMPLES_PER_FRAME,)

    with_client(disposable_worker.address, scenario)


# ----------------------------------------------------------------------------------------------
# process lifecycle


def test_idle_streams_are_reclaimed(disposable_worker):
    async def scenario(client):
        await client.open_stream("forgotten")
        assert (await client.stats()).active_streams == 1
        deadline = time.monotonic() + 60  # a bound on the wait, not on the worker's speed
        while (await client.stats()).active_streams:  # asking for stats is no activity of the stream
            assert time.monotonic() < deadline, "the idle stream was never reclaimed"
            await asyncio.sleep(0.1)
        with pytest.raises(CodecError, match="not open"):
            await client.decode("forgotten", random_codes(1, seed=41))

    with_client(disposable_worker.address, scenario)


def test_missing_checkpoint_fails_start_with_the_reason(tmp_path):
    spawned = spawned_processes()
    # the reason, not "not ready within 60 s": the worker says why before it exits
    with pytest.raises(CodecWorkerStartError, match=f"checkpoint directory {tmp_path / 'nowhere'} does not exist"):
        start_codec_worker(CodecWorkerConfig(str(tmp_path / "nowhere")), startup_timeout_s=60)
    assert spawned_processes() == spawned


def test_stop_leaves_no_process_or_socket_behind(disposable_worker):
    pid = disposable_worker.pid
    assert pid in spawned_processes()
    socket_path = Path(disposable_worker.address.removeprefix("ipc://"))
    assert socket_path.exists() and psutil.pid_exists(pid)
    disposable_worker.stop()
    disposable_worker.stop()  # idempotent
    assert not disposable_worker.is_alive()
    assert not psutil.pid_exists(pid)
    assert not socket_path.parent.exists()
    assert pid not in spawned_processes()


def test_worker_exits_when_its_parent_is_killed(base_checkpoint):
    parent_program = (
        "import sys, time\n"
        "from vllm_qwen3tts.codec.worker import CodecWorkerConfig, start_codec_worker\n"
        "handle = start_codec_worker(CodecWorkerConfig(sys.argv[1], num_threads=1))\n"
        "print(handle.pid, handle.address, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_program, str(base_checkpoint)], stdout=subprocess.PIPE, text=True
    )
    try:
        pid, address = parent.stdout.readline().split()
        worker_pid, socket_path = int(pid), Path(address.removeprefix("ipc://"))
        assert socket_path.exists()
    finally:
        parent.kill()  # no atexit, no finalizer: only the worker's own watch can end it
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and running(worker_pid):
        time.sleep(0.1)
    assert not running(worker_pid)
    assert not socket_path.parent.exists()


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_requests_pending_when_the_worker_dies_fail_instead_of_hanging(disposable_worker):
    async def scenario(client):
        await client.stats()  # connected
        os.kill(disposable_worker.pid, signal.SIGSTOP)  # the request below stays unanswered
        pending = asyncio.create_task(client.stats())
        await asyncio.sleep(0.2)
        os.kill(disposable_worker.pid, signal.SIGKILL)
        with pytest.raises(CodecError, match="lost the connection"):  # not the timeout's "no reply within 30 s"
            await pending
        with pytest.raises(CodecError, match="not reachable"):
            await client.stats()

    with_client(disposable_worker.address, scenario)


def test_command_line_worker_serves_until_sigterm(base_checkpoint, tmp_path):
    """The shared-instance mode: an operator runs the worker, API servers connect to it."""
    address = f"ipc://{tmp_path}/shared.sock"
    command = [sys.executable, "-m", "vllm_qwen3tts.codec.worker", "--model", str(base_checkpoint),
               "--address", address, "--device", "cpu", "--max-streams", "3", "--threads", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:

        async def scenario(client):  # the first request waits for the worker to bind
            assert (await client.stats()).max_streams == 3
            await client.open_stream("s", context_codes=random_codes(3, seed=50))
            await client.decode("s", random_codes(2, seed=51), final=True)

        with_client(address, scenario)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        log = process.communicate()[1]
    assert "codec worker serving" in log and "stopped" in log
    assert not Path(address.removeprefix("ipc://")).exists()


# ----------------------------------------------------------------------------------------------
# several workers (one per GPU under data parallelism)


def test_pool_spreads_streams_over_workers_and_each_stream_stays_on_its_own(worker, base_checkpoint, decoder):
    from vllm_qwen3tts.codec.pool import CodecPool

    second = start_codec_worker(CodecWorkerConfig(str(base_checkpoint), max_streams=MAX_STREAMS, num_threads=1),
                                startup_timeout_s=60)
    schedules = {f"s{i}": [2, 4, 8, 3 + i] for i in range(4)}
    codes = {sid: random_codes(sum(s), seed=20 + i) for i, (sid, s) in enumerate(schedules.items())}

    async def scenario(a, b):
        pool = CodecPool([a, b])
        before = [await a.stats(), await b.stats()]
        for sid in schedules:
            await pool.open_stream(sid)
        spread = pool.open_streams
        audio = await asyncio.gather(*(stream_through(pool, sid, codes[sid], schedules[sid]) for sid in schedules))
        after = [await a.stats(), await b.stats()]
        total = await pool.stats()
        await pool.close_stream("never-opened")  # closing is idempotent
        with pytest.raises(CodecError, match="not open"):
            await pool.decode("s0", codes["s0"][:2])  # finished streams are forgotten
        return spread, dict(zip(schedules, audio)), before, after, total, pool.open_streams

    try:
        spread, streamed, before, after, total, left = with_client([worker.address, second.address], scenario)
    finally:
        second.stop()
    assert spread == [2, 2] and left == [0, 0]
    for sid in schedules:
        assert max_err(streamed[sid], whole_decode(decoder, codes[sid])) <= FP32_TOL, sid
    chunks = [after[i].chunks_decoded - before[i].chunks_decoded for i in range(2)]
    assert chunks == [8, 8]  # two streams of four chunks on each worker
    assert total.chunks_decoded == after[0].chunks_decoded + after[1].chunks_decoded



# ----------------------------------------------------------------------------------------------
# workers launched before the server (`vllm-qwen3tts serve` starts them, then execs vLLM)


def test_launched_worker_opens_streams_only_once_provisioned(base_checkpoint, decoder):
    launched = launch_codec_worker(str(base_checkpoint), "cpu")
    socket_dir = Path(launched.socket_dir)
    try:

        async def scenario(client):
            assert (await client.stats()).max_streams == 0  # loaded, no stream pool yet
            with pytest.raises(CodecError, match="no stream pool yet"):
                await client.open_stream("early")
            reference = await client.encode_reference(tone_wav(1.0), x_vector_only=True)  # needs no pool
            assert reference.xvector.ndim == 1
            await client.provision(3, (2, 4), timeout_s=60)
            await client.provision(3, (2, 4))  # the same again: nothing to do
            with pytest.raises(CodecError, match="already provisioned for 3 streams"):
                await client.provision(5, (2, 4))
            assert (await client.stats()).max_streams == 3
            codes = random_codes(7, seed=60)
            await client.open_stream("s")
            return codes, await stream_through(client, "s", codes, [2, 4, 1])

        codes, audio = with_client(launched.address, scenario)
        assert max_err(audio, whole_decode(decoder, codes)) < FP32_TOL
        assert launched.is_alive()
    finally:
        launched.stop()
    launched.stop()  # idempotent
    assert not launched.is_alive() and not running(launched.pid)
    assert not socket_dir.exists()


def test_server_waiting_on_a_launched_worker_that_exits_fails_at_once(tmp_path):
    from vllm_qwen3tts.server.plugin import provision_launched_workers

    launched = launch_codec_worker(str(tmp_path / "nowhere"), "cpu")
    # not the 300 s timeout, which would fail it as "no reply ... within 300 s"
    with pytest.raises(CodecWorkerStartError, match=f"pid {launched.pid}\\) exited before it was ready"):
        asyncio.run(provision_launched_workers([launched], 4, (2,), timeout_s=300))
    assert not running(launched.pid)


def test_launched_worker_exits_when_its_parent_is_killed(base_checkpoint):
    parent_program = (
        "import sys, time\n"
        "from vllm_qwen3tts.codec.worker import launch_codec_worker\n"
        "worker = launch_codec_worker(sys.argv[1], 'cpu')\n"
        "print(worker.pid, worker.address, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_program, str(base_checkpoint)], stdout=subprocess.PIPE, text=True
    )
    try:
        pid, address = parent.stdout.readline().split()
        worker_pid, socket_path = int(pid), Path(address.removeprefix("ipc://"))
        deadline = time.monotonic() + 60
        while not socket_path.exists():  # serving
            assert time.monotonic() < deadline and running(worker_pid)
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and running(worker_pid):
        time.sleep(0.1)
    assert not running(worker_pid)
    assert not socket_path.parent.exists()


def test_launched_worker_samples_its_stacks_when_asked(base_checkpoint, tmp_path):
    env = {**os.environ, "QWEN3TTS_STACK_SAMPLES_DIR": str(tmp_path)}
    launched = launch_codec_worker(str(base_checkpoint), "cpu", env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("codec-worker-*.folded")):  # the sampler writes every 5 s
            assert time.monotonic() < deadline and launched.is_alive()
            time.sleep(0.2)
    finally:
        launched.stop()
    (folded,) = tmp_path.glob(f"codec-worker-{launched.pid}.folded")
    assert "MainThread;" in folded.read_text()


# ----------------------------------------------------------------------------------------------
# supervision: a worker that dies is replaced like the first

FAST_RESTARTS = RestartPolicy(first_delay_s=0.1, max_delay_s=0.5, max_restarts=3, window_s=600, startup_timeout_s=120)


async def eventually(condition: Callable[[], object], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        await asyncio.sleep(0.05)


def connected_client(address: str) -> CodecClient:
    client = CodecClient(timeout_s=30)
    client.connect(address)
    return client


def test_a_killed_worker_fails_its_streams_at_once_and_is_replaced_while_the_other_serves(base_checkpoint, decoder):
    config = CodecWorkerConfig(str(base_checkpoint), max_streams=MAX_STREAMS, num_threads=1)
    workers = [start_codec_worker(config, startup_timeout_s=60) for _ in range(2)]
    first_pid = workers[0].pid
    codes = random_codes(12, seed=70)

    async def scenario():
        pool = CodecPool([connected_client(w.address) for w in workers])
        supervisor = CodecSupervisor(pool, workers, MAX_STREAMS, config.graph_chunk_lengths, FAST_RESTARTS)
        watching = asyncio.create_task(supervisor.run())
        try:
            await pool.open_stream("doomed")  # the fewest open streams, ties to the first: one on each
            await pool.open_stream("survivor")
            await pool.decode("doomed", codes[:2])
            await pool.decode("survivor", codes[:2])
            os.kill(first_pid, signal.SIGSTOP)  # so that the next decode is in flight when it dies
            in_flight = asyncio.create_task(pool.decode("doomed", codes[2:4]))
            await asyncio.sleep(0.2)
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(CodecUnavailableError) as failed:
                await in_flight
            assert not isinstance(failed.value, CodecTimeoutError), "failed by the client's 30 s timeout, not at once"
            await eventually(lambda: pool.down, "death noticed", 60)
            down = supervisor.problems()
            await eventually(lambda: supervisor.expected_back_s() is not None, "restart scheduled", 60)
            expected_back = supervisor.expected_back_s()  # no restart timed yet: the policy's guess
            with pytest.raises(CodecUnavailableError, match="is gone"):
                await pool.decode("doomed", codes[4:6])
            await pool.close_stream("doomed")  # nothing to close: the stream died with its worker
            survivor = await pool.decode("survivor", codes[2:4])  # the other worker serves on
            await pool.open_stream("meanwhile")
            placed_meanwhile = pool.open_streams
            await eventually(lambda: not supervisor.problems(), "restart")
            assert supervisor.expected_back_s() is None and 0 < supervisor.last_start_s < 120
            assert 0 < expected_back <= FAST_RESTARTS.first_delay_s + FAST_RESTARTS.expected_start_s
            replacement = supervisor.workers[0]
            stats = await pool.clients[0].stats()
            await pool.open_stream("after")
            placed_after = pool.open_streams
            after = await stream_through(pool, "after", codes, [2, 4, 6])
            return down, survivor, placed_meanwhile, replacement, stats, placed_after, after, supervisor.restarts
        finally:
            watching.cancel()
            supervisor.stop()

    try:
        down, survivor, placed_meanwhile, replacement, stats, placed_after, after, restarts = asyncio.run(scenario())
    finally:
        for worker in workers:
            worker.stop()
    assert len(down) == 1 and down[0].startswith("codec worker 0 (cpu) was killed by SIGKILL"), down
    assert survivor.shape == (2 * SAMPLES_PER_FRAME,)
    assert placed_meanwhile == [0, 2]  # new streams went to the live worker only
    assert replacement.pid != first_pid and not running(first_pid) and restarts == 1
    assert stats.max_streams == MAX_STREAMS and stats.active_streams == 0  # provisioned like the first
    assert placed_after == [1, 2]
    assert max_err(after, whole_decode(decoder, codes)) < FP32_TOL
    assert not replacement.is_alive()  # stopped with the supervisor


def test_a_launched_worker_is_replaced_by_one_launched_and_provisioned_like_it(base_checkpoint, decoder):
    launched = launch_codec_worker(str(base_checkpoint), "cpu")
    codes = random_codes(6, seed=71)

    async def scenario():
        client = connected_client(launched.address)
        await provision_worker(launched, client, MAX_STREAMS, (2, 4), timeout_s=120)
        pool = CodecPool([client])
        supervisor = CodecSupervisor(pool, [launched], MAX_STREAMS, (2, 4), FAST_RESTARTS)
        watching = asyncio.create_task(supervisor.run())
        try:
            os.kill(launched.pid, signal.SIGKILL)
            await eventually(lambda: pool.down, "death noticed", 60)
            with pytest.raises(CodecUnavailableError, match="no codec worker is available"):
                await pool.open_stream("too-early")
            await eventually(lambda: not supervisor.problems(), "restart")
            replacement = supervisor.workers[0]
            stats = await pool.clients[0].stats()
            await pool.open_stream("s")
            return replacement, stats, await stream_through(pool, "s", codes, [2, 4])
        finally:
            watching.cancel()
            supervisor.stop()

    try:
        replacement, stats, audio = asyncio.run(scenario())
    finally:
        launched.stop()
    assert isinstance(replacement, LaunchedCodecWorker) and replacement.pid != launched.pid
    assert replacement.device == "cpu" and replacement.model_dir == str(base_checkpoint)
    assert launched.exitcode == -signal.SIGKILL and not running(launched.pid)
    assert stats.max_streams == MAX_STREAMS
    assert max_err(audio, whole_decode(decoder, codes)) < FP32_TOL
    assert not running(replacement.pid) and not Path(replacement.socket_dir).exists()


def test_a_worker_that_cannot_start_again_is_given_up_after_the_restart_bound(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint("0.6b-custom_voice"), checkpoint)
    launched = launch_codec_worker(str(checkpoint), "cpu")
    policy = RestartPolicy(first_delay_s=0.05, max_delay_s=0.1, max_restarts=2, window_s=600, startup_timeout_s=120)

    async def scenario():
        client = connected_client(launched.address)
        await provision_worker(launched, client, 2, (2,), timeout_s=120)
        supervisor = CodecSupervisor(CodecPool([client]), [launched], 2, (2,), policy)
        watching = asyncio.create_task(supervisor.run())
        try:
            shutil.rmtree(checkpoint)  # its replacements fail to load
            os.kill(launched.pid, signal.SIGKILL)
            await asyncio.wait_for(watching, 120)  # run() returns once no worker is left to watch
            return supervisor.problems(), supervisor.restarts
        finally:
            watching.cancel()
            supervisor.stop()

    try:
        problems, restarts = asyncio.run(scenario())
    finally:
        launched.stop()
    assert restarts == 0
    assert len(problems) == 1 and "not restarted again: 2 restarts within 600 s" in problems[0], problems
