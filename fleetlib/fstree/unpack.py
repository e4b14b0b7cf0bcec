"""Making inodes on disk exactly as a tree describes them: kinds, content from an
object store, owners, modes, mtimes, extended attributes, hard links.

`stage_regular` (subd's updates) brings a file to its final path only by rename of
complete content, so a killed process never leaves a partial file at a final path.
`FreshTree` (`image get`) builds a whole tree in an empty directory instead, each
file written at its final path as its object arrives, on several threads.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.safeopen import Directories, pinned
from fleetlib.fstree.tree import Inode, Kind, Tree, split

log = logging.getLogger(__name__)

IS_ROOT = os.geteuid() == 0
MARK = ".image-get.unfinished"  # in a FreshTree's directory until it is finished
UNPACK_THREADS = 8  # a FreshTree's file makers
BUFFERED = 1 << 20  # objects up to this size are written from memory
JOB_FILES = 32  # files handed to a thread at once, or
JOB_BYTES = 1 << 20  # this many bytes of them
QUEUED_JOBS = 64  # handed over and not done: the memory bound (about 64 MiB)
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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


class FreshTree:
    """Builds `tree` in the empty directory `dest` while its objects arrive, as the
    sink of an `ObjectReceiver` (`has`, `batch`, and the batch's `begin`, `pending`
    and `commit_later`) or through `begin` directly.

    Directories are made first (mode 0700 until the end, so nothing below them is
    reachable by others meanwhile), then every inode at its final path: symlinks,
    devices, FIFOs and empty files at once, each regular file as its object arrives
    verified, written and given owner, mode, extended attributes and mtime through its
    open descriptor, its hard links made beside it. File creation here is bound by
    per-file latency, so the files are made on `threads` threads, a few dozen at a
    time. Objects up to BUFFERED bytes are written from memory; a larger one streams
    into its first file, copied from there to other inodes with the same content.
    `finish` sets the directories' metadata, children first.

    `dest` holds MARK while unfinished: a killed build leaves it there beside part of
    the tree (complete directories and files, except those being written, which may
    be short). Nothing outside `dest` is touched: every call is relative to a
    directory opened without following symlinks.
    """

    def __init__(self, tree: Tree, dest: Path, threads: int = UNPACK_THREADS) -> None:
        if MARK in tree.children.get(tree.root, {}):
            raise FleetError(f"the image holds /{MARK}, the name image get works under")
        self.tree, self.dest = tree, dest
        self.problems: list[str] = []
        self.pending: list[object] = []  # the batch protocol: nothing waits for a commit
        self._by_hash: dict[bytes, list[tuple[Inode, list[str]]]] = {}
        self._done: set[bytes] = set()
        self._directories: list[tuple[str, Inode]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._thread_dirs: list[Directories] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="unpack")
        self._room = threading.Semaphore(QUEUED_JOBS)
        self._futures: list[Future[None]] = []
        self._job: list[Callable[[], None]] = []
        self._job_bytes = 0
        self._dirs = Directories(dest)
        self._inherits = False

    def __enter__(self) -> FreshTree:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads (after a failure: before their next files) and close every
        directory."""
        if self._error is None:
            self._error = FleetError("unpacking stopped")
        self._pool.shutdown(wait=True)
        for dirs in [self._dirs, *self._thread_dirs]:
            dirs.close()

    def _start(self) -> None:
        root = self._dirs.fd("/")
        fd = os.open(MARK, _CREATE, 0o600, dir_fd=root)
        try:  # what a new file gets unasked (a default ACL, a security label)
            self._inherits = bool(os.listxattr(fd))
        finally:
            os.close(fd)
        paths: dict[int, list[str]] = {}
        for path, ino, inode in self.tree.walk():
            if ino in paths:
                paths[ino].append(path)
                continue
            paths[ino] = [path]
            if inode.kind == Kind.DIRECTORY:
                if path != "/":
                    fd, name = self._dirs.parent(path)
                    os.mkdir(name, 0o700, dir_fd=fd)
                self._directories.append((path, inode))
        for ino, names in paths.items():
            inode = self.tree.inodes[ino]
            if inode.kind == Kind.DIRECTORY:
                continue
            if inode.kind == Kind.REGULAR and inode.size:
                self._by_hash.setdefault(inode.hash, []).append((inode, names))
            else:
                self._queue(functools.partial(self._make_other, inode, names), 0)

    def order(self) -> list[bytes]:
        """The objects still needed, in the order best asked for: one directory's
        after another's in turn, so that the threads create files in different
        directories (creating in one directory is serialized by its lock)."""
        by_parent: dict[str, list[bytes]] = {}
        for digest, users in self._by_hash.items():
            by_parent.setdefault(split(users[0][1][0])[0], []).append(digest)
        turns = itertools.zip_longest(*by_parent.values())
        return [digest for turn in turns for digest in turn if digest is not None]

    def has(self, digest: bytes) -> bool:
        """Whether the object was written already (a second copy is read past)."""
        return digest in self._done

    def batch(self) -> FreshTree:
        """The receiver's batch: this builder itself."""
        return self

    def begin(self, digest: bytes, size: int) -> Arrival:
        """Start receiving one object of the tree."""
        if self._error is not None:
            raise self._error
        users = self._by_hash.get(digest)
        if users is None or users[0][0].size != size:
            raise FleetError(f"object {format_hash(digest)} ({size} bytes) is not one the "
                             "image needs")
        return Arrival(self, digest, size)

    def commit_later(self) -> Future[int]:
        """Hand the files gathered so far to the threads; nothing else to wait for."""
        self._flush()
        done: Future[int] = Future()
        done.set_result(0)
        return done

    def finish(self) -> list[str]:
        """Wait for every file, then set the directories' metadata (children first:
        modes may forbid writes) and drop MARK. Returns what could not be set for lack
        of privilege; FleetError when an object never arrived."""
        self._flush()
        for future in self._futures:
            future.result()
        if self._error is not None:
            raise self._error
        if self._by_hash:
            digest, users = next(iter(self._by_hash.items()))
            raise FleetError(f"{len(self._by_hash)} object(s) of the image never arrived, "
                             f"e.g. {format_hash(digest)} ({users[0][0].size} bytes)")
        os.unlink(MARK, dir_fd=self._dirs.fd("/"))
        for path, inode in reversed(self._directories):
            fd, name = self._dirs.parent(path)
            self.problems += apply_metadata(name, inode, dir_fd=fd, shown=path)
        return self.problems

    def _arrived(self, digest: bytes, data: bytes | None, fd: int = -1) -> None:
        """An object verified: in memory (DATA), or written to its first file (FD)."""
        users = self._by_hash.pop(digest)
        self._done.add(digest)
        if data is None:
            self._queue(functools.partial(self._finish_streamed, fd, users), 0)
            return
        for inode, paths in users:
            self._queue(functools.partial(self._make_file, inode, paths, data), len(data))

    def _queue(self, job: Callable[[], None], size: int) -> None:
        self._job.append(job)
        self._job_bytes += size
        if len(self._job) >= JOB_FILES or self._job_bytes >= JOB_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._job:
            return
        jobs, self._job, self._job_bytes = self._job, [], 0
        self._room.acquire()
        future = self._pool.submit(self._run, jobs)
        future.add_done_callback(lambda _: self._room.release())
        self._futures.append(future)

    def _run(self, jobs: list[Callable[[], None]]) -> None:
        try:
            for job in jobs:
                if self._error is not None:
                    return
                job()
        except BaseException as err:  # noqa: BLE001 - raised again by begin or finish
            with self._lock:
                if self._error is None:
                    self._error = err

    def directories(self) -> Directories:
        """This thread's open directories of the tree (one set per thread)."""
        dirs: Directories | None = getattr(self._local, "dirs", None)
        if dirs is None:
            dirs = self._local.dirs = Directories(self.dest)
            with self._lock:
                self._thread_dirs.append(dirs)
        return dirs

    def create(self, path: str, dirs: Directories) -> int:
        """A new file at tree path PATH, open for reading and writing."""
        fd, name = dirs.parent(path)
        return os.open(name, _CREATE, 0o600, dir_fd=fd)

    def _make_file(self, inode: Inode, paths: list[str], data: bytes) -> None:
        dirs = self.directories()
        fd = self.create(paths[0], dirs)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._set_metadata(fd, inode, paths[0])
        finally:
            os.close(fd)
        self._link(paths, dirs)

    def _finish_streamed(self, fd: int, users: list[tuple[Inode, list[str]]]) -> None:
        """The other inodes of a streamed object copied from its first file, then that
        file's metadata."""
        dirs = self.directories()
        try:
            for inode, paths in users[1:]:
                copy = self.create(paths[0], dirs)
                try:
                    copied = 0
                    while copied < inode.size:
                        step = os.copy_file_range(fd, copy, inode.size - copied, copied)
                        if not step:
                            raise FleetError(f"{paths[0]}: copy ended early")
                        copied += step
                    self._set_metadata(copy, inode, paths[0])
                finally:
                    os.close(copy)
                self._link(paths, dirs)
            self._set_metadata(fd, users[0][0], users[0][1][0])
        finally:
            os.close(fd)
        self._link(users[0][1], dirs)

    def _make_other(self, inode: Inode, paths: list[str]) -> None:
        """An empty file, symlink, device node or FIFO, and its hard links."""
        dirs = self.directories()
        if inode.kind == Kind.REGULAR:
            fd = self.create(paths[0], dirs)
            try:
                self._set_metadata(fd, inode, paths[0])
            finally:
                os.close(fd)
        else:
            fd, name = dirs.parent(paths[0])
            make_node(name, inode, dir_fd=fd)
            self.problems += apply_metadata(name, inode, dir_fd=fd, shown=paths[0])
        self._link(paths, dirs)

    def _link(self, paths: list[str], dirs: Directories) -> None:
        for other in paths[1:]:
            (source_fd, source), (fd, name) = dirs.parents(paths[0], other)
            os.link(source, name, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)

    def _set_metadata(self, fd: int, inode: Inode, shown: str) -> None:
        """Owner, mode, extended attributes and mtime of a new file, in that order
        (chown clears setuid bits and file capabilities, as writing does)."""
        try:
            os.fchown(fd, inode.uid, inode.gid)
        except PermissionError:
            self.problems.append(f"{shown}: cannot set owner {inode.uid}:{inode.gid} "
                                 "(not root)")
        os.fchmod(fd, inode.mode)
        try:
            if self._inherits:
                keep = {os.fsdecode(name) for name, _ in inode.xattrs}
                for name in set(os.listxattr(fd)) - keep:
                    os.removexattr(fd, name)
            for attr, value in inode.xattrs:
                os.setxattr(fd, attr, value)
        except PermissionError:
            self.problems.append(f"{shown}: cannot set extended attributes (not root)")
        os.utime(fd, ns=(inode.mtime_ns, inode.mtime_ns))


class Arrival:
    """One object arriving for a FreshTree: its pieces, hashed as they come, kept in
    memory or (above BUFFERED bytes) written to its first file; `finish` verifies it."""

    def __init__(self, fresh: FreshTree, digest: bytes, size: int) -> None:
        self.fresh, self.digest, self.size = fresh, digest, size
        self.received = 0
        self._hash = hashlib.sha256()
        self._pieces: list[bytes] = []
        self._fd = -1
        if size > BUFFERED:
            first = fresh._by_hash[digest][0][1][0]
            self._fd = fresh.create(first, fresh._dirs)

    def write(self, data: bytes) -> None:
        """Take the next piece; FleetError past the declared size."""
        self.received += len(data)
        if self.received > self.size:
            self.abort()
            raise FleetError(f"object {format_hash(self.digest)}: more than the declared "
                             f"{self.size} bytes")
        self._hash.update(data)
        if self._fd < 0:
            self._pieces.append(data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def finish(self) -> None:
        """Verify size and hash, then hand the object to its files."""
        if self.received != self.size or self._hash.digest() != self.digest:
            self.abort()
            raise FleetError(f"object {format_hash(self.digest)}: content does not match its "
                             "hash (corrupt or forged)")
        if self._fd >= 0:
            self.fresh._arrived(self.digest, None, self._fd)
            self._fd = -1
        else:
            self.fresh._arrived(self.digest, b"".join(self._pieces))

    def abort(self) -> None:
        """Drop what arrived (a streamed file stays short: the whole build fails)."""
        self._pieces = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

def unpack_tree(tree: Tree, dest: Path, store: ObjectStore) -> list[str]:
    """Build `tree` in the empty folder `dest` from the objects `store` holds (a
    FreshTree fed from disk instead of a stream). Returns what could not be set for
    lack of privilege; FleetError when the store lacks an object."""
    sizes = tree.object_sizes()
    with FreshTree(tree, dest) as fresh:
        for digest in fresh.order():
            if store.has(digest):
                arrival = fresh.begin(digest, sizes[digest])
                with store.open(digest) as reader:
                    while piece := reader.read(BUFFERED):
                        arrival.write(piece)
                arrival.finish()
        return fresh.finish()


def check_empty_destination(dest: Path) -> None:
    """Refuse to unpack over anything: `dest` must be missing or an empty folder."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise FleetError(f"{dest} exists and is not a folder")
    if any(dest.iterdir()):
        raise FleetError(f"{dest} is not empty")


def empty_directory(dest: Path) -> None:
    """Remove everything inside `dest` (not following symlinks), leaving it empty."""
    for entry in os.scandir(dest):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
