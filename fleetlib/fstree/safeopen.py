"""Reaching files in a tree a hostile local user may change at any moment: never
follow a symlink (in the last component or among the parents), never block on a
FIFO or stream a device, and never need a full path (no PATH_MAX limit).

- `open_regular` opens a regular file for reading, O_NONBLOCK and O_NOFOLLOW,
  and refuses anything else after an fstat of the descriptor;
- `open_under` does so for a tree path below a root, one directory at a time;
- `Directories` keeps the directories of a tree open by tree path for
  openat-style (`dir_fd`) calls;
- `pinned` holds a non-symlink by an O_PATH descriptor for metadata changes
  through /proc/self/fd, so a swap after the check changes nothing outside.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.tree import split

log = logging.getLogger(__name__)

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_NOATIME = getattr(os, "O_NOATIME", 0)
_noatime_allowed = bool(_NOATIME)  # O_NOATIME needs ownership or CAP_FOWNER
MAX_OPEN_DIRS = 256
_KIND_NAMES = {
    stat.S_IFDIR: "directory", stat.S_IFREG: "regular file", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char_device", stat.S_IFBLK: "block_device", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def kind_name(mode: int) -> str:
    """What an st_mode's file type is, in words ("fifo", "char_device", ...)."""
    return _KIND_NAMES.get(stat.S_IFMT(mode), "unknown file type")


class NotRegularFile(FleetError):
    """What is at the path is not a regular file (now); `st` is its fstat."""

    def __init__(self, shown: str, st: os.stat_result) -> None:
        super().__init__(f"{shown}: not a regular file (a {kind_name(st.st_mode)})")
        self.st = st


def open_regular(name: str | bytes, dir_fd: int | None = None, *, shown: str | None = None,
                 noatime: bool = False, extra_flags: int = 0) -> tuple[int, os.stat_result]:
    """(descriptor, its fstat) of the regular file `name` (relative to `dir_fd` if
    given), opened for reading without following a symlink, without blocking on a
    FIFO and without becoming a controlling tty; `noatime` also leaves its access
    time alone where permitted; `extra_flags` adds open flags (O_DIRECT, say).
    NotRegularFile for anything else (the caller must not read it); OSError (ELOOP
    for a symlink, ENOENT, ...) when it cannot be opened."""
    global _noatime_allowed
    fd = -1
    if noatime and _noatime_allowed:
        try:
            fd = os.open(name, READ_FLAGS | _NOATIME | extra_flags, dir_fd=dir_fd)
        except PermissionError:
            _noatime_allowed = False
    if fd < 0:
        fd = os.open(name, READ_FLAGS | extra_flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(shown or os.fsdecode(name), st)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_under(root: Path | str, path: str) -> tuple[int, os.stat_result]:
    """`open_regular` for the tree path `path` below `root`, its directories opened
    one at a time without following symlinks (any length of path)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = path.strip("/").split("/")
        for part in parts[:-1]:
            next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return open_regular(parts[-1], fd, shown=path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def pinned(name: str, dir_fd: int | None, type_bits: int, shown: str) -> Iterator[str]:
    """A /proc/self/fd path naming the inode at `name` (relative to `dir_fd`) that is
    not a symlink and whose file type is `type_bits`, held open (O_PATH, O_NOFOLLOW)
    for the block: calls through it (chmod, chown, xattrs, utime, all following
    links) change that inode whatever replaces `name` meanwhile. FleetError when
    `name` is of another type (a symlink swapped in, say)."""
    fd = os.open(name, _PIN_FLAGS, dir_fd=dir_fd)
    try:
        found = stat.S_IFMT(os.fstat(fd).st_mode)
        if found != type_bits:
            raise FleetError(f"{shown}: expected a {kind_name(type_bits)}, found a "
                             f"{kind_name(found)}: left unchanged")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class Directories:
    """The directories of a tree below `root`, opened one component at a time without
    following symlinks (O_PATH), kept open by tree path for `dir_fd` calls."""

    def __init__(self, root: Path | str) -> None:
        self._fds = {"/": os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}
        self.evictions = 0

    def __enter__(self) -> Directories:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every directory."""
        self._close(lambda _: True)

    def fd(self, path: str) -> int:
        """The directory at tree path `path`; OSError (ENOENT, ENOTDIR, ELOOP) when a
        component is missing, a symlink or not a directory. Use it before the next
        call: a full cache closes what it holds (and counts an eviction)."""
        found = self._fds.get(path)
        if found is not None:
            return found
        if len(self._fds) >= MAX_OPEN_DIRS:
            self._close(lambda p: p != "/")
            self.evictions += 1
        missing = []
        while path not in self._fds:
            missing.append(path)
            path = split(path)[0]
        fd = self._fds[path]
        for below in reversed(missing):
            fd = os.open(split(below)[1], DIR_FLAGS, dir_fd=fd)
            self._fds[below] = fd
        return fd

    def parent(self, path: str) -> tuple[int, str]:
        """(parent directory, name) of a tree path; the root is (root, ".")."""
        if path == "/":
            return self._fds["/"], "."
        parent, name = split(path)
        return self.fd(parent), name

    def parents(self, first: str, second: str) -> tuple[tuple[int, str], tuple[int, str]]:
        """`parent` of two paths, both open at once (for link and rename)."""
        evictions = self.evictions
        one, two = self.parent(first), self.parent(second)
        if self.evictions != evictions:  # opening the second closed the first
            one = self.parent(first)
        return one, two

    def forget(self, path: str) -> None:
        """Close `path` and what lies below it: it is being removed."""
        self._close(lambda p: p == path or p.startswith(path + "/"))

    def _close(self, which: Callable[[str], bool]) -> None:
        for path in [p for p in self._fds if which(p)]:
            os.close(self._fds.pop(path))


# What an entry that changed under a walk raises (gone, or now a symlink, a
# non-directory, a socket): the walk skips it and the next one sees what it became.
CHANGED_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO))
