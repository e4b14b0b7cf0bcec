"""Scanning a directory into a Tree: lstat every entry, SHA-256 every regular
file, never cross a mount point, skip sockets.

The root's own device is the scan's device: a directory on another device (a
mount point) is recorded as an empty directory and not entered. The walk goes by
directory descriptor (openat-style, O_NOFOLLOW), so no path is too long and no
symlink swapped in for a directory or file is followed; content is read only
from what an fstat of the open descriptor shows to be a regular file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import hash_fd
from fleetlib.fstree.safeopen import CHANGED_ERRNOS, NotRegularFile, open_regular
from fleetlib.fstree.tree import (
    Inode,
    Kind,
    Tree,
    Xattrs,
    directory,
    join,
    regular,
    special,
    symlink,
)

log = logging.getLogger(__name__)

# (path, stat) -> known content hash, or None to read and hash the file.
HashLookup = Callable[[str, os.stat_result], bytes | None]
# (path, stat) -> the whole inode, when the caller trusts it unchanged for this
# stat (its hash, extended attributes, link target), or None to read it.
InodeLookup = Callable[[str, os.stat_result], Inode | None]
# Told the size of every file read and hashed, for progress and rate limits.
ReadHook = Callable[[int], None]
# Path (as in the tree, "/etc/x") -> whether to leave it and its subtree out.
Exclude = Callable[[str], bool]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directories a walk keeps open along its current path; above this depth the
# shallowest are closed, and reopened (checked by inode number) when needed again.
MAX_HELD_DIRS = 64
_KIND_OF = {
    stat.S_IFDIR: Kind.DIRECTORY, stat.S_IFREG: Kind.REGULAR, stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHAR_DEVICE, stat.S_IFBLK: Kind.BLOCK_DEVICE, stat.S_IFIFO: Kind.FIFO,
}


def _at(path: str, dir_fd: int | None) -> str:
    """A path naming `path` relative to `dir_fd` for calls that take no dir_fd (the
    xattr calls): /proc resolves the open directory, so no parent is followed."""
    return path if dir_fd is None else f"/proc/self/fd/{dir_fd}/{path}"


def read_xattrs(path: str, dir_fd: int | None = None) -> Xattrs:
    """Extended attributes of `path` (relative to `dir_fd` if given; not following
    symlinks), sorted by name."""
    where = _at(path, dir_fd)
    try:
        names = os.listxattr(where, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENOENT):
            return ()
        raise
    if not names:
        return ()
    pairs = []
    for name in names:
        try:
            pairs.append((os.fsencode(name), os.getxattr(where, name, follow_symlinks=False)))
        except OSError as err:
            if err.errno != errno.ENODATA:  # removed since listed
                raise
    return tuple(sorted(pairs))


def inode_from_stat(path: str, st: os.stat_result, digest: bytes = b"",
                    dir_fd: int | None = None) -> Inode | None:
    """The tree inode for an lstat result (None for sockets); regular files take
    `digest` as their hash. `path` is relative to `dir_fd` if given."""
    kind = _KIND_OF.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    if kind == Kind.SYMLINK:
        return symlink(st.st_uid, st.st_gid, os.fsencode(os.readlink(path, dir_fd=dir_fd)))
    xattrs = read_xattrs(path, dir_fd)
    if kind == Kind.DIRECTORY:
        return directory(st.st_mode, st.st_uid, st.st_gid, xattrs)
    if kind == Kind.REGULAR:
        return regular(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, digest,
                       xattrs)
    return special(kind, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev, xattrs)


def scan_directory(
    root: Path | str,
    exclude: Exclude | None = None,
    known_hash: HashLookup | None = None,
    on_read: ReadHook | None = None,
    known_inode: InodeLookup | None = None,
) -> Tree:
    """Scan the directory `root` into a Tree whose inode numbers are the real ones.

    `exclude` leaves paths (and their subtrees) out; `known_hash` lets a caller
    reuse hashes of files it trusts unchanged, and `known_inode` whole inodes (it
    is asked first, for entries on the root's device only, and saves the xattr,
    link and content reads that make a scan slow); `on_read` is told every file
    size actually read. Directories are walked by descriptor, never by full path
    (no length limit, no symlink followed). Files that vanish or change kind while
    scanning are skipped or recorded as what they became; FIFOs and devices are
    never read.
    """
    top = os.fspath(root)
    try:
        root_fd = os.open(top, _DIR_FLAGS)
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            raise FleetError(f"cannot scan {top}: not a directory") from None
        raise FleetError(f"cannot scan {top}: {err.strerror}") from None
    walk = None
    try:
        walk = _Walk(root_fd, exclude, known_hash, on_read, known_inode)
        return walk.run()
    finally:
        if walk is not None:
            walk.close()
        os.close(root_fd)


@dataclass
class _Frame:
    """A directory on the walk's current path, with its subdirectories still to enter."""

    name: str
    ino: int
    fd: int  # -1 while closed for the descriptor limit
    pending: list[tuple[str, str, int]]  # (name, tree path, inode number), last first


class _Walk:
    """One scan: a depth-first walk holding the directories of its current path open."""

    def __init__(self, root_fd: int, exclude: Exclude | None, known_hash: HashLookup | None,
                 on_read: ReadHook | None, known_inode: InodeLookup | None) -> None:
        self.exclude, self.known_hash = exclude, known_hash
        self.on_read, self.known_inode = on_read, known_inode
        self.frames: list[_Frame] = []
        self.held = 0
        self.root_fd = root_fd
        root_st = os.fstat(root_fd)
        self.device = root_st.st_dev
        root_inode = inode_from_stat(".", root_st, dir_fd=root_fd)
        assert root_inode is not None
        self.tree = Tree(root_st.st_ino, {root_st.st_ino: root_inode}, {root_st.st_ino: {}})

    def run(self) -> Tree:
        frames = self.frames
        self._enter("/", "", self.root_fd, self.tree.root)
        while frames:
            frame = frames[-1]
            if not frame.pending:
                frames.pop()
                self._release(frame)
                continue
            name, path, ino = frame.pending.pop()
            parent = self._reopen(len(frames) - 1)
            if parent < 0:  # the directory was replaced since listed: the next pass sees it
                frame.pending.clear()
                continue
            fd = self._open_dir(name, parent, ino)
            if fd >= 0:
                self._enter(path, name, fd, ino)
        return self.tree

    def close(self) -> None:
        """Close whatever a failed walk left open."""
        for frame in self.frames:
            self._release(frame)
        self.frames.clear()

    def _release(self, frame: _Frame) -> None:
        if frame.fd >= 0:
            if frame.fd != self.root_fd:  # the caller's to close
                os.close(frame.fd)
            frame.fd = -1
            self.held -= 1

    def _open_dir(self, name: str, parent: int, ino: int) -> int:
        """The subdirectory `name` of `parent` if it still is inode `ino`, else -1."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as err:
            if err.errno in CHANGED_ERRNOS:
                return -1
            raise
        st = os.fstat(fd)
        if st.st_ino != ino or st.st_dev != self.device:
            os.close(fd)
            return -1
        return fd

    def _reopen(self, index: int) -> int:
        """The open directory of frame `index`, reopened from its nearest open
        ancestor if the descriptor limit closed it; -1 if it changed meanwhile."""
        frames = self.frames
        if frames[index].fd >= 0:
            return frames[index].fd
        start = max(i for i in range(index) if frames[i].fd >= 0)
        fd = frames[start].fd
        for i in range(start + 1, index + 1):
            below = self._open_dir(frames[i].name, fd, frames[i].ino)
            if i > start + 1:
                os.close(fd)
            if below < 0:
                return -1
            fd = below
        frames[index].fd = fd
        self.held += 1
        self._limit(keep=index)
        return fd

    def _limit(self, keep: int) -> None:
        """Close the shallowest directories (never the root or frame `keep`) while
        more than MAX_HELD_DIRS are open."""
        for frame in self.frames[1:]:
            if self.held <= MAX_HELD_DIRS:
                return
            if frame.fd >= 0 and frame is not self.frames[keep]:
                self._release(frame)

    def _enter(self, path: str, name: str, fd: int, ino: int) -> None:
        """Record the entries of the open directory `fd` (tree path `path`) and push
        it with its subdirectories on the same device still to walk."""
        tree, exclude, known_inode, device = self.tree, self.exclude, self.known_inode, \
            self.device
        kids = tree.children[ino]
        frame = _Frame(name, ino, fd, [])
        self.frames.append(frame)  # first: close() releases it if this raises
        self.held += 1
        self._limit(keep=len(self.frames) - 1)
        subdirs = frame.pending
        for entry in list(os.scandir(fd)):
            child_path = join(path, entry.name)
            if exclude is not None and exclude(child_path):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_dev == device and st.st_ino in tree.inodes \
                        and not stat.S_ISDIR(st.st_mode):  # a hard link to an inode seen
                    kids[entry.name] = st.st_ino
                    continue
                inode = None
                if known_inode is not None and st.st_dev == device:
                    inode = known_inode(child_path, st)
                if inode is None:
                    st, inode = self._read_inode(entry.name, fd, child_path, st)
            except OSError as err:
                if err.errno in CHANGED_ERRNOS:
                    continue
                raise
            if inode is None:
                continue
            child_ino = st.st_ino
            if st.st_dev != device:  # a mount point: its number belongs to another device
                child_ino = _foreign_number(tree)
            tree.inodes[child_ino] = inode
            kids[entry.name] = child_ino
            if inode.kind == Kind.DIRECTORY:
                tree.children[child_ino] = {}
                if st.st_dev == device:
                    subdirs.append((entry.name, child_path, child_ino))
                else:
                    log.debug("not crossing mount point %s", child_path)
        subdirs.reverse()  # pop() takes them in listing order

    def _read_inode(self, name: str, dir_fd: int, path: str, st: os.stat_result
                    ) -> tuple[os.stat_result, Inode | None]:
        """The inode of one directory entry (and the stat it was made from), its
        content hashed unless `known_hash` knows it; None for a socket, or a file
        that changed while read (the next scan catches it). A FIFO or device
        swapped in for a regular file since its lstat is recorded, never read."""
        digest = b""
        if stat.S_ISREG(st.st_mode) and st.st_size:
            known = self.known_hash(path, st) if self.known_hash else None
            digest = known if known is not None else b""
            if known is None:
                try:
                    fd, st = open_regular(name, dir_fd, shown=path, noatime=True)
                except NotRegularFile as err:
                    log.debug("%s", err)
                    if stat.S_ISDIR(err.st.st_mode):
                        return st, None  # a directory now: the next pass enters it
                    return err.st, inode_from_stat(name, err.st, dir_fd=dir_fd)
                try:
                    digest, size = hash_fd(fd)
                finally:
                    os.close(fd)
                if self.on_read is not None:
                    self.on_read(size)
                if size != st.st_size:
                    log.debug("skipping %s: changed while read", path)
                    return st, None
        return st, inode_from_stat(name, st, digest, dir_fd=dir_fd)


def _foreign_number(tree: Tree) -> int:
    """An inode number no real inode of the scanned device uses."""
    number = (1 << 63) + len(tree.inodes)
    while number in tree.inodes:
        number += 1
    return number
