"""The image server's state: images (immutable, crash-safe files) and the objects
they reference, with reference counts so deleting an image frees exactly the
objects no other image needs.

Layout under the state directory:
  objects/ab/cd/<hex>         content (fstree.objectstore)
  images/<name>/.image        one serialized `fleet.Image` per image; names may
                              hold `/` (image streams), and no name component
                              starts with ".", so no image file collides with a
                              stream's folder
  quarantine/<name>/.<local>-<upstream>
                              a replica's copy whose digest differs from its
                              upstream's (hex digests), moved aside, never served
  journal.sqlite              identity, ordered change log, tombstones, a
                              follower's position (imageserver/journal.py)

Every visible change (add, delete, expiry, quarantine) appends to the journal after
its file write; `load` reconciles the two, so a crash between them heals. A name is
bound to one content forever: `add` refuses a name that exists, or that was deleted
while bound to another digest.

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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fleetlib.errors import ExistsError, FleetError, NotFoundError, PreconditionError
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.image import Image
from fleetlib.fstree.imagename import check_image_name
from fleetlib.fstree.objectstore import (
    ObjectStore,
    check_free_space,
    fsync_directory,
    space_error,
    write_file_atomically,
)
from fleetlib.signing import manifest_digest, message_digest
from fleetlib.sql.engine import open_engine
from fleetlib.wire import imageserver_pb2
from fleetlib.wire.codec import image_from_proto, image_to_proto
from imageserver.journal import ADDED, DELETED, EXPIRY_CHANGED, Journal

log = logging.getLogger(__name__)

IMAGE_FILE = ".image"
QUARANTINE = "quarantine"
JOURNAL = "journal.sqlite"
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


def short(digest: bytes) -> str:
    """A digest as people compare them: its first 12 hex digits."""
    return digest.hex()[:12]


def _info(image: Image, digest: bytes) -> ImageInfo:
    return ImageInfo(image.name, image.created_unix, image.expires_unix,
                     len(image.tree.inodes), image.tree.total_bytes(),
                     frozenset(image.tree.object_sizes()), digest)


def check_replicated(message: imageserver_pb2.Image, digest: bytes) -> Image:
    """Decode and validate an image as upstream served it, bound to DIGEST as upstream
    announced it; PreconditionError when its content has another digest. Touches no
    store: may run on a thread while its objects arrive."""
    image = image_from_proto(message)
    served = message_digest(message)
    if served != digest:
        raise PreconditionError(f"image {image.name}: upstream served content with digest "
                                f"{short(served)}, its journal says {short(digest)}")
    return image


class ImageStore:
    """Images and objects of one image server."""

    def __init__(self, state_dir: Path, ident: str = "") -> None:
        """IDENT: the server identity a new journal takes (random when empty)."""
        self.state_dir = Path(state_dir)
        self.objects = ObjectStore(self.state_dir / "objects")
        self.images_dir = self.state_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.images: dict[str, ImageInfo] = {}
        self.refcounts: Counter[bytes] = Counter()
        self.unreadable = 0  # image files `load` skipped: their objects are not orphans
        # A replica's copies whose content differs from upstream's, moved aside, by name.
        self.quarantined: dict[str, imageserver_pb2.QuarantinedImage] = {}
        self.quarantine_dir = self.state_dir / QUARANTINE
        self._quarantined_objects: dict[Path, frozenset[bytes]] = {}  # kept referenced
        self._watchers: set[asyncio.Queue[imageserver_pb2.ImageEvent]] = set()
        self.journal = Journal(open_engine(str(self.state_dir / JOURNAL)), ident)

    def load(self) -> None:
        """Recover from any crash, load every stored and quarantined image, and bring
        the journal in line with the image files."""
        self.objects.recover()
        unreadable: set[str] = set()
        for path in sorted(self.images_dir.rglob("*")):
            if path.name.startswith(".tmp."):
                path.unlink()  # an image write that never reached its rename
                continue
            if path.name != IMAGE_FILE or not path.is_file():
                continue
            image = self._read_file(path)
            if image is None:
                unreadable.add(path.parent.relative_to(self.images_dir).as_posix())
                continue
            self._remember(_info(image, manifest_digest(image)))
        self._load_quarantine()
        self._reconcile(unreadable)
        self.journal.prune()
        log.info("loaded %d image(s) referencing %d object(s)", len(self.images),
                 len(self.refcounts))

    def _read_file(self, path: Path) -> Image | None:
        try:
            return image_from_proto(imageserver_pb2.Image.FromString(path.read_bytes()))
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the server
            log.error("skipping unreadable image file %s: %s", path, err)
            self.unreadable += 1
            return None

    def _load_quarantine(self) -> None:
        if not self.quarantine_dir.is_dir():
            return
        for path in sorted(self.quarantine_dir.rglob(".*")):
            if path.name.startswith(".tmp.") or not path.is_file():
                continue
            image = self._read_file(path)
            if image is None:
                continue
            upstream = bytes.fromhex(path.name[1:].partition("-")[2] or "00")
            self._keep_quarantined(path, image, upstream, int(path.stat().st_mtime))

    def _keep_quarantined(self, path: Path, image: Image, upstream: bytes, since: int) -> None:
        objects = frozenset(image.tree.object_sizes())
        self._quarantined_objects[path] = objects
        self.refcounts.update(objects)
        self.quarantined[image.name] = imageserver_pb2.QuarantinedImage(
            name=image.name, local_digest=manifest_digest(image), upstream_digest=upstream,
            since_unix=since)

    def _reconcile(self, unreadable: set[str]) -> None:
        """Journal what a crash left unjournaled: an image file without its live entry
        (ADDED, or EXPIRY_CHANGED), a live entry without its file (DELETED)."""
        live = self.journal.live()
        for name, info in sorted(self.images.items()):
            entry = live.get(name)
            if entry is None or entry.digest != info.digest:
                log.warning("journal: image %s was not journaled (a crash?): adding it", name)
                self.journal.append(ADDED, name, info.digest, info.expires_unix)
            elif entry.expires_unix != info.expires_unix:
                self.journal.append(EXPIRY_CHANGED, name, info.digest, info.expires_unix)
        for name, entry in sorted(live.items()):
            if name not in self.images and name not in unreadable:
                log.warning("journal: image %s is gone (a crash?): journaling its delete", name)
                self.journal.append(DELETED, name, entry.digest)

    def _path(self, name: str) -> Path:
        return self.images_dir / check_image_name(name) / IMAGE_FILE

    def _remember(self, info: ImageInfo) -> None:
        self.images[info.name] = info
        self.refcounts.update(info.objects)

    def add(self, image: Image) -> None:
        """Store a new image; refused when the name exists, was bound to another content
        (a tombstone), or an object is missing."""
        if not image.created_unix:
            image.created_unix = int(time.time())
        message = image_to_proto(image)  # encoded once: its digest and its file's bytes
        digest = message_digest(message)
        bound = self.journal.tombstone(image.name)
        if image.name not in self.images and bound is not None and bound != digest:
            raise ExistsError(
                f"image {image.name} existed with other content (digest {short(bound)}, "
                f"this one is {short(digest)}): a name is bound to one content forever; "
                "choose a new name")
        self._commit(image, message.SerializeToString(deterministic=True), digest)

    def add_replicated(self, data: bytes, digest: bytes, image: Image | None = None
                       ) -> ImageInfo:
        """Store an image exactly as upstream serialized it (DATA), bound to DIGEST as
        upstream announced it; refused when the name is held, or the content differs.
        IMAGE: what `check_replicated` made of DATA already."""
        if image is None:
            image = check_replicated(imageserver_pb2.Image.FromString(data), digest)
        return self._commit(image, data, digest)

    def missing_objects(self, sizes: Mapping[bytes, int]) -> dict[bytes, int]:
        """Those of the objects SIZES names (hash to size) the store lacks, in its
        order. An object an image holds is stored: only the others are looked for."""
        held = self.refcounts
        return {digest: size for digest, size in sizes.items()
                if held.get(digest, 0) <= 0 and not self.objects.has(digest)}

    def _commit(self, image: Image, data: bytes, digest: bytes) -> ImageInfo:
        """Check, write and journal a new image (DATA: its file's bytes, DIGEST: its
        manifest digest)."""
        if image.name in self.images:
            raise ExistsError(f"image {image.name} already exists (images are immutable)")
        # On disk, not by reference counts: an image is visible only once every object
        # it names is there, even one another image lost to outside damage.
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
        self._write(image.name, data)
        info = _info(image, digest)
        self._remember(info)
        self.journal.append(ADDED, info.name, info.digest, info.expires_unix)
        self._notify(imageserver_pb2.ImageEvent.ADDED, image.name)
        log.info("added image %s", image.name)
        return info

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
        self.journal.append(EXPIRY_CHANGED, name, info.digest, expires_unix)
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
        self._forget(info)
        freed, freed_bytes = self._release(info.objects)
        self._remove_empty_parents(path.parent, self.images_dir)
        log.info("deleted image %s, freeing %d object(s), %d bytes", name, freed, freed_bytes)
        return freed, freed_bytes

    def delete_if(self, name: str, digest: bytes) -> bool:
        """Delete image NAME if it is bound to DIGEST (a replica applying its upstream's
        delete); False when it is not held, or holds other content."""
        info = self.images.get(name)
        if info is None or info.digest != digest:
            return False
        self.delete(name)
        return True

    def _forget(self, info: ImageInfo) -> None:
        """Stop serving an image whose file is gone: journal and announce it."""
        del self.images[info.name]
        self.journal.append(DELETED, info.name, info.digest)
        self._notify(imageserver_pb2.ImageEvent.DELETED, info.name)

    def _release(self, objects: frozenset[bytes]) -> tuple[int, int]:
        """Drop one reference to each of OBJECTS, removing those nothing references:
        (objects, bytes) freed."""
        self.refcounts.subtract(objects)
        freed = freed_bytes = 0
        for digest in objects:
            if self.refcounts[digest] <= 0:
                del self.refcounts[digest]
                freed_bytes += self.objects.remove(digest)
                freed += 1
        return freed, freed_bytes

    def quarantine(self, name: str, upstream_digest: bytes) -> None:
        """Move a replica's copy of NAME aside (its content differs from upstream's
        UPSTREAM_DIGEST): no longer served, kept with its objects under quarantine/."""
        info = self.images[name]
        path = self._path(name)
        target = self.quarantine_dir / name / f".{info.digest.hex()}-{upstream_digest.hex()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = image_from_proto(imageserver_pb2.Image.FromString(path.read_bytes()))
        os.rename(path, target)
        fsync_directory(target.parent)
        fsync_directory(path.parent)
        self._keep_quarantined(target, image, upstream_digest, int(time.time()))
        self._forget(info)
        self.refcounts.subtract(info.objects)  # the quarantined copy holds them now
        self._remove_empty_parents(path.parent, self.images_dir)
        log.error("QUARANTINED image %s: this server's copy has digest %s, upstream binds the "
                  "name to %s; moved to %s", name, short(info.digest), short(upstream_digest),
                  target)

    def discard_quarantined(self, name: str) -> tuple[int, int]:
        """Delete every quarantined copy of NAME and the objects only they referenced."""
        freed = freed_bytes = 0
        folder = self.quarantine_dir / name
        for path in [p for p in self._quarantined_objects if p.parent == folder]:
            path.unlink()
            fsync_directory(path.parent)
            objects, freed_now = self._release(self._quarantined_objects.pop(path))
            freed, freed_bytes = freed + objects, freed_bytes + freed_now
            self._remove_empty_parents(path.parent, self.quarantine_dir)
        self.quarantined.pop(name, None)
        return freed, freed_bytes

    @staticmethod
    def _remove_empty_parents(folder: Path, top: Path) -> None:
        while folder != top:
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
