"""A synchronous client of the image server: what the CLI, subd and the dominator
use to check, upload and fetch objects, to add, read and delete images, to wait
for one and to change when one expires.

No call waits forever: unary calls have a default deadline (`fleetlib.rpc.deadline`);
the streams, whose length depends on the data, rely on the channel's keepalive, which
fails them once the connection goes silent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING

import grpc

from fleetlib.errors import UnavailableError
from fleetlib.rpc.chunks import join_chunks, split_message
from fleetlib.rpc.deadline import with_default_deadline
from fleetlib.rpc.ports import IMAGESERVER_PORT
from fleetlib.rpc.tls import Security, open_channel, parse_address
from fleetlib.wire import (
    imageserver_pb2,
    imageserver_pb2_grpc,
    objectserver_pb2,
    objectserver_pb2_grpc,
)

# The tree library, object streams and image codec are imported by the methods that
# move objects or images: a command that only lists images (`dominator image list`)
# starts without them.
if TYPE_CHECKING:
    from fleetlib.fstree.image import Image
    from fleetlib.fstree.objectstore import ObjectStore
    from fleetlib.fstree.source import Source
    from fleetlib.rpc.objects import ReceiveStats, Sink

log = logging.getLogger(__name__)

DEFAULT_PORT = IMAGESERVER_PORT
CHECK_BATCH = 16384
UPLOAD_STREAMS = 4

Progress = Callable[[int], None]


class ImageServerClient:
    """One connection to an image server."""

    def __init__(self, address: str, security: Security) -> None:
        self.address = parse_address(address, DEFAULT_PORT)
        self.channel = open_channel(self.address, security, "imageserver")
        unary_deadlines = with_default_deadline(self.channel)
        self.images = imageserver_pb2_grpc.ImageServerStub(unary_deadlines)
        self.objects = objectserver_pb2_grpc.ObjectServerStub(unary_deadlines)

    def close(self) -> None:
        """Close the connection."""
        self.channel.close()

    def __enter__(self) -> ImageServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def missing(self, wanted: dict[bytes, int]) -> dict[bytes, int]:
        """The subset of `wanted` (hash -> size) the server does not hold."""
        hashes = list(wanted)
        absent: dict[bytes, int] = {}
        for start in range(0, len(hashes), CHECK_BATCH):
            batch = hashes[start:start + CHECK_BATCH]
            reply = self.objects.CheckObjects(objectserver_pb2.CheckObjectsRequest(hashes=batch))
            absent.update((h, wanted[h]) for h, ok in zip(batch, reply.present, strict=True)
                          if not ok)
        return absent

    def upload(self, source: Source, wanted: Collection[bytes],
               progress: Progress | None = None, streams: int = UPLOAD_STREAMS) -> int:
        """Send the wanted objects of `source`, over several streams at once when the
        source allows it; returns the number of objects the server added."""
        from fleetlib.rpc.objects import object_chunks, pack

        items = source.iter_objects(wanted)
        lock = threading.Lock()

        def pieces() -> Iterator[objectserver_pb2.ObjectChunk]:
            while True:
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                digest, size, opener = item
                with opener() as reader:  # a sequential source waits here: one stream
                    for piece in object_chunks(digest, size, reader):
                        if progress:
                            progress(len(piece.data))
                        yield piece

        calls = [self.objects.AddObjects.future(pack(pieces()))
                 for _ in range(streams if source.parallel else 1)]
        try:
            return sum(call.result().added for call in calls)
        finally:
            for call in calls:  # after a refusal, stop the other streams too
                call.cancel()

    def fetch(self, hashes: list[bytes], store: ObjectStore | Sink,
              progress: Progress | None = None) -> ReceiveStats:
        """Download objects into `store` (or another sink: `image get` writes them into
        their files), verifying every one."""
        from fleetlib.rpc.objects import ObjectReceiver

        receiver = ObjectReceiver(store)
        try:
            request = objectserver_pb2.GetObjectsRequest(hashes=hashes)
            for message in self.objects.GetObjects(request):
                receiver.feed_message(message)
                if progress:
                    progress(sum(len(chunk.data) for chunk in message.chunks))
            receiver.close()
        finally:
            receiver.close(strict=False)
        return receiver.stats

    def add_image(self, image: Image) -> None:
        """Store an image whose objects the server already holds."""
        from fleetlib.wire.codec import image_to_proto

        data = image_to_proto(image).SerializeToString()
        self.images.AddImage(split_message(data))

    def get_image(self, name: str) -> Image:
        """Read and validate an image."""
        from fleetlib.wire.codec import image_from_proto

        chunks = self.images.GetImage(imageserver_pb2.GetImageRequest(name=name))
        return image_from_proto(imageserver_pb2.Image.FromString(join_chunks(chunks)))

    def list_images(self, prefix: str = "") -> list[imageserver_pb2.ImageSummary]:
        """Summaries of the images whose names start with `prefix`."""
        return list(self.listing(prefix).images)

    def listing(self, prefix: str = "") -> imageserver_pb2.ListImagesResponse:
        """ListImages' whole answer: the summaries, and what a replica quarantined."""
        reply: imageserver_pb2.ListImagesResponse = self.images.ListImages(
            imageserver_pb2.ListImagesRequest(prefix=prefix))
        return reply

    def delete_image(self, name: str, replica_only: bool = False
                     ) -> imageserver_pb2.DeleteImageResponse:
        """Delete an image; the server frees objects no other image needs. REPLICA_ONLY:
        a replica's own copy only (the master keeps it)."""
        reply: imageserver_pb2.DeleteImageResponse = self.images.DeleteImage(
            imageserver_pb2.DeleteImageRequest(name=name, replica_only=replica_only))
        return reply

    def image_exists(self, name: str) -> bool:
        """Whether the server holds an image of that name."""
        reply: imageserver_pb2.CheckImageResponse = self.images.CheckImage(
            imageserver_pb2.CheckImageRequest(name=name))
        return reply.exists

    def wait_for_image(self, name: str, timeout: float | None = None) -> bool:
        """Block until the server holds image NAME: True, or False after `timeout`
        seconds (None: no limit). Asks once, then follows the server's stream of
        changes (no polling); grpc.RpcError when the server cannot be reached."""
        if self.image_exists(name):
            return True
        # include_existing: an image added between the check and the watch is announced.
        events = self.images.WatchImages(
            imageserver_pb2.WatchImagesRequest(include_existing=True), timeout=timeout)
        try:
            for event in events:
                if event.kind == imageserver_pb2.ImageEvent.ADDED and event.name == name:
                    return True
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False
            raise
        finally:
            events.cancel()
        raise UnavailableError(f"the image server at {self.address} stopped its stream of "
                               "changes (restarting?): retry")

    def set_expiry(self, name: str, expires_unix: int
                   ) -> imageserver_pb2.SetImageExpiryResponse:
        """Make image NAME expire at `expires_unix` (0: never)."""
        reply: imageserver_pb2.SetImageExpiryResponse = self.images.SetImageExpiry(
            imageserver_pb2.SetImageExpiryRequest(name=name, expires_unix=expires_unix))
        return reply

