"""Container images as image sources: an OCI image layout (a directory holding
`oci-layout`, `index.json` and `blobs/sha256/...`, or an uncompressed tar of one) or a
`docker save` tarball (`manifest.json` naming a config and its layers).

Everything in it is untrusted. Every blob read (manifests, config, layers) is checked
against the sha256 digest it is named by (and the size its descriptor gives) before it
is used; JSON, media types and paths are validated; each layer is a tarball read by
fstree/tarball.py with its member checks. The layers are applied in order into one
tree as container runtimes show them (the OCI image spec, "Applying changesets"): an
entry replaces what lower layers had at its path (directories merge); `.wh.NAME`
deletes NAME and all below it from lower layers; `.wh..wh..opq` hides what lower
layers put in its directory; whiteouts act on lower layers only, and are never part
of the image. Layers are streamed, never unpacked or loaded whole; the archive form
is read in place (a member is a range of the file).
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import posixpath
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import READ_SIZE
from fleetlib.fstree.safeopen import open_under
from fleetlib.fstree.tarball import Tarball
from fleetlib.fstree.tree import Tree, TreeBuilder, check_name, join, split
from fleetlib.jsoninput import load_json

OCI_LAYOUT = "oci-layout"
OCI_INDEX = "index.json"
DOCKER_MANIFEST = "manifest.json"
MAX_JSON = 16 << 20  # a manifest, index or config larger than this is refused
MAX_INDEX_DEPTH = 4  # image indexes inside image indexes
MAX_LINK_HOPS = 8  # links inside a `docker save` tarball followed to a layer
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
WHITEOUT_META = ".wh..wh."  # reserved (aufs' .wh..wh.plnk and the like): skipped
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_CONFIG_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")  # docker save's
_MANIFESTS = frozenset({"application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.v2+json"})
_INDEXES = frozenset({"application/vnd.oci.image.index.v1+json",
                      "application/vnd.docker.distribution.manifest.list.v2+json"})
# Tar layers, compressed or not (the compression is told by magic bytes, as for any
# tarball): OCI's, its deprecated non-distributable ones, and Docker's.
_LAYERS = frozenset(
    {f"application/vnd.oci.image.layer{kind}.v1.tar{suffix}"
     for kind in ("", ".nondistributable") for suffix in ("", "+gzip", "+zstd")}
    | {"application/vnd.docker.image.rootfs.diff.tar",
       "application/vnd.docker.image.rootfs.diff.tar.gzip",
       "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"})
# platform.machine() -> the architecture names of OCI platforms (Go's GOARCH).
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass(frozen=True)
class _Blob:
    """A blob to read: where in the store, the digest it must have (hex), and the size
    its descriptor gives (None: a `docker save` name, which gives none)."""

    name: str
    digest: str
    size: int | None


class _Store(Protocol):
    """The files of an image: a directory, or an archive's members."""

    path: Path

    def has(self, name: str) -> bool:
        """Whether the file `name` (relative, clean) is there."""
        ...

    def open(self, name: str) -> BinaryIO:
        """The file `name`, for reading and seeking; FleetError when missing."""
        ...

    def where(self, name: str) -> Path:
        """The file on disk holding `name`'s bytes."""
        ...


class _Directory:
    """An image layout directory; no symlink in it is followed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def open(self, name: str) -> BinaryIO:
        try:
            return os.fdopen(open_under(self.path, name)[0], "rb")
        except FileNotFoundError:
            raise FleetError(f"{self.path}: missing {name}") from None
        except OSError as e:
            raise FleetError(f"cannot read {name} in {self.path}: {e.strerror or e}") from None

    def where(self, name: str) -> Path:
        return self.path / name


class _Archive:
    """An uncompressed tar of an image, its members read in place. Member names are
    only looked up, never extracted; a symlink or hard link member is followed to
    the member it names (`docker save` links a layer saved twice)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            with open(path, "rb") as raw:
                if raw.read(2) == b"\x1f\x8b":
                    raise FleetError(f"{path} is compressed: --from-oci reads a plain tar "
                                     "(as `docker save` writes it); decompress it first")
            with tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape") as tar:
                for member in tar:
                    self._members[_clean(member.name)] = member
        except OSError as e:
            raise FleetError(f"cannot read {path}: {e.strerror or e}") from None
        except (tarfile.TarError, ValueError, EOFError) as e:
            raise FleetError(f"truncated or corrupt image archive {path}: {e}") from None

    def has(self, name: str) -> bool:
        return name in self._members

    def open(self, name: str) -> BinaryIO:
        member = self._member(name)
        try:
            raw = open(self.path, "rb")
        except OSError as e:
            raise FleetError(f"cannot read {self.path}: {e.strerror or e}") from None
        return io.BufferedReader(_Range(raw, member.offset_data, member.size), READ_SIZE)

    def where(self, name: str) -> Path:
        return self.path

    def _member(self, name: str) -> tarfile.TarInfo:
        """The regular member `name` stands for, links followed."""
        wanted = name
        for _ in range(MAX_LINK_HOPS):
            member = self._members.get(wanted)
            if member is None:
                raise FleetError(f"{self.path}: missing {name}")
            if member.isreg():
                return member
            if member.issym():
                wanted = _clean(posixpath.normpath(
                    posixpath.join(posixpath.dirname(wanted), member.linkname)))
            elif member.islnk():
                wanted = _clean(member.linkname)
            else:
                raise FleetError(f"{self.path}: {name} is not a file")
        raise FleetError(f"{self.path}: {name}: more than {MAX_LINK_HOPS} links")


class _Range(io.RawIOBase):
    """Bytes [offset, offset + size) of an open file, as a seekable file of its own."""

    def __init__(self, raw: BinaryIO, offset: int, size: int) -> None:
        self._raw, self._offset, self._size, self._position = raw, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._size - self._position)
        if count <= 0:
            return 0
        self._raw.seek(self._offset + self._position)
        data = self._raw.read(count)
        view[:len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Overlay:
    """Layers applied one over another into one tree, as overlayfs shows them.

    Whiteouts act on lower layers only: what the current layer put (its entries and
    their parents, remembered by path until the next layer) is kept whatever order its
    whiteouts come in."""

    def __init__(self) -> None:
        self.builder = TreeBuilder()
        self._current: set[str] = set()

    def next_layer(self) -> None:
        """Begin the next layer up."""
        self._current.clear()

    def intercept(self, path: str) -> bool:
        """Take a whiteout (applying it) or reserved member; note any other path."""
        if path == "/":
            return False
        parent, name = split(path)
        for part in parent[1:].split("/") if parent != "/" else ():
            if part.startswith(WHITEOUT_META):
                return True
            if part.startswith(WHITEOUT):
                raise FleetError(f"whiteout {part!r} used as a directory")
        if name == OPAQUE:
            self._hide_lower(parent, self.builder.directory_at(parent))
            self._note(parent)
        elif name.startswith(WHITEOUT_META):
            pass
        elif name.startswith(WHITEOUT):
            self._whiteout(parent, check_name(name[len(WHITEOUT):]))
        else:
            self._note(path)
            return False
        return True

    def _note(self, path: str) -> None:
        """Remember `path` and its parents as the current layer's."""
        while path != "/" and path not in self._current:
            self._current.add(path)
            path = split(path)[0]

    def _whiteout(self, parent: str, name: str) -> None:
        """Delete what lower layers put at `name` in directory `parent`."""
        tree = self.builder.tree
        number = tree.lookup(parent)
        kids = tree.children.get(number) if number is not None else None
        if number is None or kids is None or name not in kids:
            return
        path = join(parent, name)
        if path not in self._current:
            self.builder.remove(number, name)
        elif kids[name] in tree.children:  # this layer's directory: only lower content goes
            self._hide_lower(path, kids[name])

    def _hide_lower(self, path: str, number: int) -> None:
        """Delete what lower layers put below the directory `path` (inode `number`)."""
        tree = self.builder.tree
        pending = [(path, number)]
        while pending:
            path, number = pending.pop()
            for name, child in list(tree.children[number].items()):
                child_path = join(path, name)
                if child_path not in self._current:
                    self.builder.remove(number, name)
                elif child in tree.children:
                    pending.append((child_path, child))


def read_oci(path: Path) -> tuple[Tree, list[Tarball]]:
    """The tree the image at `path` (a layout directory, or a tar of a layout or of
    `docker save`) makes, and its layers, lowest first (read once: `iter_objects`
    reads a layer again for content)."""
    store: _Store
    if path.is_dir():
        store = _Directory(path)
    elif path.is_file():
        store = _Archive(path)
    else:
        raise FleetError(f"{path}: not a directory or a file")
    if store.has(OCI_LAYOUT):
        blobs = _oci_layers(store)
    elif store.has(DOCKER_MANIFEST):
        blobs = _docker_layers(store)
    else:
        raise FleetError(f"{path}: neither an OCI image layout ({OCI_LAYOUT}, {OCI_INDEX}, "
                         f"blobs/) nor a `docker save` tarball ({DOCKER_MANIFEST})")
    overlay = _Overlay()
    layers = []
    for number, blob in enumerate(blobs, 1):
        label = f"layer {number} of {path} (sha256:{blob.digest[:12]})"
        _verify(store, blob, label)
        layer = Tarball(store.where(blob.name), _opener(store, blob.name), label)
        overlay.next_layer()
        layer.read(overlay.builder, overlay.intercept)
        layers.append(layer)
    return overlay.builder.tree, layers


def _opener(store: _Store, name: str) -> Callable[[], BinaryIO]:
    """Opens `name` in `store` when called (bound now)."""
    return lambda: store.open(name)


def _oci_layers(store: _Store) -> list[_Blob]:
    """The layers of an OCI image layout's one image (for this machine's platform when
    its index names several)."""
    layout = _json_object(_read_small(store, OCI_LAYOUT, None), f"{store.path}: {OCI_LAYOUT}")
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise FleetError(f"{store.path}: {OCI_LAYOUT}: no imageLayoutVersion")
    index = _json_object(_read_small(store, OCI_INDEX, None), f"{store.path}: {OCI_INDEX}")
    manifest_blob, _ = _pick_manifest(store, index, OCI_INDEX, 0)
    origin = f"{store.path}: manifest {manifest_blob.name}"
    manifest = _json_object(_read_small(store, manifest_blob.name, manifest_blob), origin)
    if manifest.get("schemaVersion") != 2:
        raise FleetError(f"{origin}: schemaVersion is not 2")
    if "mediaType" in manifest and manifest["mediaType"] not in _MANIFESTS:
        raise FleetError(f"{origin}: not an image manifest (mediaType "
                         f"{manifest['mediaType']!r})")
    _, config = _descriptor(manifest.get("config"), f"{origin}: config")
    _verify(store, config, f"config {config.name} of {store.path}")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise FleetError(f"{origin}: no list of layers")
    blobs = []
    for number, value in enumerate(layers, 1):
        media_type, blob = _descriptor(value, f"{origin}: layer {number}")
        if media_type not in _LAYERS:
            raise FleetError(f"{origin}: layer {number}: unknown media type {media_type!r}")
        blobs.append(blob)
    return blobs


def _pick_manifest(store: _Store, index: dict[str, Any], origin: str,
                   depth: int) -> tuple[_Blob, str]:
    """The image manifest an image index names, with its platform: its only one, or
    the only one for this machine's platform; nested indexes are followed."""
    where = f"{store.path}: {origin}"
    listed = index.get("manifests")
    if not isinstance(listed, list):
        raise FleetError(f"{where}: no list of manifests")
    found: list[tuple[_Blob, str]] = []
    for number, value in enumerate(listed, 1):
        media_type, blob = _descriptor(value, f"{where}: manifest {number}")
        if media_type in _INDEXES:
            if depth >= MAX_INDEX_DEPTH:
                raise FleetError(f"{where}: image indexes nested too deeply")
            nested = _json_object(_read_small(store, blob.name, blob), f"{where}: {blob.name}")
            found.append(_pick_manifest(store, nested, blob.name, depth + 1))
        elif media_type in _MANIFESTS and _platform(value) != "unknown/unknown":
            found.append((blob, _platform(value)))  # unknown/unknown: build attestations
    here = host_platform()
    if len(found) > 1:
        found = [item for item in found if item[1] == here] or found
    if not found:
        raise FleetError(f"{where}: names no image manifest")
    if len(found) > 1:
        names = ", ".join(sorted(p or "no platform" for _, p in found))
        raise FleetError(f"{where}: names several images and none or several for {here} "
                         f"({names})")
    return found[0]


def host_platform() -> str:
    """This machine's platform as OCI names it (`linux/amd64`, `linux/arm64`, ...)."""
    return f"linux/{_GOARCH.get(platform.machine(), platform.machine())}"


def _platform(descriptor: dict[str, Any]) -> str:
    """A descriptor's platform as `os/architecture` ("" when it gives none)."""
    given = descriptor.get("platform")
    if not isinstance(given, dict):
        return ""
    return f"{given.get('os')}/{given.get('architecture')}"


def _docker_layers(store: _Store) -> list[_Blob]:
    """The layers of a `docker save` tarball's one image, each to match the digest its
    config's rootfs.diff_ids gives (`docker save` writes layers uncompressed)."""
    origin = f"{store.path}: {DOCKER_MANIFEST}"
    entries = load_json(_text(_read_small(store, DOCKER_MANIFEST, None), origin), origin)
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        count = f"{len(entries)} images" if isinstance(entries, list) else "no list"
        raise FleetError(f"{origin}: not one image ({count}); `docker save` one image")
    entry = entries[0]
    config_name = _member_name(entry.get("Config"), f"{origin}: Config")
    named = _CONFIG_NAME.fullmatch(config_name)
    if named is None:
        raise FleetError(f"{origin}: Config {config_name!r} is not named by its digest")
    config_origin = f"{store.path}: config {config_name}"
    config = _json_object(_read_small(store, config_name, _Blob(config_name, named[1], None)),
                          config_origin)
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    layers = entry.get("Layers")
    if not isinstance(layers, list) or not isinstance(diff_ids, list) \
            or len(layers) != len(diff_ids):
        raise FleetError(f"{origin}: Layers do not match the rootfs.diff_ids of its config")
    blobs = []
    for number, (name, diff_id) in enumerate(zip(layers, diff_ids, strict=True), 1):
        name = _member_name(name, f"{origin}: layer {number}")
        digest = _digest(diff_id, f"{config_origin}: diff_id {number}")
        by_name = _BLOB_NAME.fullmatch(name)
        if by_name is not None and by_name[1] != digest:
            raise FleetError(f"{origin}: layer {number} {name} is not diff_id sha256:{digest}")
        blobs.append(_Blob(name, digest, None))
    return blobs


def _descriptor(value: object, origin: str) -> tuple[str, _Blob]:
    """(media type, blob) of an OCI content descriptor."""
    if not isinstance(value, dict):
        raise FleetError(f"{origin}: not a descriptor object")
    media_type, size = value.get("mediaType"), value.get("size")
    if not isinstance(media_type, str):
        raise FleetError(f"{origin}: no mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FleetError(f"{origin}: no valid size")
    digest = _digest(value.get("digest"), origin)
    return media_type, _Blob(f"blobs/sha256/{digest}", digest, size)


def _digest(value: object, origin: str) -> str:
    """The hex of a `sha256:<64 hex>` digest (other algorithms are refused)."""
    match = _DIGEST.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise FleetError(f"{origin}: digest {value!r} is not sha256:<64 lowercase hex>")
    return match[1]


def _member_name(value: object, origin: str) -> str:
    """A path inside the image's store from `manifest.json`: relative, no `..`."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\0" in value \
            or ".." in value.split("/"):
        raise FleetError(f"{origin}: {value!r} is not a relative path inside the image")
    return _clean(value)


def _clean(name: str) -> str:
    """An archive member name without `.` components, repeated or leading `/`."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _read_small(store: _Store, name: str, blob: _Blob | None) -> bytes:
    """All of a JSON file of the image (at most MAX_JSON bytes), checked against
    `blob`'s digest and size when it is a blob."""
    with store.open(name) as file:
        data = file.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise FleetError(f"{store.path}: {name} is larger than {MAX_JSON >> 20} MiB")
    if blob is not None:
        _check(len(data), hashlib.sha256(data).hexdigest(), blob, f"{name} of {store.path}")
    return data


def _verify(store: _Store, blob: _Blob, label: str) -> None:
    """Read a whole blob, checking its sha256 and size."""
    digest, size = hashlib.sha256(), 0
    with store.open(blob.name) as file:
        while chunk := file.read(READ_SIZE):
            digest.update(chunk)
            size += len(chunk)
    _check(size, digest.hexdigest(), blob, label)


def _check(size: int, digest: str, blob: _Blob, label: str) -> None:
    """FleetError unless a blob read has the size and digest it must have."""
    if blob.size is not None and size != blob.size:
        raise FleetError(f"{label}: {size} bytes where its descriptor says {blob.size}")
    if digest != blob.digest:
        raise FleetError(f"{label}: digest mismatch: its content is sha256:{digest}, "
                         f"not sha256:{blob.digest}")


def _text(data: bytes, origin: str) -> str:
    """UTF-8 text of a JSON file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FleetError(f"{origin}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_object(data: bytes, origin: str) -> dict[str, Any]:
    """A JSON file holding an object."""
    value = load_json(_text(data, origin), origin)
    if not isinstance(value, dict):
        raise FleetError(f"{origin}: not a JSON object")
    return value
