"""Large messages (trees, images) as streams of at most 1 MiB pieces, so that
nothing assumes a message fits in gRPC's 4 MB limit."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Iterator

from fleetlib.errors import FleetError
from fleetlib.wire import tree_pb2

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
