"""Large messages (trees, images) as streams of at most 1 MiB pieces, so that
nothing assumes a message fits in gRPC's 4 MB limit."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from fleetlib.errors import FleetError
from fleetlib.wire import tree_pb2

M = TypeVar("M", bound=Message)

CHUNK_SIZE = 1 << 20
MAX_MESSAGE_BYTES = 4 << 30


def split_message(data: bytes) -> Iterator[tree_pb2.Chunk]:
    """A serialized message as chunks (at least one, even when empty)."""
    view = memoryview(data)
    yield tree_pb2.Chunk(data=bytes(view[:CHUNK_SIZE]))
    for start in range(CHUNK_SIZE, len(data), CHUNK_SIZE):
        yield tree_pb2.Chunk(data=bytes(view[start:start + CHUNK_SIZE]))


def _append(parts: list[bytes], total: int, chunk: tree_pb2.Chunk, limit: int) -> int:
    total += len(chunk.data)
    if total > limit:
        raise FleetError(f"message larger than the {limit}-byte limit")
    parts.append(chunk.data)
    return total


def join_chunks(chunks: Iterable[tree_pb2.Chunk], limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """Reassemble a chunked message, refusing more than `limit` bytes."""
    parts: list[bytes] = []
    total = 0
    for chunk in chunks:
        total = _append(parts, total, chunk, limit)
    return b"".join(parts)


async def join_chunks_async(chunks: AsyncIterable[tree_pb2.Chunk],
                            limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """`join_chunks` for an asynchronous stream."""
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total = _append(parts, total, chunk, limit)
    return b"".join(parts)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise FleetError("malformed message: truncated or overlong varint")


def field_pieces(data: bytes, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """A serialized message cut between its top-level fields into pieces of about
    `size` bytes; parsed and merged in order they make the whole message."""
    start = pos = 0
    while pos < len(data):
        key = data[pos]
        if key < 0x80:  # fields 1 to 15: one byte
            pos += 1
        else:
            key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            pos = _varint(data, pos)[1]
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise FleetError(f"malformed message: wire type {wire_type} at the top level")
        if pos > len(data):
            raise FleetError("malformed message: a field runs past the end")
        if pos - start >= size:
            yield data[start:pos]
            start = pos
    if start < len(data):
        yield data[start:]


def parse_in_pieces(message_class: type[M], data: bytes) -> M:
    """Parse a large message a piece at a time: the same result as FromString, but the
    parser never holds the GIL for long, so a thread decoding a tree of hundreds of
    MiB leaves the event loop (and other threads) running."""
    message = message_class()
    try:
        for piece in field_pieces(data):
            message.MergeFromString(piece)
    except DecodeError as err:
        raise FleetError(f"malformed {message_class.__name__} message: {err}") from None
    return message
