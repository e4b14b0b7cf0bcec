"""The image server's state: images (immutable, crash-safe files) and the objects
they reference, with reference counts so deleting an image frees exactly the
objects no other image needs.

Layout under the state directory:
  objects/ab/cd/<hex>         content (fstree.objectstore)
  images/<name>/.image        one serialized `fleet.Image` per image; names may
                              hold `/` (image streams), and no name component
                              starts with ".", so no image file collides with a
                              stream's folder

An image's tree, filter, triggers and computed files never change; its expiry is
metadata, changed (`set_expiry`) by rewriting its file the same crash-safe way.

Objects no image references (uploaded for an image never committed) are
collected once untouched for a grace period; an upload that finds one present
(CheckObjects) restarts its grace period, so the image it then adds is whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from fleetlib.errors import ExistsError, FleetError, NotFoundError, PreconditionError
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.image import Image, check_image_name
from fleetlib.fstree.objectstore import (
    ObjectStore,
    check_free_space,
    fsync_directory,
    space_error,
    write_file_atomically,
)
from fleetlib.signing import manifest_digest
from fleetlib.wire import imageserver_pb2
from fleetlib.wire.codec import image_from_proto, image_to_proto

log = logging.getLogger(__name__)

IMAGE_FILE = ".image"
MAX_UNIX = 253402300799  # 9999-12-31 23:59:59 UTC: the last time every client can print


@dataclass(frozen=True)
class ImageInfo:
    """What the server keeps in memory per image (the tree stays on disk)."""

    name: str
    created_unix: int
    expires_unix: int
    inodes: int
    total_bytes: int
    objects: frozenset[bytes]
    digest: bytes  # fleetlib.signing.manifest_digest: the content the name is bound to

    def summary(self) -> imageserver_pb2.ImageSummary:
        """The wire summary for ListImages."""
        return imageserver_pb2.ImageSummary(
            name=self.name, created_unix=self.created_unix, expires_unix=self.expires_unix,
            inodes=self.inodes, total_bytes=self.total_bytes)


def _check_time(name: str, label: str, when: int) -> None:
    if not 0 <= when <= MAX_UNIX:
        raise FleetError(f"image {name}: {label} time {when} is not between 0 and "
                         f"{MAX_UNIX} (unix seconds)")


def _info(image: Image) -> ImageInfo:
    return ImageInfo(image.name, image.created_unix, image.expires_unix,
                     len(image.tree.inodes), image.tree.total_bytes(),
                     frozenset(image.tree.object_sizes()), manifest_digest(image))


class ImageStore:
    """Images and objects of one image server."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.objects = ObjectStore(self.state_dir / "objects")
        self.images_dir = self.state_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.images: dict[str, ImageInfo] = {}
        self.refcounts: Counter[bytes] = Counter()
        self.unreadable = 0  # image files `load` skipped: their objects are not orphans
        # A replica's copies whose content differs from upstream's, moved aside, by name.
        self.quarantined: dict[str, imageserver_pb2.QuarantinedImage] = {}
        self._watchers: set[asyncio.Queue[imageserver_pb2.ImageEvent]] = set()

    def load(self) -> None:
        """Recover from any crash and load every stored image."""
        self.objects.recover()
        for path in sorted(self.images_dir.rglob("*")):
            if path.name.startswith(".tmp."):
                path.unlink()  # an image write that never reached its rename
                continue
            if path.name != IMAGE_FILE or not path.is_file():
                continue
            try:
                image = image_from_proto(imageserver_pb2.Image.FromString(path.read_bytes()))
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the server
                log.error("skipping unreadable image file %s: %s", path, err)
                self.unreadable += 1
                continue
            self._remember(_info(image))
        log.info("loaded %d image(s) referencing %d object(s)", len(self.images),
                 len(self.refcounts))

    def _path(self, name: str) -> Path:
        return self.images_dir / check_image_name(name) / IMAGE_FILE

    def _remember(self, info: ImageInfo) -> None:
        self.images[info.name] = info
        self.refcounts.update(info.objects)

    def add(self, image: Image) -> None:
        """Store a new image; refused when the name exists or an object is missing."""
        if image.name in self.images:
            raise ExistsError(f"image {image.name} already exists (images are immutable)")
        missing = [digest for digest in image.tree.object_sizes()
                   if not self.objects.has(digest)]
        if missing:
            raise PreconditionError(f"image {image.name} names {len(missing)} object(s) the server "
                             f"does not hold, e.g. {format_hash(missing[0])}")
        for label, when in (("created", image.created_unix), ("expires", image.expires_unix)):
            _check_time(image.name, label, when)
        for computed in image.computed_files:
            if image.tree.lookup(computed.path) is None:
                raise FleetError(f"image {image.name}: computed file {computed.path} is not in "
                                 "the tree")
        if not image.created_unix:
            image.created_unix = int(time.time())
        self._write(image.name, image_to_proto(image).SerializeToString(deterministic=True))
        self._remember(_info(image))
        self._notify(imageserver_pb2.ImageEvent.ADDED, image.name)
        log.info("added image %s", image.name)

    def _write(self, name: str, data: bytes) -> None:
        """Write an image's file crash-safely: readers see the old file or the new one."""
        check_free_space(self.state_dir, len(data))
        try:
            write_file_atomically(self._path(name), data)
        except OSError as err:
            raise space_error(err, self.state_dir, f"image {name} ({len(data)} bytes)") \
                from None

    def set_expiry(self, name: str, expires_unix: int) -> tuple[ImageInfo, int]:
        """Make image NAME expire at `expires_unix` (0: never): (its new info, the
        previous expiry). Only this field of its file changes."""
        info = self.images.get(name)
        if info is None:
            raise NotFoundError(f"unknown image {name}")
        _check_time(name, "expires", expires_unix)
        message = imageserver_pb2.Image.FromString(self.read(name))
        message.expires_unix = expires_unix
        self._write(name, message.SerializeToString(deterministic=True))
        self.images[name] = replace(info, expires_unix=expires_unix)
        log.info("image %s now expires at %d (was %d; 0 is never)", name, expires_unix,
                 info.expires_unix)
        return self.images[name], info.expires_unix

    def read(self, name: str) -> bytes:
        """The serialized image; FleetError when unknown."""
        if name not in self.images:
            raise NotFoundError(f"unknown image {name}")
        return self._path(name).read_bytes()

    def delete(self, name: str) -> tuple[int, int]:
        """Delete an image and the objects only it referenced: (objects, bytes) freed."""
        info = self.images.get(name)
        if info is None:
            raise NotFoundError(f"unknown image {name}")
        path = self._path(name)
        os.unlink(path)
        fsync_directory(path.parent)
        del self.images[name]
        self.refcounts.subtract(info.objects)
        freed = freed_bytes = 0
        for digest in info.objects:
            if self.refcounts[digest] <= 0:
                del self.refcounts[digest]
                freed_bytes += self.objects.remove(digest)
                freed += 1
        self._remove_empty_parents(path.parent)
        self._notify(imageserver_pb2.ImageEvent.DELETED, name)
        log.info("deleted image %s, freeing %d object(s), %d bytes", name, freed, freed_bytes)
        return freed, freed_bytes

    def _remove_empty_parents(self, folder: Path) -> None:
        while folder != self.images_dir:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def expire(self, now: float | None = None) -> list[str]:
        """Delete every image whose expiry time has passed; returns their names."""
        now = time.time() if now is None else now
        expired = [i.name for i in self.images.values() if i.expires_unix and i.expires_unix <= now]
        for name in expired:
            self.delete(name)
        return expired

    def orphans(self, older_than: float) -> list[bytes]:
        """Objects no image references whose last write (or `keep_alive`) is older than
        the unix time `older_than`. Reads only: may run on another thread than the
        one changing images, as `remove_orphans` checks again."""
        found = []
        for digest in self.objects:
            if self.refcounts.get(digest, 0) > 0:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.objects.path_of(digest)).st_mtime < older_than:
                    found.append(digest)
        return found

    def remove_orphans(self, candidates: list[bytes], older_than: float) -> tuple[int, int]:
        """Delete those `orphans` still unreferenced and untouched since `older_than`:
        (objects, bytes) freed. Runs where images are added, so none can claim one
        of them meanwhile."""
        if self.unreadable:
            log.warning("not collecting orphaned objects: %d image file(s) could not be read "
                        "and may reference them", self.unreadable)
            return 0, 0
        freed = freed_bytes = 0
        for digest in candidates:
            if self.refcounts.get(digest, 0) > 0:
                continue
            try:
                if os.stat(self.objects.path_of(digest)).st_mtime >= older_than:
                    continue
            except FileNotFoundError:
                continue
            freed_bytes += self.objects.remove(digest)
            freed += 1
        if freed:
            log.info("freed %d orphaned object(s), %d bytes (referenced by no image, "
                     "untouched since %s)", freed, freed_bytes,
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(older_than)))
        return freed, freed_bytes

    def collect_orphans(self, grace: float, now: float | None = None) -> tuple[int, int]:
        """Delete every object no image references, untouched for `grace` seconds."""
        older_than = (time.time() if now is None else now) - grace
        return self.remove_orphans(self.orphans(older_than), older_than)

    def keep_alive(self, hashes: list[bytes]) -> None:
        """Restart the grace period of the stored objects among `hashes` that no image
        references: an upload found them present and will not send them again."""
        for digest in hashes:
            if self.refcounts.get(digest, 0) <= 0:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.objects.path_of(digest))

    def list(self, prefix: str = "") -> list[ImageInfo]:
        """Images whose names start with `prefix`, sorted by name."""
        return [self.images[n] for n in sorted(self.images) if n.startswith(prefix)]

    def watch(self) -> asyncio.Queue[imageserver_pb2.ImageEvent]:
        """A queue that receives every later add and delete."""
        queue: asyncio.Queue[imageserver_pb2.ImageEvent] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[imageserver_pb2.ImageEvent]) -> None:
        """Stop delivering events to `queue`."""
        self._watchers.discard(queue)

    def _notify(self, kind: imageserver_pb2.ImageEvent.Kind, name: str) -> None:
        event = imageserver_pb2.ImageEvent(kind=kind, name=name)
        for queue in self._watchers:
            queue.put_nowait(event)
