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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, ST_DEV, ST_GID, ST_INO, ST_MODE, ST_SIZE, ST_UID
from typing import Protocol

from fleetlib.errors import FleetError
from fleetlib.fstree.exclusions import Excluder
from fleetlib.fstree.hashing import READ_SIZE, hash_fd
from fleetlib.fstree.safeopen import CHANGED_ERRNOS, NotRegularFile, open_regular
from fleetlib.fstree.tree import (
    PERMISSION_BITS,
    Inode,
    Kind,
    Tree,
    Xattrs,
    directory,
    regular,
    special,
    symlink,
)

log = logging.getLogger(__name__)

# (path, stat) -> known content hash, or None to read and hash the file.
HashLookup = Callable[[str, os.stat_result], bytes | None]
# Told the size of every file read and hashed, for progress and rate limits.
ReadHook = Callable[[int], None]
# Told each directory's tree path and number of entries once they are recorded,
# before any of its subdirectories is entered (pacing, giving up a walk).
DirectoryHook = Callable[[str, int], None]
# (st_size, st_mtime_ns, st_ctime_ns) of an inode: any change of its content,
# metadata or extended attributes moves its ctime.
ChangeKey = tuple[int, int, int]


class Trusted(Protocol):
    """What a caller knows of an inode: `inode` (hash, extended attributes, link
    target) holds while an lstat still shows `key`."""

    @property
    def key(self) -> ChangeKey:
        """The change key the inode was read at."""
        ...

    @property
    def inode(self) -> Inode:
        """The inode as read then."""
        ...

# Path (as in the tree, "/etc/x") -> whether to leave it and its subtree out.
Exclude = Callable[[str], bool]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directories a walk keeps open along its current path; above this depth the
# shallowest are closed, and reopened (checked by inode number) when needed again.
MAX_HELD_DIRS = 64
DIRECTORY, REGULAR = Kind.DIRECTORY, Kind.REGULAR  # bound once: tested per entry
_KIND_OF = {
    stat.S_IFDIR: Kind.DIRECTORY, stat.S_IFREG: Kind.REGULAR, stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHAR_DEVICE, stat.S_IFBLK: Kind.BLOCK_DEVICE, stat.S_IFIFO: Kind.FIFO,
}


def _at(path: str, dir_fd: int | None) -> str:
    """A path naming `path` relative to `dir_fd` for calls that take no dir_fd (the
    xattr calls): /proc resolves the open directory, so no parent is followed."""
    return path if dir_fd is None else f"/proc/self/fd/{dir_fd}/{path}"


def read_xattrs(path: str | int, dir_fd: int | None = None) -> Xattrs:
    """Extended attributes of `path` (relative to `dir_fd` if given; not following
    symlinks), or of the open descriptor `path` is, sorted by name."""
    where = path if isinstance(path, int) else _at(path, dir_fd)
    follow = isinstance(path, int)  # a descriptor's own inode: nothing to follow
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENOENT):
            return ()
        raise
    if not names:
        return ()
    pairs = []
    for name in names:
        try:
            pairs.append((os.fsencode(name), os.getxattr(where, name, follow_symlinks=follow)))
        except OSError as err:
            if err.errno != errno.ENODATA:  # removed since listed
                raise
    return tuple(sorted(pairs))


def inode_from_stat(path: str, st: os.stat_result, digest: bytes = b"",
                    dir_fd: int | None = None, fd: int | None = None) -> Inode | None:
    """The tree inode for an lstat result (None for sockets); regular files take
    `digest` as their hash. `path` is relative to `dir_fd` if given; `fd`, when the
    inode is open, is where its extended attributes are read (no path lookup)."""
    kind = _KIND_OF.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    if kind == Kind.SYMLINK:
        return symlink(st.st_uid, st.st_gid, os.fsencode(os.readlink(path, dir_fd=dir_fd)))
    xattrs = read_xattrs(path, dir_fd) if fd is None else read_xattrs(fd)
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
    trusted: Mapping[int, Trusted] | None = None,
    fresh: dict[int, ChangeKey] | None = None,
    on_directory: DirectoryHook | None = None,
    open_first: bool = False,
    previous: Mapping[int, Inode] | None = None,
) -> Tree:
    """Scan the directory `root` into a Tree whose inode numbers are the real ones.

    `exclude` leaves paths (and their subtrees) out; `known_hash` lets a caller
    reuse hashes of files it trusts unchanged, and `trusted` whole inodes by number,
    each while its change key holds (for entries on the root's device only: it saves
    the xattr, link and content reads that make a scan slow); `fresh`, if given, is
    filled with the change key (before the read) of every other inode on the root's
    device read this walk; `on_read` is told every file size actually read, and
    `on_directory` every directory recorded. Directories are walked by descriptor,
    never by full path (no length limit, no symlink followed). Files that vanish or
    change kind while scanning are skipped or recorded as what they became; FIFOs
    and devices are never read.

    `open_first` is for a caller that will read every regular file anyway: an entry
    the listing shows as a regular file is opened without an lstat first, and the
    fstat of the open descriptor stands for it (one system call fewer per file; the
    hooks see that fstat). `previous` holds the inodes of an earlier scan by number:
    a regular file read again and found equal to the earlier inode of its number is
    recorded as that very object (no new one made, and comparing the two trees
    costs an identity check for it).
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
        walk = _Walk(root_fd, exclude, known_hash, on_read)
        walk.trusted, walk.fresh, walk.on_directory = trusted or {}, fresh, on_directory
        walk.open_first, walk.previous = open_first, previous or {}
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
                 on_read: ReadHook | None) -> None:
        self.exclude, self.known_hash, self.on_read = exclude, known_hash, on_read
        self.trusted: Mapping[int, Trusted] = {}
        self.fresh: dict[int, ChangeKey] | None = None
        self.on_directory: DirectoryHook | None = None
        self.open_first = False
        self.previous: Mapping[int, Inode] = {}
        self.buffer = bytearray(READ_SIZE)  # for every file too large for one read
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
        tree, exclude, device, open_first = self.tree, self.exclude, self.device, \
            self.open_first
        inodes, kids, trusted = tree.inodes, tree.children[ino], self.trusted.get
        fresh = self.fresh if self.fresh is not None else {}
        frame = _Frame(name, ino, fd, [])
        self.frames.append(frame)  # first: close() releases it if this raises
        self.held += 1
        self._limit(keep=len(self.frames) - 1)
        subdirs = frame.pending
        prefix = path if path == "/" else path + "/"
        if isinstance(exclude, Excluder) and not exclude.may_exclude_below(prefix):
            exclude = None  # nothing here can be excluded: no need to ask per entry
        entries = 0
        # Per entry, in this loop only: stat fields by index where the tuple has them
        # (st[ST_INO] costs a fifth of st.st_ino), the path made only when needed.
        with os.scandir(fd) as listing:  # each entry (and its stat) freed as the next comes
            for entry in listing:
                entries += 1
                entry_name = entry.name
                if exclude is not None and exclude(prefix + entry_name):
                    continue
                try:
                    # A listed regular file not seen by number yet (no hard link): open it
                    # at once; is_file() and inode() are the listing's, no system call.
                    if open_first and entry.is_file(follow_symlinks=False) \
                            and entry.inode() not in inodes:
                        st, inode = self._open_and_read(entry_name, fd, prefix + entry_name, fresh)
                    else:
                        st = entry.stat(follow_symlinks=False)
                        inode = None
                        if st[ST_DEV] == device:
                            child_ino = st[ST_INO]
                            if child_ino in inodes and not S_ISDIR(st[ST_MODE]):
                                kids[entry_name] = child_ino  # a hard link to an inode seen
                                continue
                            known = trusted(child_ino)
                            if known is not None and (key := known.key)[2] == st.st_ctime_ns \
                                    and key[1] == st.st_mtime_ns and key[0] == st[ST_SIZE]:
                                inode = known.inode  # unchanged (likeliest to differ: ctime)
                            else:
                                fresh[child_ino] = (st[ST_SIZE], st.st_mtime_ns, st.st_ctime_ns)
                        if inode is None:
                            st, inode = self._read_inode(entry_name, fd, prefix + entry_name, st)
                except OSError as err:
                    if err.errno in CHANGED_ERRNOS:
                        continue
                    raise
                if inode is None:
                    continue
                child_ino = st[ST_INO]
                if st[ST_DEV] != device:  # a mount point: its number belongs to another device
                    child_ino = _foreign_number(tree)
                inodes[child_ino] = inode
                kids[entry_name] = child_ino
                if inode.kind is DIRECTORY:
                    tree.children[child_ino] = {}
                    if st[ST_DEV] == device:
                        subdirs.append((entry_name, prefix + entry_name, child_ino))
                    else:
                        log.debug("not crossing mount point %s%s", prefix, entry_name)
        subdirs.reverse()  # pop() takes them in listing order
        if self.on_directory is not None:
            self.on_directory(path, entries)

    def _read_inode(self, name: str, dir_fd: int, path: str, st: os.stat_result
                    ) -> tuple[os.stat_result, Inode | None]:
        """The inode of one directory entry (and the stat it was made from), its
        content hashed unless `known_hash` knows it; None for a socket, or a file
        that changed while read (the next scan catches it). A FIFO or device
        swapped in for a regular file since its lstat is recorded, never read."""
        if not stat.S_ISREG(st.st_mode) or not st.st_size:
            return st, inode_from_stat(name, st, dir_fd=dir_fd)
        if self.known_hash is not None:
            known = self.known_hash(path, st)
            if known is not None:
                return st, inode_from_stat(name, st, known, dir_fd=dir_fd)
        return self._open_and_read(name, dir_fd, path, None)

    def _open_and_read(self, name: str, dir_fd: int, path: str,
                       fresh: dict[int, ChangeKey] | None
                       ) -> tuple[os.stat_result, Inode | None]:
        """Open the regular file `name` and make its inode from the descriptor's fstat,
        content hashed, its change key put in `fresh` when given (the walk opened it
        without an lstat); what is no longer a regular file is recorded as it is
        (never read) or, a directory, left to the next pass; None as in
        `_read_inode`."""
        try:
            fd, st = open_regular(name, dir_fd, shown=path, noatime=True)
        except NotRegularFile as err:
            log.debug("%s", err)
            if stat.S_ISDIR(err.st.st_mode):
                return err.st, None  # a directory now: the next pass enters it
            return err.st, inode_from_stat(name, err.st, dir_fd=dir_fd)
        try:
            ino, size, mtime_ns = st[ST_INO], st[ST_SIZE], st.st_mtime_ns
            if fresh is not None and st[ST_DEV] == self.device:
                fresh[ino] = (size, mtime_ns, st.st_ctime_ns)
            digest = b""
            if size:
                digest, read = hash_fd(fd, size, self.buffer)
                if self.on_read is not None:
                    self.on_read(read)
                if read != size:
                    log.debug("skipping %s: changed while read", path)
                    return st, None
            xattrs = read_xattrs(fd)
            old = self.previous.get(ino)
            if old is not None and old.hash == digest and old.mtime_ns == mtime_ns \
                    and old.size == size and old.kind is REGULAR \
                    and old.mode == st[ST_MODE] & PERMISSION_BITS and old.uid == st[ST_UID] \
                    and old.gid == st[ST_GID] and old.xattrs == xattrs:
                return st, old
            return st, regular(st[ST_MODE], st[ST_UID], st[ST_GID], mtime_ns, size, digest,
                               xattrs)
        finally:
            os.close(fd)


def _foreign_number(tree: Tree) -> int:
    """An inode number no real inode of the scanned device uses."""
    number = (1 << 63) + len(tree.inodes)
    while number in tree.inodes:
        number += 1
    return number
