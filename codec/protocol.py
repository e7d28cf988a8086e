"""Wire format between `CodecClient` (DEALER) and the codec worker (ROUTER).

A message is one msgpack header (a tagged msgspec struct) followed by zero or more raw
frames holding array bytes. Arrays travel as their numpy buffers, described in the header
by an `ArrayHeader`, so 96 KB of PCM is never re-encoded and nothing is pickled.

Which frames follow a header is fixed per message type (documented on each struct), in
field order. Every request carries a `seq` chosen by the client; the reply repeats it so a
client can have many requests in flight on one socket.
"""

from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

# Dtypes accepted from the wire. Anything else (object arrays, big-endian, ...) is refused
# before numpy sees the bytes.
WIRE_DTYPES = frozenset({"<i2", "<i4", "<i8", "<f4"})

# Seq of a failure reply to a request whose header could not even be decoded.
UNKNOWN_SEQ = -1


class ArrayHeader(msgspec.Struct, frozen=True):
    dtype: str  # numpy dtype string, one of WIRE_DTYPES
    shape: tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# requests (client -> worker)


class OpenStream(msgspec.Struct, frozen=True, tag="open"):
    """Frames: the context codes [T, 16] when `context` is set."""

    seq: int
    stream_id: str
    context: ArrayHeader | None = None


class DecodeChunk(msgspec.Struct, frozen=True, tag="decode"):
    """Frames: the codes [n, 16]."""

    seq: int
    stream_id: str
    codes: ArrayHeader
    final: bool = False


class CloseStream(msgspec.Struct, frozen=True, tag="close"):
    seq: int
    stream_id: str


class EncodeReference(msgspec.Struct, frozen=True, tag="encode_reference"):
    """Frames: the encoded reference audio file (wav, flac, mp3, ...)."""

    seq: int
    ref_text: str | None = None
    x_vector_only: bool = False


class GetStats(msgspec.Struct, frozen=True, tag="stats"):
    seq: int


class Provision(msgspec.Struct, frozen=True, tag="provision"):
    """Allocate the stream pool and capture the decoder's CUDA graphs, for a worker started with
    `--wait-for-provision`. The reply (`Done`) comes once streams can be opened. Repeating the
    same provision is a no-op; a different one is refused."""

    seq: int
    max_streams: int
    graph_chunk_lengths: tuple[int, ...]


Request = Union[OpenStream, DecodeChunk, CloseStream, EncodeReference, GetStats, Provision]


# ----------------------------------------------------------------------------------------------
# replies (worker -> client)


class Done(msgspec.Struct, frozen=True, tag="done"):
    """Reply to open, close and provision."""

    seq: int


class DecodedAudio(msgspec.Struct, frozen=True, tag="audio"):
    """Frames: float32 PCM [n * samples_per_frame] at 24 kHz."""

    seq: int
    samples: ArrayHeader


class EncodedReference(msgspec.Struct, frozen=True, tag="reference"):
    """Frames: the x-vector (float32 [D]), then the reference codes (int64 [T, 16]) when present."""

    seq: int
    xvector: ArrayHeader
    ref_codes: ArrayHeader | None


class CodecWorkerStats(msgspec.Struct, frozen=True):
    max_streams: int
    active_streams: int
    free_slots: int
    batches_run: int  # decoder calls for generated chunks (context priming not counted)
    chunks_decoded: int  # stream chunks those calls covered
    largest_batch: int
    frames_decoded: int = 0  # frames those chunks held (padding not counted)
    decode_seconds: float = 0.0  # wall time inside decoder calls, audio copied to the host included

    @property
    def mean_batch_size(self) -> float:
        return self.chunks_decoded / self.batches_run if self.batches_run else 0.0


def sum_stats(parts: list[CodecWorkerStats]) -> CodecWorkerStats:
    """Several workers' counters as one (largest_batch: the largest of any)."""
    total = {f: sum(getattr(p, f) for p in parts) for f in CodecWorkerStats.__struct_fields__}
    total["largest_batch"] = max(p.largest_batch for p in parts)
    return CodecWorkerStats(**total)


class StatsReply(msgspec.Struct, frozen=True, tag="stats"):
    seq: int
    stats: CodecWorkerStats


class Failure(msgspec.Struct, frozen=True, tag="error"):
    seq: int
    message: str


Reply = Union[Done, DecodedAudio, EncodedReference, StatsReply, Failure]


# ----------------------------------------------------------------------------------------------
# arrays


class ProtocolError(ValueError):
    """A message that does not follow this wire format."""


def array_frame(array: np.ndarray) -> tuple[ArrayHeader, memoryview]:
    """Header and zero-copy buffer of `array` (made C-contiguous and little-endian first)."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype.str not in WIRE_DTYPES:
        raise ProtocolError(f"dtype {array.dtype} cannot travel to the codec worker (one of {sorted(WIRE_DTYPES)})")
    return ArrayHeader(dtype=array.dtype.str, shape=tuple(array.shape)), memoryview(array.reshape(-1).view(np.uint8))


def read_array(header: ArrayHeader, frame: bytes | memoryview) -> np.ndarray:
    """The array a frame holds (read-only, sharing the frame's memory), checked against its header."""
    if header.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"array dtype {header.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    if any(d < 0 for d in header.shape):
        raise ProtocolError(f"negative array dimension in {header.shape}")
    dtype = np.dtype(header.dtype)
    expected = int(np.prod(header.shape, dtype=np.int64)) * dtype.itemsize
    buffer = memoryview(frame)
    if buffer.nbytes != expected:
        raise ProtocolError(
            f"array {header.dtype}{list(header.shape)} needs {expected} bytes, the frame holds {buffer.nbytes}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(header.shape)


def expect_frames(frames: list, count: int, what: str) -> None:
    if len(frames) != count:
        raise ProtocolError(f"{what} takes {count} data frame(s), got {len(frames)}")


REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
REPLY_DECODER = msgspec.msgpack.Decoder(Reply)
ENCODER = msgspec.msgpack.Encoder()
