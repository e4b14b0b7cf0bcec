"""Where an image's tree and content come from: a directory, a tarball or a container
image (fstree/oci.py).

A source gives the tree and, for the objects an upload needs, a way to read
each one. Directory sources can be read by several uploads at once; a
tarball is one stream and is read in order, and so is each layer of a container image.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from fleetlib.errors import FleetError
from fleetlib.fstree.exclusions import SUBD_DIR, excluder
from fleetlib.fstree.filter import Filter, prune
from fleetlib.fstree.hashing import Reader
from fleetlib.fstree.oci import read_oci
from fleetlib.fstree.safeopen import open_under
from fleetlib.fstree.scan import ReadHook, scan_directory
from fleetlib.fstree.tarball import Tarball
from fleetlib.fstree.tree import Kind, Tree

# A source's top-level .subd (a host root's subd state), as filter: never in an image.
SUBD_STATE = Filter.from_lines([rf"/{re.escape(SUBD_DIR)}(/|$)"])

# (hash, size, open the content) for one object; a tarball's opener is only
# valid until the iterator advances.
ObjectItem = tuple[bytes, int, Callable[[], contextlib.AbstractContextManager[Reader]]]


class Source(Protocol):
    """A tree and its content."""

    tree: Tree
    parallel: bool

    def iter_objects(self, wanted: Collection[bytes]) -> Iterator[ObjectItem]:
        """Each wanted object once, with a way to read its bytes."""
        ...


class DirectorySource:
    """A scanned directory; objects are read from the first path holding them.

    A top-level `.subd` (a live host root's subd state: its object cache) is
    never part of the tree, as subd itself never scans it.
    """

    parallel = True

    def __init__(self, root: Path, on_read: ReadHook | None = None) -> None:
        self.root = root
        self.tree = scan_directory(root, exclude=excluder([]), on_read=on_read)

    def iter_objects(self, wanted: Collection[bytes]) -> Iterator[ObjectItem]:
        remaining = set(wanted)
        for path, _, inode in self.tree.walk():
            if inode.kind == Kind.REGULAR and inode.hash in remaining:
                remaining.discard(inode.hash)
                yield inode.hash, inode.size, _opener(self.root, path)


class TarballSource:
    """A tarball read without unpacking it: once for the tree, again for content.
    Its top-level `.subd` is left out, as for a directory."""

    parallel = False

    def __init__(self, path: Path) -> None:
        self._tarball = Tarball(path)
        self.tree = prune(self._tarball.read(), SUBD_STATE)

    def iter_objects(self, wanted: Collection[bytes]) -> Iterator[ObjectItem]:
        for digest, size, reader in self._tarball.iter_objects(set(wanted)):
            yield digest, size, _given(reader)


class OciSource:
    """An OCI image layout or `docker save` tarball: the tree its layers make; each
    object is read from the lowest layer holding it, so a layer is read again only
    when it holds an object the server lacks. A top-level `.subd` is left out."""

    parallel = False

    def __init__(self, path: Path) -> None:
        tree, self._layers = read_oci(path)
        self.tree = prune(tree, SUBD_STATE)

    def iter_objects(self, wanted: Collection[bytes]) -> Iterator[ObjectItem]:
        pending = set(wanted)
        for layer in self._layers:
            held = pending & layer.object_digests()
            if held:
                for digest, size, reader in layer.iter_objects(held):
                    pending.discard(digest)
                    yield digest, size, _given(reader)


def _opener(root: Path, path: str) -> Callable[[], BinaryIO]:
    """Opens the tree path `path` below `root` for reading when called (bound now: the
    loop moves on), by descriptor: a FIFO, device or symlink swapped in since the
    scan is refused (FleetError), never read or followed."""
    return lambda: os.fdopen(open_under(root, path)[0], "rb")


def _given(reader: Reader) -> Callable[[], contextlib.nullcontext[Reader]]:
    """Hands out `reader` as it is when called (bound now: the loop moves on)."""
    return lambda: contextlib.nullcontext(reader)


def open_source(path: Path, on_read: ReadHook | None = None) -> Source:
    """A directory or a .tar/.tar.gz/.tar.zst/.tar.xz/.tar.bz2 file as a source."""
    if path.is_dir():
        return DirectorySource(path, on_read)
    if path.is_file():
        return TarballSource(path)
    raise FleetError(f"{path}: not a directory or a tarball")
