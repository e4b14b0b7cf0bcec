"""Write-through: `image add` sent to a replica. The replica sends its upstream the
objects the upstream lacks, then forwards the image (an upstream that is itself a
replica writes it through again), and commits it locally only once the upstream
accepted it. The upstream's refusal reaches the caller as the upstream said it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from fleetlib.errors import ExistsError, FleetError, NotFoundError, PreconditionError
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.image import Image
from fleetlib.rpc.chunks import split_message
from fleetlib.rpc.objects import object_chunks, pack
from fleetlib.rpc.tls import call_timeout
from fleetlib.signing import manifest_digest
from fleetlib.wire import objectserver_pb2
from fleetlib.wire.codec import image_to_proto
from imageserver.pullthrough import UNREACHABLE, PullThrough, unreachable, upstream_sizes
from imageserver.store import ImageStore
from imageserver.upstream import Upstream

log = logging.getLogger(__name__)


class Refused(Exception):
    """The upstream refused: its status and message, for the caller as they are."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _upstream_failure(upstream: Upstream, doing: str, err: grpc.RpcError) -> Exception:
    if err.code() in UNREACHABLE:
        return unreachable(upstream, doing, err)
    return Refused(err.code(), err.details() or err.code().name)


async def _stored_pieces(store: ImageStore, hashes: list[bytes]
                         ) -> AsyncIterator[objectserver_pb2.ObjectChunks]:
    """The AddObjects stream of HASHES from the local store, read on a worker thread."""

    def pieces() -> Iterator[objectserver_pb2.ObjectChunk]:
        for digest in hashes:
            size = store.objects.size_of(digest)
            if not size:
                raise FleetError(f"object {format_hash(digest)} vanished from this server")
            with store.objects.open(digest) as reader:
                yield from object_chunks(digest, size, reader)

    messages = pack(pieces())
    while (message := await asyncio.to_thread(next, messages, None)) is not None:
        yield message


async def push_objects(store: ImageStore, upstream: Upstream, wanted: dict[bytes, int]
                       ) -> tuple[int, int]:
    """Send the upstream those of WANTED (hash -> size) it lacks: (objects, bytes) sent."""
    held = await upstream_sizes(upstream, list(wanted), call_timeout())
    absent = [digest for digest in wanted if digest not in held]
    if absent:
        try:
            await upstream.objects.AddObjects(_stored_pieces(store, absent))
        except grpc.RpcError as err:
            raise _upstream_failure(upstream, "send it the image's objects", err) from None
    return len(absent), sum(wanted[digest] for digest in absent)


async def write_through(store: ImageStore, upstream: Upstream, pull: PullThrough,
                        image: Image) -> tuple[int, int]:
    """Add IMAGE (validated and signature-checked) through the upstream, then here:
    (objects, bytes) sent upstream. Refused (upstream's answer), FleetError otherwise."""
    if image.name in store.images:
        raise ExistsError(f"image {image.name} already exists on this replica (images are "
                          "immutable)")
    wanted = image.tree.object_sizes()
    try:  # what the caller did not send because the upstream holds it
        await pull.ensure(wanted)
    except NotFoundError as err:
        raise PreconditionError(f"image {image.name}: {err}") from None
    if not image.created_unix:  # stamped here, so the upstream and this copy agree
        image.created_unix = int(time.time())
    sent = await push_objects(store, upstream, wanted)
    data = image_to_proto(image).SerializeToString(deterministic=True)
    try:
        await upstream.images.AddImage(split_message(data))
    except grpc.RpcError as err:
        raise _upstream_failure(upstream, f"write image {image.name} through", err) from None
    try:
        store.add(image)
    except ExistsError:  # replication brought the upstream's copy first
        held_info = store.images.get(image.name)
        if held_info is None or held_info.digest != manifest_digest(image):
            raise
    except FleetError as err:  # the fleet has it: replication brings it here later
        log.error("image %s was written through to %s but not stored here: %s", image.name,
                  upstream.address, err)
    return sent
