"""Scanning a directory into a Tree: lstat every entry, SHA-256 every regular
file, never cross a mount point, skip sockets.

The root's own device is the scan's device: a directory on another device (a
mount point) is recorded as an empty directory and not entered.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import hash_fd
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

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NOATIME = getattr(os, "O_NOATIME", 0)
_KIND_OF = {
    stat.S_IFDIR: Kind.DIRECTORY, stat.S_IFREG: Kind.REGULAR, stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHAR_DEVICE, stat.S_IFBLK: Kind.BLOCK_DEVICE, stat.S_IFIFO: Kind.FIFO,
}


def read_xattrs(path: str) -> Xattrs:
    """Extended attributes of `path` (not following symlinks), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENOENT):
            return ()
        raise
    if not names:
        return ()
    pairs = []
    for name in names:
        try:
            pairs.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)))
        except OSError as err:
            if err.errno != errno.ENODATA:  # removed since listed
                raise
    return tuple(sorted(pairs))


def hash_file(path: str) -> tuple[bytes, int]:
    """SHA-256 and size of a regular file, opened without following symlinks and,
    where permitted, without touching its access time."""
    global _NOATIME
    try:
        fd = os.open(path, _OPEN_FLAGS | _NOATIME)
    except PermissionError:
        if not _NOATIME:
            raise
        _NOATIME = 0  # O_NOATIME needs ownership or CAP_FOWNER
        fd = os.open(path, _OPEN_FLAGS)
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


def inode_from_stat(path: str, st: os.stat_result, digest: bytes = b"") -> Inode | None:
    """The tree inode for an lstat result (None for sockets); regular files take
    `digest` as their hash."""
    kind = _KIND_OF.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    if kind == Kind.SYMLINK:
        return symlink(st.st_uid, st.st_gid, os.fsencode(os.readlink(path)))
    xattrs = read_xattrs(path)
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
    size actually read. Files that vanish while scanning are skipped.
    """
    top = os.fspath(root)
    try:
        root_st = os.lstat(top)
    except OSError as err:
        raise FleetError(f"cannot scan {top}: {err.strerror}") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise FleetError(f"cannot scan {top}: not a directory")
    device = root_st.st_dev
    root_inode = directory(root_st.st_mode, root_st.st_uid, root_st.st_gid, read_xattrs(top))
    tree = Tree(root_st.st_ino, {root_st.st_ino: root_inode}, {root_st.st_ino: {}})
    stack = [("/", top, root_st.st_ino)]
    while stack:
        path, real, ino = stack.pop()
        kids = tree.children[ino]
        try:
            entries = list(os.scandir(real))
        except FileNotFoundError:
            continue
        for entry in entries:
            child_path = join(path, entry.name)
            if exclude is not None and exclude(child_path):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                child_ino = st.st_ino
                if st.st_dev == device and child_ino in tree.inodes \
                        and not stat.S_ISDIR(st.st_mode):  # a hard link to an inode seen
                    kids[entry.name] = child_ino
                    continue
                inode = None
                if known_inode is not None and st.st_dev == device:
                    inode = known_inode(child_path, st)
                if inode is None:
                    inode = _read_inode(entry, child_path, st, known_hash, on_read)
            except FileNotFoundError:
                continue
            if inode is None:
                continue
            if st.st_dev != device:  # a mount point: its number belongs to another device
                child_ino = _foreign_number(tree)
            tree.inodes[child_ino] = inode
            kids[entry.name] = child_ino
            if inode.kind == Kind.DIRECTORY:
                tree.children[child_ino] = {}
                if st.st_dev == device:
                    stack.append((child_path, entry.path, child_ino))
                else:
                    log.debug("not crossing mount point %s", child_path)
    return tree


def _read_inode(entry: os.DirEntry[str], path: str, st: os.stat_result,
                known_hash: HashLookup | None, on_read: ReadHook | None) -> Inode | None:
    """The inode of one directory entry, its content hashed unless `known_hash`
    knows it; None for a socket, or a file that changed while read (the next scan
    catches it)."""
    digest = b""
    if stat.S_ISREG(st.st_mode) and st.st_size:
        known = known_hash(path, st) if known_hash else None
        if known is not None:
            digest = known
        else:
            digest, size = hash_file(entry.path)
            if on_read is not None:
                on_read(size)
            if size != st.st_size:
                log.debug("skipping %s: changed while read", path)
                return None
    return inode_from_stat(entry.path, st, digest)


def _foreign_number(tree: Tree) -> int:
    """An inode number no real inode of the scanned device uses."""
    number = (1 << 63) + len(tree.inodes)
    while number in tree.inodes:
        number += 1
    return number
