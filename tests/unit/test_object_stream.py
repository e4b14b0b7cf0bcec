"""Tests of rpc.objects (object stream sender and verifying receiver) and rpc.chunks
(large messages as <= 1 MiB chunks)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from fleetlib.errors import FleetError
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.rpc.chunks import CHUNK_SIZE, join_chunks, join_chunks_async, split_message
from fleetlib.rpc.objects import (
    NONE,
    PACK_BYTES,
    PACKED_LIMIT,
    PIECE_SIZE,
    ZSTD,
    ObjectReceiver,
    object_chunks,
    pack,
    pack_compressed,
    wire_size,
)
from fleetlib.wire import objectserver_pb2

MiB = 1 << 20
BIG = os.urandom(3 * MiB)
TINY = [b"tiny object %d" % n for n in range(300)]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunks_of(objects: list[bytes], compressor: zstandard.ZstdCompressor | None = None
              ) -> Iterator[objectserver_pb2.ObjectChunk]:
    for data in objects:
        yield from object_chunks(sha(data), len(data), io.BytesIO(data), compressor)


def receive(store: ObjectStore, messages, strict: bool = True) -> ObjectReceiver:
    receiver = ObjectReceiver(store)
    for message in messages:
        receiver.feed_message(wire(message))
    receiver.close(strict=strict)
    return receiver


def wire(message):
    return type(message).FromString(message.SerializeToString())


def stored(store: ObjectStore, data: bytes) -> bool:
    if not store.has(sha(data)):
        return False
    with store.open(sha(data)) as f:
        return f.read() == data


def tmp_files(store: ObjectStore) -> list[str]:
    return os.listdir(store.tmp_dir)


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


# ---------------------------------------------------------------- round trips


def test_big_and_tiny_objects_round_trip(store: ObjectStore) -> None:
    objects = [TINY[0], BIG, *TINY[1:]]
    pieces = list(chunks_of([BIG]))
    assert len(pieces) == 3
    assert pieces[0].hash == sha(BIG) and pieces[0].size == len(BIG)
    assert not pieces[1].hash and not pieces[1].size
    assert all(len(p.data) <= PIECE_SIZE for p in pieces)
    messages = list(pack(chunks_of(objects)))
    for message in messages:
        assert sum(len(c.data) for c in message.chunks) <= PIECE_SIZE
        assert message.ByteSize() < 2 * MiB
    assert len(messages) < 10  # tiny objects are packed together
    receiver = receive(store, messages)
    assert all(stored(store, data) for data in objects)
    assert sorted(store) == sorted(sha(d) for d in objects)
    stats = receiver.stats
    assert stats.added == len(objects) and stats.already_present == 0
    assert stats.bytes_added == sum(len(d) for d in objects)
    assert stats.wire_bytes == stats.bytes_added
    assert tmp_files(store) == []
    # a second time, everything is already present
    again = receive(store, list(pack(chunks_of(objects))))
    assert again.stats.added == 0 and again.stats.already_present == len(objects)


def test_feed_returns_completed_hashes(store: ObjectStore) -> None:
    receiver = ObjectReceiver(store)
    results = [receiver.feed(wire(piece)) for piece in chunks_of([BIG, b"x"])]
    assert results == [None, None, sha(BIG), sha(b"x")]
    receiver.close()
    assert stored(store, BIG) and stored(store, b"x")


def test_zstd_compressed_pieces_round_trip(store: ObjectStore) -> None:
    compressible = b"fleet image convergence " * (MiB // 8)  # 3 MiB
    objects = [compressible, BIG, b"a" * 5000, b"z"]
    compressor = zstandard.ZstdCompressor(level=3)
    pieces = list(chunks_of(objects, compressor))
    kinds = [p.compression for p in pieces]
    assert kinds[:3] == [ZSTD, ZSTD, ZSTD]  # the compressible object
    assert kinds[3:6] == [NONE, NONE, NONE]  # random data is sent as it is
    assert kinds[6] == ZSTD and kinds[7] == NONE  # one byte does not shrink
    receiver = receive(store, list(pack(iter(pieces))))
    assert all(stored(store, data) for data in objects)
    assert receiver.stats.wire_bytes < receiver.stats.bytes_added - 2 * MiB


# ---------------------------------------------------------------- hostile streams


def test_forged_content_is_refused_and_not_stored(store: ObjectStore) -> None:
    real, fake = b"the real content", b"the fake content"
    receiver = ObjectReceiver(store)
    receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(b"good"), size=4, data=b"good"))
    with pytest.raises(FleetError, match="does not match its hash"):
        receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(real), size=len(fake), data=fake))
    receiver.close(strict=False)
    assert not store.has(sha(real))
    assert not store.has(sha(fake))
    assert stored(store, b"good")  # what arrived whole before is kept
    assert tmp_files(store) == []


def test_forged_compressed_content_is_refused(store: ObjectStore) -> None:
    real, fake = b"r" * 4000, b"f" * 4000
    piece = next(object_chunks(sha(real), len(fake), io.BytesIO(fake),
                               zstandard.ZstdCompressor()))
    assert piece.compression == ZSTD
    receiver = ObjectReceiver(store)
    with pytest.raises(FleetError):
        receiver.feed(piece)
    receiver.close(strict=False)
    assert list(store) == [] and tmp_files(store) == []


def test_stream_ending_mid_object(store: ObjectStore) -> None:
    pieces = list(chunks_of([b"whole", BIG]))
    receiver = ObjectReceiver(store)
    for piece in pieces[:-1]:  # the last piece of BIG never arrives
        receiver.feed(piece)
    with pytest.raises(FleetError, match="ended"):
        receiver.close()
    assert stored(store, b"whole")
    assert not store.has(sha(BIG))
    assert tmp_files(store) == []


def test_stream_ending_mid_object_not_strict(store: ObjectStore) -> None:
    receiver = ObjectReceiver(store)
    for piece in list(chunks_of(TINY[:5] + [BIG]))[:-2]:
        receiver.feed(piece)
    receiver.close(strict=False)
    assert all(stored(store, data) for data in TINY[:5])
    assert not store.has(sha(BIG))
    assert tmp_files(store) == []
    # a retry resumes: the complete objects are already there
    retry = receive(store, list(pack(chunks_of(TINY[:5] + [BIG]))))
    assert retry.stats.already_present == 5 and retry.stats.added == 1
    assert stored(store, BIG)


def test_uncompressed_piece_larger_than_declared(store: ObjectStore) -> None:
    receiver = ObjectReceiver(store)
    with pytest.raises(FleetError, match="more"):
        receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(b"0123456789"), size=10,
                                                   data=b"0123456789!"))
    receiver.close(strict=False)
    assert list(store) == [] and tmp_files(store) == []


@pytest.mark.parametrize("content_size", [True, False])
def test_compressed_piece_larger_than_declared(store: ObjectStore, content_size: bool) -> None:
    data = b"abc" * 1000
    packed = zstandard.ZstdCompressor(write_content_size=content_size).compress(data + data)
    receiver = ObjectReceiver(store)
    with pytest.raises(FleetError):
        receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(data), size=len(data),
                                                   data=packed, compression=ZSTD))
    receiver.close(strict=False)
    assert list(store) == [] and tmp_files(store) == []


def test_compressed_piece_is_refused_before_inflating(store: ObjectStore) -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * MiB))
    assert len(bomb) < 16384
    receiver = ObjectReceiver(store)
    tracemalloc.start()
    try:
        with pytest.raises(FleetError):
            receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(b"x" * 100), size=100,
                                                       data=bomb, compression=ZSTD))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB


@pytest.mark.parametrize("piece", [
    objectserver_pb2.ObjectChunk(size=3, data=b"abc"),  # no hash where an object begins
    objectserver_pb2.ObjectChunk(hash=b"\1" * 31, size=3, data=b"abc"),  # malformed hash
    objectserver_pb2.ObjectChunk(hash=sha(b""), size=0, data=b""),  # empty object
    objectserver_pb2.ObjectChunk(hash=sha(b"abc"), size=3, data=b"abc", compression=7),
    objectserver_pb2.ObjectChunk(hash=sha(b"abc"), size=3, data=b"not zstd",
                                 compression=ZSTD),
], ids=["no hash", "short hash", "empty", "unknown compression", "bad zstd"])
def test_malformed_pieces(store: ObjectStore, piece: objectserver_pb2.ObjectChunk) -> None:
    receiver = ObjectReceiver(store)
    with pytest.raises(FleetError):
        receiver.feed(piece)
    receiver.close(strict=False)
    assert list(store) == [] and tmp_files(store) == []


def test_next_object_beginning_early(store: ObjectStore) -> None:
    receiver = ObjectReceiver(store)
    receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(b"abcdef"), size=6, data=b"abc"))
    with pytest.raises(FleetError, match="early"):
        receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(b"x"), size=1, data=b"x"))
    receiver.close(strict=False)
    assert list(store) == [] and tmp_files(store) == []


def test_sender_source_ending_early() -> None:
    with pytest.raises(FleetError, match="early"):
        list(object_chunks(sha(b"abcdef"), 10, io.BytesIO(b"abcdef")))


# ---------------------------------------------------------------- packed frames


def packed_message(objects: list[bytes]) -> objectserver_pb2.ObjectChunks:
    """The one packed message `pack_compressed` makes of small compressible objects."""
    [message] = pack_compressed(chunks_of(objects), zstandard.ZstdCompressor(level=2))
    assert message.packed and all(not chunk.data for chunk in message.chunks)
    return message


def test_packed_frames_round_trip_and_compress_small_objects_together(
        store: ObjectStore) -> None:
    assert wire_size(packed_message(TINY)) < sum(map(len, TINY)) / 4
    messages = list(pack_compressed(chunks_of([*TINY, BIG]), zstandard.ZstdCompressor(level=2)))
    assert any(m.packed for m in messages)
    assert all(sum(c.packed_length + len(c.data) for c in m.chunks) <= PACK_BYTES + PIECE_SIZE
               for m in messages)
    receiver = receive(store, messages)
    assert receiver.stats.added == len(TINY) + 1
    assert all(stored(store, data) for data in [*TINY, BIG])
    assert receiver.stats.wire_bytes == sum(map(wire_size, messages))


def test_incompressible_data_is_sent_in_its_pieces(store: ObjectStore) -> None:
    messages = list(pack_compressed(chunks_of([BIG]), zstandard.ZstdCompressor(level=2)))
    assert all(not m.packed and all(c.data and not c.packed_length for c in m.chunks)
               for m in messages)
    receive(store, messages)
    assert stored(store, BIG)


def refused(store: ObjectStore, message: objectserver_pb2.ObjectChunks, match: str
            ) -> list[bytes]:
    """Feed a bad packed message: refused in one FleetError, no temporary file left;
    the objects it stored (those before the bad one, verified)."""
    receiver = ObjectReceiver(store)
    with pytest.raises(FleetError, match=match):
        receiver.feed_message(wire(message))
    receiver.close(strict=False)
    assert tmp_files(store) == []
    return list(store)


def test_a_frame_declaring_another_size_than_its_pieces_is_refused(store: ObjectStore) -> None:
    message = packed_message(TINY)
    message.chunks[0].packed_length += 1
    assert refused(store, message, "declares") == []


def test_a_frame_without_a_declared_size_is_refused(store: ObjectStore) -> None:
    message = packed_message(TINY)
    data = b"".join(TINY)
    message.packed = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert refused(store, message, "declares -1 bytes") == []


def test_a_frame_over_the_limit_is_refused_before_inflating(store: ObjectStore) -> None:
    size = PACKED_LIMIT + 1
    message = objectserver_pb2.ObjectChunks(
        chunks=[objectserver_pb2.ObjectChunk(hash=sha(bytes(size)), size=size,
                                             packed_length=size)],
        packed=zstandard.ZstdCompressor().compress(bytes(size)))
    tracemalloc.start()
    try:
        assert refused(store, message, "at most") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PACKED_LIMIT


def test_a_corrupt_frame_is_refused(store: ObjectStore) -> None:
    message = packed_message(TINY)
    frame = bytearray(message.packed)
    frame[len(frame) // 2] ^= 0xFF
    message.packed = bytes(frame)
    kept = refused(store, message, "packed|does not match its hash")
    assert len(kept) < len(TINY) and all(sha(data) in kept for data in TINY[:len(kept)])


def test_forged_packed_content_is_refused(store: ObjectStore) -> None:
    message = packed_message(TINY)
    forged = b"".join(TINY).replace(b"tiny object 7", b"tiny object X")
    message.packed = zstandard.ZstdCompressor().compress(forged)
    kept = refused(store, message, "does not match its hash")
    assert sorted(kept) == sorted(map(sha, TINY[:7]))  # those before the forged one


def test_a_piece_with_packed_and_own_data_is_refused(store: ObjectStore) -> None:
    message = packed_message(TINY)
    message.chunks[0].data = b"x"
    assert refused(store, message, "both packed and own data") == []


def test_a_packed_piece_outside_a_packed_message_is_refused(store: ObjectStore) -> None:
    receiver = ObjectReceiver(store)
    with pytest.raises(FleetError, match="outside its message"):
        receiver.feed(objectserver_pb2.ObjectChunk(hash=sha(b"abc"), size=3, packed_length=3))
    receiver.close(strict=False)
    assert list(store) == [] and tmp_files(store) == []


# ---------------------------------------------------------------- message chunks


@pytest.mark.parametrize("size", [0, 1, MiB, 5 * MiB // 2])
def test_split_and_join(size: int) -> None:
    data = os.urandom(size)
    pieces = [wire(c) for c in split_message(data)]
    assert len(pieces) == max(1, -(-size // CHUNK_SIZE))
    assert all(len(p.data) <= CHUNK_SIZE for p in pieces)
    assert join_chunks(pieces) == data
    assert join_chunks(iter(pieces), limit=size) == data

    async def stream():
        for piece in pieces:
            yield piece

    assert asyncio.run(join_chunks_async(stream())) == data


def test_join_limit_enforced() -> None:
    data = os.urandom(MiB + 10)
    with pytest.raises(FleetError, match="limit"):
        join_chunks(split_message(data), limit=MiB + 9)

    async def stream():
        for piece in split_message(data):
            yield piece

    with pytest.raises(FleetError, match="limit"):
        asyncio.run(join_chunks_async(stream(), limit=MiB))
    consumed = []

    def lazy():
        for piece in split_message(os.urandom(4 * MiB)):
            consumed.append(piece)
            yield piece

    with pytest.raises(FleetError):
        join_chunks(lazy(), limit=MiB)
    assert len(consumed) == 2  # refused as soon as the limit is passed
