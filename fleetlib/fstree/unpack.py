"""Making inodes on disk exactly as a tree describes them: kinds, content from an
object store, owners, modes, mtimes, extended attributes, hard links.

Regular files reach their final path only by rename of complete content, so a
killed process never leaves a partial file at a final path.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.safeopen import Directories, pinned
from fleetlib.fstree.tree import Inode, Kind, Tree

log = logging.getLogger(__name__)

IS_ROOT = os.geteuid() == 0


def set_xattrs(path: str, wanted: tuple[tuple[bytes, bytes], ...],
               follow_symlinks: bool = False) -> None:
    """Make the extended attributes of `path` exactly `wanted` (following a symlink
    at `path` only when told: a /proc/self/fd path of a pinned inode)."""
    follow = follow_symlinks
    try:
        present = set(os.listxattr(path, follow_symlinks=follow))
    except OSError as err:
        if err.errno == errno.ENOTSUP and not wanted:
            return
        raise
    keep = {os.fsdecode(name) for name, _ in wanted}
    for name in present - keep:
        os.removexattr(path, name, follow_symlinks=follow)
    for attr, value in wanted:
        os.setxattr(path, attr, value, follow_symlinks=follow)


def apply_metadata(path: str, inode: Inode, *, dir_fd: int | None = None,
                   shown: str | None = None) -> list[str]:
    """Set owner, mode, xattrs and mtime of `path` (in that order: chown clears
    setuid bits and file capabilities). Returns what could not be set for lack of
    privilege (ownership when not root), instead of failing.

    Nothing is followed: the inode at `path` is held by an O_PATH descriptor and
    changed through it, and FleetError says so when it is not of the inode's kind
    (a symlink swapped in for a file, say), changing nothing. With `dir_fd`, `path`
    is a name relative to that open directory (openat-style, so no symlink among
    its parents is followed); `shown` is how problems name the path (default: `path`)."""
    shown = shown or path
    problems = []
    owner = f"{shown}: cannot set owner {inode.uid}:{inode.gid} (not root)"
    if inode.kind == Kind.SYMLINK:  # only its owner: lchown, which follows nothing
        with pinned(path, dir_fd, inode.kind.type_bits, shown):
            try:
                os.chown(path, inode.uid, inode.gid, dir_fd=dir_fd, follow_symlinks=False)
            except PermissionError:
                problems.append(owner)
        return problems
    with pinned(path, dir_fd, inode.kind.type_bits, shown) as target:
        try:
            os.chown(target, inode.uid, inode.gid)
        except PermissionError:
            problems.append(owner)
        os.chmod(target, inode.mode)
        try:
            set_xattrs(target, inode.xattrs, follow_symlinks=True)
        except PermissionError:
            problems.append(f"{shown}: cannot set extended attributes (not root)")
        if inode.kind != Kind.DIRECTORY:
            os.utime(target, ns=(inode.mtime_ns, inode.mtime_ns))
    return problems


def make_node(path: str, inode: Inode, dir_fd: int | None = None) -> None:
    """Create a directory, symlink, device node or fifo (not a regular file), at a
    name relative to `dir_fd` if given."""
    if inode.kind == Kind.DIRECTORY:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    elif inode.kind == Kind.SYMLINK:
        os.symlink(inode.target, path, dir_fd=dir_fd)
    elif inode.kind == Kind.FIFO:
        os.mkfifo(path, 0o600, dir_fd=dir_fd)
    elif inode.kind in (Kind.CHAR_DEVICE, Kind.BLOCK_DEVICE):
        os.mknod(path, inode.kind.type_bits | 0o600, inode.rdev, dir_fd=dir_fd)
    else:
        raise FleetError(f"{path}: cannot make a {inode.kind.name.lower()} with make_node")


def stage_regular(store: ObjectStore, inode: Inode, consume: bool,
                  tmp_dir: Path | None = None) -> str:
    """A complete file on the final filesystem holding the inode's content, ready
    to be renamed into place: the object itself when `consume` (its last use),
    else a copy of it in `tmp_dir` (default: the store's scratch folder)."""
    if consume:
        path = store.path_of(inode.hash)
        if not os.path.exists(path):
            raise FleetError(f"object for a {inode.size}-byte file is not in the cache")
        return path
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or store.tmp_dir)
    os.close(fd)
    if inode.size:
        try:
            shutil.copyfile(store.path_of(inode.hash), tmp)
        except FileNotFoundError:
            os.unlink(tmp)
            raise FleetError(f"object for a {inode.size}-byte file is not in the cache") \
                from None
    return tmp


def unpack_tree(tree: Tree, dest: Path, store: ObjectStore) -> list[str]:
    """Build `tree` in the empty folder `dest` from objects in `store` (which must
    live on the same filesystem; objects are moved out of it). Returns what could
    not be set for lack of privilege. Every call is relative to a directory opened
    without following symlinks: a path of any length, and nothing swapped into
    `dest` meanwhile can redirect a change outside it."""
    uses = Counter(i.hash for i in tree.inodes.values() if i.kind == Kind.REGULAR and i.size)
    made: dict[int, str] = {}
    directories: list[tuple[str, Inode]] = []
    problems: list[str] = []
    with Directories(dest) as dirs:
        for path, ino, inode in tree.walk():
            if ino in made:
                (source_fd, source), (fd, name) = dirs.parents(made[ino], path)
                os.link(source, name, src_dir_fd=source_fd, dst_dir_fd=fd,
                        follow_symlinks=False)
                continue
            made[ino] = path
            fd, name = dirs.parent(path)
            if inode.kind == Kind.DIRECTORY:
                if path != "/":
                    make_node(name, inode, dir_fd=fd)
                directories.append((path, inode))
                continue
            if inode.kind == Kind.REGULAR:
                last_use = False
                if inode.size:
                    uses[inode.hash] -= 1
                    last_use = uses[inode.hash] == 0
                tmp = stage_regular(store, inode, consume=last_use)
                problems += apply_metadata(tmp, inode, shown=path)
                os.rename(tmp, name, dst_dir_fd=fd)
                continue
            make_node(name, inode, dir_fd=fd)
            problems += apply_metadata(name, inode, dir_fd=fd, shown=path)
        for path, inode in reversed(directories):  # children first: modes may forbid writes
            fd, name = dirs.parent(path)
            problems += apply_metadata(name, inode, dir_fd=fd, shown=path)
    return problems


def check_empty_destination(dest: Path) -> None:
    """Refuse to unpack over anything: `dest` must be missing or an empty folder."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise FleetError(f"{dest} exists and is not a folder")
    if any(dest.iterdir()):
        raise FleetError(f"{dest} is not empty")
