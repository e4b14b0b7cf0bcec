"""The ObjectServer and ImageServer gRPC services over an ImageStore."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import zstandard
from google.protobuf.message import DecodeError

from fleetlib.audit import caller
from fleetlib.auditlog import AuditLog
from fleetlib.errors import FleetError, NotFoundError, PreconditionError, UnavailableError
from fleetlib.fstree.hashing import check_hash, format_hash
from fleetlib.rpc.chunks import join_chunks_async, split_message
from fleetlib.rpc.objects import (
    PACK_LEVEL,
    ObjectReceiver,
    object_chunks,
    on_thread,
    pack,
    pack_compressed,
    wire_size,
)
from fleetlib.rpc.status import abort
from fleetlib.rpc.tls import call_timeout
from fleetlib.signing import check_self_signed
from fleetlib.wire import (
    audit_pb2,
    imageserver_pb2,
    imageserver_pb2_grpc,
    objectserver_pb2,
    objectserver_pb2_grpc,
)
from fleetlib.wire.codec import image_from_proto
from fleetlib.wire.tree_pb2 import Chunk
from imageserver.feed import ReplicaRegistry, feed, list_replicas
from imageserver.pullthrough import PullThrough, Waiting, arrivals, upstream_sizes
from imageserver.store import ImageStore
from imageserver.upstream import Upstream
from imageserver.writethrough import Refused, write_through

log = logging.getLogger(__name__)

MAX_HASHES_PER_REQUEST = 1 << 20
EXPIRY = "imageserver (expiry)"  # who deletes an expired image, in the audit log


def _check_hashes(hashes: Sequence[bytes]) -> None:
    if len(hashes) > MAX_HASHES_PER_REQUEST:
        raise FleetError(f"too many hashes in one request ({len(hashes)})")
    for digest in hashes:
        check_hash(digest)


class ObjectService(objectserver_pb2_grpc.ObjectServerServicer):
    """Receives verified objects and serves them back."""

    def __init__(self, store: ImageStore, upstream: Upstream | None = None) -> None:
        self.store = store
        self.upstream = upstream  # a replica's upstream; None on a master
        # What a replica lacks comes from its upstream (GetObjects, and image adds).
        self.pullthrough = PullThrough(store, upstream) if upstream is not None else None
        # Totals since start, for metrics.
        self.received_bytes = 0  # object bytes arriving in AddObjects (as sent)
        self.added_bytes = 0  # bytes of objects new to the store
        self.served_objects = 0
        self.served_bytes = 0  # object bytes sent by GetObjects (before compression)
        self.served_wire_bytes = 0  # as sent (compressed where asked)

    async def AddObjects(self, request_iterator: AsyncIterator[objectserver_pb2.ObjectChunks],
                         context: grpc.aio.ServicerContext) -> objectserver_pb2.AddObjectsResponse:
        receiver = ObjectReceiver(self.store.objects)
        try:
            async for message in request_iterator:
                receiver.feed_message(message)
            receiver.close()
        except FleetError as err:
            log.warning("refused objects from %s: %s", context.peer(), err)
            await abort(context, err)
        finally:
            with contextlib.suppress(FleetError):  # the call failed already: say why once
                receiver.close(strict=False)  # keep what arrived whole: a retry resumes
            self.received_bytes += receiver.stats.wire_bytes
            self.added_bytes += receiver.stats.bytes_added
        stats = receiver.stats
        return objectserver_pb2.AddObjectsResponse(
            added=stats.added, already_present=stats.already_present,
            bytes_added=stats.bytes_added)

    async def CheckObjects(self, request: objectserver_pb2.CheckObjectsRequest,
                           context: grpc.aio.ServicerContext
                           ) -> objectserver_pb2.CheckObjectsResponse:
        try:
            _check_hashes(request.hashes)
        except FleetError as err:
            await abort(context, err)
        sizes = [self.store.objects.size_of(digest) or 0 for digest in request.hashes]
        self.store.keep_alive([digest for digest, size in zip(request.hashes, sizes,
                                                              strict=True) if size])
        if self.upstream is not None and not all(sizes):
            sizes = await self._with_upstream(request.hashes, sizes)
        return objectserver_pb2.CheckObjectsResponse(
            present=[size > 0 for size in sizes], sizes=sizes)

    async def _with_upstream(self, hashes: Sequence[bytes], sizes: list[int]) -> list[int]:
        """A replica's answer: what it lacks counts as present when its upstream holds
        it (GetObjects pulls it through); its own answer alone if the upstream is down."""
        assert self.upstream is not None
        absent = [digest for digest, size in zip(hashes, sizes, strict=True) if not size]
        try:  # a share of the caller's deadline: its answer must still arrive in time
            held = await upstream_sizes(self.upstream, absent, call_timeout() / 3)
        except UnavailableError as err:
            log.warning("answering CheckObjects from this server alone: %s", err)
            return sizes
        return [size or held.get(digest, 0) for digest, size in zip(hashes, sizes, strict=True)]

    async def GetObjects(self, request: objectserver_pb2.GetObjectsRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[objectserver_pb2.ObjectChunks]:
        waiting: Waiting = {}
        try:
            _check_hashes(request.hashes)
            missing = [d for d in request.hashes if not self.store.objects.has(d)]
            if missing and self.pullthrough is None:
                raise NotFoundError(f"{len(missing)} object(s) not stored, e.g. "
                                    f"{format_hash(missing[0])}")
            if missing and self.pullthrough is not None:
                waiting = self.pullthrough.pull(missing)
        except FleetError as err:
            await abort(context, err)
        try:  # what is here first, then what the upstream sends as it arrives
            present = [digest for digest in request.hashes if digest not in waiting]
            async for message in on_thread(self._messages(present, request)):
                yield message
            async for arrived in arrivals(waiting):
                async for message in on_thread(self._messages(arrived, request)):
                    yield message
        except FleetError as err:  # an object deleted since the check above, or not pulled
            await abort(context, err)

    def _messages(self, hashes: Sequence[bytes], request: objectserver_pb2.GetObjectsRequest
                  ) -> Iterator[objectserver_pb2.ObjectChunks]:
        """The stream messages of HASHES, compressed as REQUEST asks."""
        if request.compress and request.pack:
            messages = pack_compressed(self._pieces(hashes, None),
                                       zstandard.ZstdCompressor(level=PACK_LEVEL))
        else:
            compressor = zstandard.ZstdCompressor(level=3) if request.compress else None
            messages = pack(self._pieces(hashes, compressor))
        for message in messages:
            self.served_wire_bytes += wire_size(message)
            yield message

    @property
    def pulled_objects(self) -> int:
        """Objects this replica pulled through from its upstream (0 on a master)."""
        return self.pullthrough.pulled_objects if self.pullthrough else 0

    @property
    def pulled_bytes(self) -> int:
        """Bytes of those objects."""
        return self.pullthrough.pulled_bytes if self.pullthrough else 0

    @property
    def shared_fetch_objects(self) -> int:
        """Waits of replication or a caller for an object the other was fetching."""
        return self.pullthrough.shared_objects if self.pullthrough else 0

    def _pieces(self, hashes: Sequence[bytes], compressor: zstandard.ZstdCompressor | None
                ) -> Iterator[objectserver_pb2.ObjectChunk]:
        for digest in hashes:
            with self.store.objects.open(digest) as reader:
                size = os.fstat(reader.fileno()).st_size
                yield from object_chunks(digest, size, reader, compressor)
                self.served_objects += 1
                self.served_bytes += size


def _when(unix: int) -> str:
    """A point in time for an audit summary."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix))


class ImageService(imageserver_pb2_grpc.ImageServerServicer):
    """Adds, lists, serves, deletes and announces images and changes their expiry;
    adds, deletes and expiry changes go to the audit log, which ListAudit serves."""

    def __init__(self, store: ImageStore, audit: AuditLog, location: str = "",
                 upstream: Upstream | None = None, pullthrough: PullThrough | None = None
                 ) -> None:
        self.store = store
        self.audit = audit
        self.location = location  # where this server stands, told in ListImages
        self.upstream = upstream  # a replica's upstream; None on a master
        if upstream is not None and pullthrough is None:
            pullthrough = PullThrough(store, upstream)
        self.pullthrough = pullthrough  # a replica's, shared with its ObjectService
        self.replicas = ReplicaRegistry()  # the servers following this one

    async def AddImage(self, request_iterator: AsyncIterator[Chunk],
                       context: grpc.aio.ServicerContext) -> imageserver_pb2.AddImageResponse:
        try:
            data = await join_chunks_async(request_iterator)
            image = image_from_proto(imageserver_pb2.Image.FromString(data))
            await asyncio.to_thread(check_self_signed, image)
            if self.upstream is None:
                self.store.add(image)
            else:
                assert self.pullthrough is not None
                await write_through(self.store, self.upstream, self.pullthrough, image)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed image message")
        except Refused as err:  # the upstream's answer, as it gave it
            log.warning("upstream refused image %s from %s: %s", image.name, caller(context),
                        err.details)
            await context.abort(err.code, err.details)
        except FleetError as err:
            await abort(context, err)
        expires = f", expires {_when(image.expires_unix)}" if image.expires_unix else ""
        through = f", written through to {self.upstream.master()}" if self.upstream else ""
        await asyncio.to_thread(
            self.audit.record, caller(context), "image.add",
            f"added image {image.name}{expires}{through}",
            image=image.name, inodes=len(image.tree.inodes), bytes=image.tree.total_bytes(),
            expires_unix=image.expires_unix)
        return imageserver_pb2.AddImageResponse(name=image.name)

    async def GetImage(self, request: imageserver_pb2.GetImageRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Chunk]:
        try:
            data = self.store.read(request.name)
        except FleetError as err:
            await abort(context, err)
        for chunk in split_message(data):
            yield chunk

    async def ListImages(self, request: imageserver_pb2.ListImagesRequest,
                         context: grpc.aio.ServicerContext
                         ) -> imageserver_pb2.ListImagesResponse:
        return imageserver_pb2.ListImagesResponse(
            images=[info.summary() for info in self.store.list(request.prefix)],
            location=self.location,
            quarantined=[entry for name, entry in sorted(self.store.quarantined.items())
                         if name.startswith(request.prefix)],
            upstream=self.upstream.address if self.upstream else "")

    def _check_master(self, change: str, instead: str = "") -> None:
        """Refuse CHANGE here on a replica: it is made on the master, and replicated."""
        if self.upstream is not None:
            raise PreconditionError(f"this image server is a replica of "
                                    f"{self.upstream.master()}: {change} on the master{instead}")

    async def DeleteImage(self, request: imageserver_pb2.DeleteImageRequest,
                          context: grpc.aio.ServicerContext
                          ) -> imageserver_pb2.DeleteImageResponse:
        try:
            if not request.replica_only:
                self._check_master("delete images",
                                   " (or --replica-only to drop this replica's copy)")
            elif self.upstream is None:
                raise PreconditionError(f"this image server is a master, not a replica: "
                                        f"--replica-only drops only a replica's copy; leave it "
                                        f"out to delete image {request.name}")
            quarantined = request.replica_only and request.name in self.store.quarantined
            freed, freed_bytes = self.store.discard_quarantined(request.name) if quarantined \
                else self.store.delete(request.name)
        except FleetError as err:
            await abort(context, err)
        summary = f"deleted image {request.name}"
        if self.upstream is not None:  # replica-only: the master keeps it
            copy = "quarantined copy" if quarantined else "copy"
            summary = f"deleted this replica's {copy} of image {request.name} (replica-only; " \
                f"{self.upstream.master()} keeps the image)"
        await asyncio.to_thread(
            self.audit.record, caller(context), "image.delete", summary,
            image=request.name, objects_freed=freed, bytes_freed=freed_bytes,
            **({"replica_only": True} if request.replica_only else {}))
        return imageserver_pb2.DeleteImageResponse(objects_freed=freed, bytes_freed=freed_bytes)

    async def CheckImage(self, request: imageserver_pb2.CheckImageRequest,
                         context: grpc.aio.ServicerContext
                         ) -> imageserver_pb2.CheckImageResponse:
        return imageserver_pb2.CheckImageResponse(exists=request.name in self.store.images)

    async def WatchImages(self, request: imageserver_pb2.WatchImagesRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[imageserver_pb2.ImageEvent]:
        queue = self.store.watch()
        try:
            if request.include_existing:
                for name in sorted(self.store.images):
                    yield imageserver_pb2.ImageEvent(
                        kind=imageserver_pb2.ImageEvent.ADDED, name=name)
            while True:
                yield await queue.get()
        finally:
            self.store.unwatch(queue)

    async def ListAudit(self, request: audit_pb2.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> audit_pb2.ListAuditResponse:
        return await asyncio.to_thread(self.audit.list_response, request)

    async def SetImageExpiry(self, request: imageserver_pb2.SetImageExpiryRequest,
                             context: grpc.aio.ServicerContext
                             ) -> imageserver_pb2.SetImageExpiryResponse:
        try:
            self._check_master("change when images expire")
            info, previous = self.store.set_expiry(request.name, request.expires_unix)
        except FleetError as err:
            await abort(context, err)
        summary = f"image {info.name} now expires {_when(info.expires_unix)}" \
            if info.expires_unix else f"image {info.name} now never expires"
        await asyncio.to_thread(
            self.audit.record, caller(context), "image.set-expiry", summary, image=info.name,
            expires_unix=info.expires_unix, previous_expires_unix=previous)
        return imageserver_pb2.SetImageExpiryResponse(image=info.summary(),
                                                      previous_expires_unix=previous)

    async def Replicate(self, request_iterator: AsyncIterator[imageserver_pb2.ReplicateRequest],
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[imageserver_pb2.ReplicateResponse]:
        async for response in feed(self.store, self.replicas, self.upstream, request_iterator,
                                   context):
            yield response

    async def ListReplicas(self, request: imageserver_pb2.ListReplicasRequest,
                           context: grpc.aio.ServicerContext
                           ) -> imageserver_pb2.ListReplicasResponse:
        return list_replicas(self.store, self.replicas, self.location, self.upstream)


async def expire_images(store: ImageStore, audit: AuditLog, interval: float = 1.0) -> None:
    """Delete expired images every `interval` seconds, for the server's lifetime
    (each one in the audit log)."""
    while True:
        for name in store.expire():
            log.info("image %s expired", name)
            await asyncio.to_thread(audit.record, EXPIRY, "image.expire",
                                    f"deleted image {name}: it expired", image=name)
        await asyncio.sleep(interval)


async def collect_orphans(store: ImageStore, grace: float, interval: float) -> None:
    """Every `interval` seconds, delete the objects no image references that are
    untouched for `grace` seconds: found on a worker thread, removed here, where
    images are added."""
    while True:
        await asyncio.sleep(interval)
        older_than = time.time() - grace
        try:
            candidates = await asyncio.to_thread(store.orphans, older_than)
            store.remove_orphans(candidates, older_than)
        except OSError as err:  # try again next time; serving goes on
            log.error("collecting orphaned objects failed: %s", err)
