"""The object stream of the ObjectServer protocol: each object is a run of
ObjectChunk pieces, the first carrying hash and size, each at most 1 MiB,
optionally zstd-compressed piece by piece (`pack`), or the pieces of each message
compressed together as one frame (`pack_compressed`: small objects then compress with
their neighbours' context). Both ends of AddObjects and GetObjects use these halves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sized
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import zstandard

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import Reader, check_hash, format_hash
from fleetlib.wire import objectserver_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

PIECE_SIZE = 1 << 20
ZSTD = objectserver_pb2.COMPRESSION_ZSTD
NONE = objectserver_pb2.COMPRESSION_NONE
BATCH_BYTES = 16 << 20
BATCH_OBJECTS = 1024
PACK_BYTES = 2 << 20  # piece bytes compressed together into one message's frame
PACK_LEVEL = 2  # zstd level of those frames: cheaper than 3 and, with context, smaller
PACKED_LIMIT = 2 * PACK_BYTES  # the most one frame may inflate to (refused beyond)


def object_chunks(digest: bytes, size: int, reader: Reader,
                  compressor: zstandard.ZstdCompressor | None = None
                  ) -> Iterator[objectserver_pb2.ObjectChunk]:
    """The pieces of one object read from `reader` (exactly `size` bytes)."""
    remaining = size
    first = True
    while remaining:
        data = reader.read(min(PIECE_SIZE, remaining))
        if not data:
            raise FleetError(f"object {format_hash(digest)}: source ended {remaining} bytes early")
        remaining -= len(data)
        compression = NONE
        if compressor is not None:
            packed = compressor.compress(data)
            if len(packed) < len(data):
                data, compression = packed, ZSTD
        if first:
            yield objectserver_pb2.ObjectChunk(hash=digest, size=size, data=data,
                                               compression=compression)
            first = False
        else:
            yield objectserver_pb2.ObjectChunk(data=data, compression=compression)


def pack(chunks: Iterable[objectserver_pb2.ObjectChunk]
         ) -> Iterator[objectserver_pb2.ObjectChunks]:
    """Group consecutive pieces into messages of about PIECE_SIZE bytes of data."""
    batch: list[objectserver_pb2.ObjectChunk] = []
    size = 0
    for chunk in chunks:
        if batch and size + len(chunk.data) > PIECE_SIZE:
            yield objectserver_pb2.ObjectChunks(chunks=batch)
            batch, size = [], 0
        batch.append(chunk)
        size += len(chunk.data)
    if batch:
        yield objectserver_pb2.ObjectChunks(chunks=batch)


def pack_compressed(chunks: Iterable[objectserver_pb2.ObjectChunk],
                    compressor: zstandard.ZstdCompressor
                    ) -> Iterator[objectserver_pb2.ObjectChunks]:
    """Group consecutive uncompressed pieces into messages of about PACK_BYTES of data,
    each message's data compressed as one frame (`ObjectChunks.packed`), or left in
    its pieces when the frame would not be smaller."""
    batch: list[objectserver_pb2.ObjectChunk] = []
    size = 0
    for chunk in chunks:
        if batch and size + len(chunk.data) > PACK_BYTES:
            yield _packed(batch, size, compressor)
            batch, size = [], 0
        batch.append(chunk)
        size += len(chunk.data)
    if batch:
        yield _packed(batch, size, compressor)


def _packed(batch: list[objectserver_pb2.ObjectChunk], size: int,
            compressor: zstandard.ZstdCompressor) -> objectserver_pb2.ObjectChunks:
    frame = compressor.compress(b"".join(chunk.data for chunk in batch))
    if len(frame) >= size:
        return objectserver_pb2.ObjectChunks(chunks=batch)
    for chunk in batch:
        chunk.packed_length = len(chunk.data)
        chunk.data = b""
    return objectserver_pb2.ObjectChunks(chunks=batch, packed=frame)


async def on_thread(messages: Iterator[T]) -> AsyncIterator[T]:
    """MESSAGES, each made on a thread while the caller sends the one before: reading
    and compressing leave the event loop free, and overlap the sending."""
    done = object()
    making = asyncio.ensure_future(asyncio.to_thread(next, messages, done))
    try:
        while (message := await making) is not done:
            making = asyncio.ensure_future(asyncio.to_thread(next, messages, done))
            yield cast(T, message)
    finally:
        making.cancel()  # a call ended early: the message being made is dropped


def wire_size(message: objectserver_pb2.ObjectChunks) -> int:
    """The object data bytes a message carries as sent (compressed where it is)."""
    return len(message.packed) + sum(len(chunk.data) for chunk in message.chunks)


class Writer(Protocol):
    """One object being received (`ObjectWriter`, or an `image get` file)."""

    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class SinkBatch(Protocol):
    """Objects received together (`objectstore.Batch`)."""

    @property
    def pending(self) -> Sized: ...
    def begin(self, digest: bytes, size: int) -> Writer: ...
    def commit_later(self) -> Future[int]: ...


class Sink(Protocol):
    """Where a receiver puts objects: an `ObjectStore`, or `unpack.FreshTree`."""

    def has(self, digest: bytes) -> bool: ...
    def batch(self) -> SinkBatch: ...


@dataclass
class ReceiveStats:
    """What a receiver did with an object stream."""

    added: int = 0
    already_present: int = 0
    bytes_added: int = 0
    wire_bytes: int = 0


class ObjectReceiver:
    """Consumes ObjectChunk pieces into an ObjectStore (or another Sink), verifying each
    object.

    Objects already stored are read past, not rewritten. Verified objects are
    committed in batches (and by `close`), so an interrupted stream keeps every
    object that arrived whole: a retry resumes instead of starting over.
    """

    def __init__(self, store: Sink) -> None:
        self.store = store
        self._commits: list[Future[int]] = []  # batches syncing behind the receiving
        self.stats = ReceiveStats()
        self._batch: SinkBatch = store.batch()
        self._batch_bytes = 0
        self._writer: Writer | None = None
        self._digest = b""
        self._remaining = 0
        self._size = 0
        self._decompressor = zstandard.ZstdDecompressor()

    def feed_message(self, message: objectserver_pb2.ObjectChunks) -> list[bytes]:
        """Take every piece of one stream message; the hashes of the objects it
        completed."""
        if not message.packed:
            return [digest for digest in map(self.feed, message.chunks) if digest is not None]
        self.stats.wire_bytes += len(message.packed)
        packed = self._unpack(message)
        done = []
        start = 0
        for chunk in message.chunks:
            if chunk.packed_length:
                if chunk.data or chunk.compression != NONE:
                    raise FleetError("object stream piece with both packed and own data")
                end = start + chunk.packed_length
                digest = self._take(chunk, packed[start:end])
                start = end
            else:
                digest = self.feed(chunk)
            if digest is not None:
                done.append(digest)
        return done

    def _unpack(self, message: objectserver_pb2.ObjectChunks) -> bytes:
        """The data of a message's packed frame, checked against its pieces' lengths
        (whose sum is bounded) before it is inflated."""
        total = sum(chunk.packed_length for chunk in message.chunks)
        try:
            declared = zstandard.frame_content_size(message.packed)
        except zstandard.ZstdError:
            declared = -1
        if total > PACKED_LIMIT or declared != total:
            raise FleetError(f"packed object data declares {declared} bytes, its pieces "
                             f"{total} (at most {PACKED_LIMIT})")
        try:
            data = self._decompressor.decompress(message.packed, max_output_size=total)
        except zstandard.ZstdError as err:
            raise FleetError(f"bad packed zstd frame: {err}") from None
        if len(data) != total:
            raise FleetError(f"packed object data holds {len(data)} bytes, its pieces {total}")
        return data

    def feed(self, chunk: objectserver_pb2.ObjectChunk) -> bytes | None:
        """Take one piece; returns the hash of an object it completed, else None."""
        self.stats.wire_bytes += len(chunk.data)
        if chunk.packed_length:
            raise FleetError("object stream piece refers to a packed frame outside its "
                             "message")
        return self._take(chunk, chunk.data)

    def _take(self, chunk: objectserver_pb2.ObjectChunk, data: bytes) -> bytes | None:
        """One piece whose content (maybe compressed, as the piece says) is DATA."""
        if self._remaining == 0:
            self._start(chunk)
        elif chunk.hash:
            raise FleetError(f"object {format_hash(self._digest)}: next object began "
                             f"{self._remaining} bytes early")
        if chunk.compression == ZSTD:
            try:
                declared = zstandard.frame_content_size(data)
            except zstandard.ZstdError:
                declared = -1
            if declared > self._remaining:  # refuse a bomb before inflating it
                raise FleetError(f"object {format_hash(self._digest)}: more bytes than declared")
            try:
                data = self._decompressor.decompress(data, max_output_size=self._remaining)
            except zstandard.ZstdError as err:
                raise FleetError(f"object {format_hash(self._digest)}: bad zstd piece: {err}") \
                    from None
        elif chunk.compression != NONE:
            raise FleetError(f"unknown compression {chunk.compression}")
        if len(data) > self._remaining:
            raise FleetError(f"object {format_hash(self._digest)}: more bytes than declared")
        self._remaining -= len(data)
        if self._writer is not None:
            self._writer.write(data)
        if self._remaining:
            return None
        if self._writer is not None:
            self._writer.finish()
            self._writer = None
            self.stats.added += 1
            self._batch_bytes += self._size
            self.stats.bytes_added += self._size
            if self._batch_bytes >= BATCH_BYTES or len(self._batch.pending) >= BATCH_OBJECTS:
                self.commit()
        return self._digest

    def _start(self, chunk: objectserver_pb2.ObjectChunk) -> None:
        if not chunk.hash:
            raise FleetError("object stream piece without a hash where an object begins")
        self._digest = check_hash(chunk.hash)
        if chunk.size <= 0:
            raise FleetError(f"object {format_hash(self._digest)}: invalid size {chunk.size}")
        self._size = self._remaining = chunk.size
        if self.store.has(self._digest):
            self.stats.already_present += 1
            self._writer = None
        else:
            self._writer = self._batch.begin(self._digest, chunk.size)

    def commit(self) -> Future[int]:
        """Make every object verified so far durable and visible, on the store's I/O
        thread while more arrive; `close` waits for it, or the future it returns says
        when (earlier commits are done by then too)."""
        future = self._batch.commit_later()
        self._commits.append(future)
        self._batch_bytes = 0
        return future

    def close(self, strict: bool = True) -> None:
        """Commit what arrived whole and drop a partial object; when `strict`,
        FleetError if the stream stopped mid-object."""
        partial = self._remaining
        self._remaining = 0
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self.commit()
        commits, self._commits = self._commits, []
        for commit in commits:
            commit.result()
        if partial and strict:
            raise FleetError(f"object {format_hash(self._digest)}: stream ended {partial} "
                             "bytes early")
