"""The file tree of docs/DESIGN.md: inodes keyed by number plus directory entries.

A hard link is two entries naming one inode number. Inode numbers are opaque:
two trees are compared by path, never by number. Paths are `str` with
surrogate escapes (`os.fsdecode`), absolute, `/` being the root; entries are
ordered by the bytes of their names.
"""

from __future__ import annotations

import enum
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from fleetlib.errors import FleetError


class Kind(enum.IntEnum):
    """Inode kinds; the values match proto `fleet.InodeKind`."""

    DIRECTORY = 1
    REGULAR = 2
    SYMLINK = 3
    CHAR_DEVICE = 4
    BLOCK_DEVICE = 5
    FIFO = 6

    @property
    def type_bits(self) -> int:
        """The S_IF* bits of this kind, for `st_mode`-style values."""
        return _TYPE_BITS[self]


_TYPE_BITS = {
    Kind.DIRECTORY: stat.S_IFDIR,
    Kind.REGULAR: stat.S_IFREG,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR_DEVICE: stat.S_IFCHR,
    Kind.BLOCK_DEVICE: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
}
DEVICE_KINDS = (Kind.CHAR_DEVICE, Kind.BLOCK_DEVICE)
PERMISSION_BITS = 0o7777

Xattrs = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Inode:
    """One inode. Fields a kind does not carry are zero (see docs/DESIGN.md)."""

    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int = 0
    size: int = 0
    hash: bytes = b""
    target: bytes = b""
    rdev: int = 0
    xattrs: Xattrs = ()

    def same_content(self, other: Inode) -> bool:
        """Whether both hold the same data (kind, bytes, link target or device)."""
        return (
            self.kind == other.kind
            and self.size == other.size
            and self.hash == other.hash
            and self.target == other.target
            and self.rdev == other.rdev
        )

    def same_metadata(self, other: Inode) -> bool:
        """Whether owner, mode, mtime and extended attributes agree."""
        return (
            self.mode == other.mode
            and self.uid == other.uid
            and self.gid == other.gid
            and self.mtime_ns == other.mtime_ns
            and self.xattrs == other.xattrs
        )


def directory(mode: int, uid: int, gid: int, xattrs: Xattrs = ()) -> Inode:
    """A directory inode (its times are not part of a tree)."""
    return Inode(Kind.DIRECTORY, mode & PERMISSION_BITS, uid, gid, xattrs=xattrs)


def regular(
    mode: int, uid: int, gid: int, mtime_ns: int, size: int, digest: bytes, xattrs: Xattrs = ()
) -> Inode:
    """A regular file inode; `digest` is empty exactly when `size` is 0."""
    return Inode(
        Kind.REGULAR, mode & PERMISSION_BITS, uid, gid, mtime_ns, size,
        digest if size else b"", xattrs=xattrs,
    )


def symlink(uid: int, gid: int, target: bytes) -> Inode:
    """A symlink inode (mode and times are not part of a tree)."""
    return Inode(Kind.SYMLINK, 0o777, uid, gid, target=target)


def special(kind: Kind, mode: int, uid: int, gid: int, mtime_ns: int, rdev: int,
            xattrs: Xattrs = ()) -> Inode:
    """A device node or fifo inode."""
    return Inode(kind, mode & PERMISSION_BITS, uid, gid, mtime_ns,
                 rdev=rdev if kind in DEVICE_KINDS else 0, xattrs=xattrs)


def name_key(name: str) -> bytes:
    """Sort key of an entry name: the raw bytes, as docs/DESIGN.md orders entries."""
    return os.fsencode(name)


def join(parent: str, name: str) -> str:
    """Absolute path of `name` inside directory `parent`."""
    return parent + name if parent == "/" else parent + "/" + name


def split(path: str) -> tuple[str, str]:
    """(parent, name) of an absolute path other than `/`."""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


def check_clean_path(path: str) -> str:
    """A clean absolute path from disk or network: no `..`, `.` or empty components,
    no NUL, no trailing `/` (except the root itself)."""
    if not path.startswith("/") or "\0" in path:
        raise FleetError(f"path {path!r} is not absolute")
    if path != "/" and any(part in ("", ".", "..") for part in path[1:].split("/")):
        raise FleetError(f"path {path!r} escapes or is not clean")
    return path


def check_name(name: str) -> str:
    """Validate one directory entry name from disk or network."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FleetError(f"invalid file name {name!r}")
    return name


@dataclass
class Tree:
    """A whole file tree: `inodes` by number, `children` per directory inode."""

    root: int
    inodes: dict[int, Inode]
    children: dict[int, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def empty(cls, root: Inode | None = None) -> Tree:
        """A tree holding only its root directory."""
        return cls(1, {1: root or directory(0o755, 0, 0)}, {1: {}})

    def entries(self, dir_ino: int) -> list[tuple[str, int]]:
        """Sorted (name, inode number) entries of a directory."""
        kids = self.children.get(dir_ino, {})
        return sorted(kids.items(), key=lambda item: name_key(item[0]))

    def walk(self) -> Iterator[tuple[str, int, Inode]]:
        """Every (path, inode number, inode), depth first in entry order, root first."""
        yield "/", self.root, self.inodes[self.root]
        stack = [("/", self.root)]
        while stack:
            path, ino = stack.pop()
            subdirs = []
            for name, child in self.entries(ino):
                child_path = join(path, name)
                inode = self.inodes[child]
                yield child_path, child, inode
                if inode.kind == Kind.DIRECTORY:
                    subdirs.append((child_path, child))
            stack.extend(reversed(subdirs))

    def paths(self) -> dict[str, int]:
        """Map of every path to its inode number."""
        return {path: ino for path, ino, _ in self.walk()}

    def lookup(self, path: str) -> int | None:
        """Inode number at `path`, or None (symlinks are not followed)."""
        ino = self.root
        for name in path.strip("/").split("/") if path != "/" else ():
            kids = self.children.get(ino)
            if kids is None or name not in kids:
                return None
            ino = kids[name]
        return ino

    def object_sizes(self) -> dict[bytes, int]:
        """Every content hash the tree needs, with its size (empty files need none)."""
        return {i.hash: i.size for i in self.inodes.values() if i.kind == Kind.REGULAR and i.size}

    def total_bytes(self) -> int:
        """Sum of regular file sizes, counting each inode once."""
        return sum(i.size for i in self.inodes.values() if i.kind == Kind.REGULAR)

    def link_counts(self) -> dict[int, int]:
        """Number of entries naming each inode (hard links counted)."""
        counts: dict[int, int] = {self.root: 1}
        for kids in self.children.values():
            for ino in kids.values():
                counts[ino] = counts.get(ino, 0) + 1
        return counts

    def fingerprint(self) -> bytes:
        """xxh3_128 of the tree's canonical form: equal for equal trees whatever their
        inode numbering, different when any path, inode field or hard link differs."""
        h = xxhash.xxh3_128()
        first_seen: dict[int, int] = {}
        for index, (path, ino, inode) in enumerate(self.walk()):
            link = first_seen.setdefault(ino, index)
            h.update(os.fsencode(path))
            h.update(_INODE_STRUCT.pack(
                link, inode.kind, inode.mode, inode.uid, inode.gid, inode.mtime_ns,
                inode.size, inode.rdev, len(inode.target), len(inode.xattrs)))
            h.update(inode.hash)
            h.update(inode.target)
            for name, value in inode.xattrs:
                h.update(struct.pack("<II", len(name), len(value)) + name + value)
        return h.digest()


_INODE_STRUCT = struct.Struct("<QBIIIqQQII")


class TreeBuilder:
    """Builds a Tree from paths in any order, making missing parents as
    directories (mode 0755, root-owned) the way `tar -x` does."""

    def __init__(self, root: Inode | None = None) -> None:
        self.tree = Tree.empty(root)
        self._next = 2
        self._links: dict[int, int] = {}  # entries naming each inode (the root: none)

    def new_number(self) -> int:
        """A fresh inode number."""
        number = self._next
        self._next += 1
        return number

    def set_root(self, inode: Inode) -> None:
        """Replace the root directory's metadata."""
        if inode.kind != Kind.DIRECTORY:
            raise FleetError("the root of a tree must be a directory")
        self.tree.inodes[self.tree.root] = inode

    def directory_at(self, path: str) -> int:
        """Inode number of the directory at `path`, making missing ones; FleetError when
        a non-directory stands in the way (a symlink used as a directory, say)."""
        ino = self.tree.root
        if path == "/":
            return ino
        walked = ""
        for name in path.strip("/").split("/"):
            walked += "/" + name
            kids = self.tree.children[ino]
            child = kids.get(check_name(name))
            if child is None:
                child = self.new_number()
                self.tree.inodes[child] = directory(0o755, 0, 0)
                self.tree.children[child] = {}
                kids[name] = child
                self._links[child] = 1
            elif self.tree.inodes[child].kind != Kind.DIRECTORY:
                kind = self.tree.inodes[child].kind.name.lower()
                raise FleetError(f"{walked} is a {kind}, but a later entry uses it as a directory")
            ino = child
        return ino

    def add(self, path: str, inode: Inode, number: int | None = None) -> int:
        """Put `inode` at `path` (replacing what was there, as a later tar member does);
        pass `number` of an existing inode to make a hard link. Returns the number."""
        if path == "/":
            self.set_root(inode)
            return self.tree.root
        parent, name = split(path)
        kids = self.tree.children[self.directory_at(parent)]
        old = kids.get(check_name(name))
        if number is None:
            if old is not None and self.tree.inodes[old].kind == Kind.DIRECTORY \
                    and inode.kind == Kind.DIRECTORY:
                self.tree.inodes[old] = inode  # a directory entry after its contents
                return old
            number = self.new_number()
            self.tree.inodes[number] = inode
            if inode.kind == Kind.DIRECTORY:
                self.tree.children[number] = {}
        kids[name] = number
        if old != number:
            self._links[number] = self._links.get(number, 0) + 1
            if old is not None:
                self._unlink(old)
        return number

    def remove(self, parent: int, name: str) -> None:
        """Drop the entry `name` of directory `parent` (an image layer's whiteout), and
        its inode and subtree unless still linked elsewhere."""
        self._unlink(self.tree.children[parent].pop(name))

    def _unlink(self, ino: int) -> None:
        """Forget one entry naming `ino`: the inode and its subtree go with its last
        entry (counted, not searched for: an image layer may replace thousands of
        files; no recursion: a tarball may nest very deep)."""
        pending = [ino]
        while pending:
            ino = pending.pop()
            left = self._links.pop(ino) - 1
            if left:
                self._links[ino] = left
                continue
            self.tree.inodes.pop(ino, None)
            pending.extend(self.tree.children.pop(ino, {}).values())
