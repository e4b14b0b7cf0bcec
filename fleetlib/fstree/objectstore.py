"""The content-addressed object store shared by the image server and subd's cache.

Objects live at `ROOT/ab/cd/<rest of hex>` named by the SHA-256 of their bytes.
Every object is written under a temporary name in `ROOT/.tmp`, verified against
its declared hash and size, made durable, and only then renamed into place, so
a final path never holds a partial or wrong object, whenever the process dies.
Durability is batched: one `syncfs` covers every object of a batch (fsync per
object costs 0.25 ms each here; syncfs of 2,000 new files costs 40 ms).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

from fleetlib.errors import FleetError, NoSpaceError, NotFoundError
from fleetlib.fstree.hashing import HASH_SIZE, check_hash, format_hash

log = logging.getLogger(__name__)

T = TypeVar("T")
QUEUED_JOBS = 256  # pieces of up to 1 MiB waiting for the I/O thread
WHOLES_PER_JOB = 64  # objects that arrived whole written by one I/O job, or
WHOLE_BYTES = 1 << 20  # this many bytes of them
ROOM_CHECK = 64 << 20  # bytes written between two looks at the free space, at most
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

TMP_DIR = ".tmp"
SPACE_MARGIN = 0.02  # keep this share of a filesystem free
_libc = ctypes.CDLL(None, use_errno=True)


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged user may still write on the filesystem of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def room_left(path: Path | str) -> int:
    """Bytes that may still be written on the filesystem of `path`, keeping the margin
    free (negative when less than the margin is free)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize - int(st.f_blocks * st.f_frsize * SPACE_MARGIN)


def check_free_space(path: Path | str, needed: int) -> None:
    """NoSpaceError when writing `needed` bytes would leave less than the margin."""
    available = room_left(path)
    if needed > available:
        raise NoSpaceError(f"insufficient space on {path}: need {needed} bytes, "
                           f"{max(available, 0)} available")


def space_error(err: OSError, path: Path | str, what: str) -> Exception:
    """For a full filesystem or quota (ENOSPC, EDQUOT) while writing `what`, a
    NoSpaceError naming `path` and its free bytes; any other error as it is."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    return NoSpaceError(f"insufficient space on {path}: {os.strerror(err.errno).lower()} "
                        f"writing {what}, {free_bytes(path)} bytes free")


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding `path` to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes | Iterable[bytes], mode: int = 0o644,
                          overwrite: bool = True) -> None:
    """Write `data` (bytes, or pieces as they arrive) to `path` via a temporary name in
    the same folder: fsync, rename, fsync the folder. Readers see the old file or the
    new one, never a mix; on any failure the temporary file goes and `path` is as it was.
    Without `overwrite` the file is published with a hard link instead of a rename, so
    of two writers racing for one path exactly one wins and the other gets
    FileExistsError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in (data,) if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if overwrite:
            os.rename(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_directory(path: Path) -> None:
    """Make renames and unlinks inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectWriter:
    """One object being written: feed it bytes, then `finish` verifies them.

    Hashing happens here, on the caller's thread; creating and writing the file
    happen in order on the store's I/O thread, so receiving the next piece and
    the disk work overlap. An object that arrives whole in one piece is kept until
    verified and then written with others of its batch in one I/O job (create,
    write, close), not one hop per call. I/O errors surface when the batch commits.
    """

    def __init__(self, batch: Batch, digest: bytes, size: int) -> None:
        self.digest = digest
        self.size = size
        self.received = 0
        self.error: OSError | None = None
        self.tmp = batch.store.new_tmp_path()
        self._batch = batch
        self._hash = hashlib.sha256()
        self._fd = -1
        self._opened = False  # the file's open is queued (the object came in pieces)
        self._whole: bytes | None = None  # the whole content, until verified
        self.queued_whole = False  # written by a job of its batch

    def _open(self) -> None:
        try:
            self._fd = os.open(self.tmp, _CREATE, 0o600)
        except OSError as err:
            self.error = err

    def _write(self, data: bytes) -> None:
        try:
            if self.error is not None:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as err:
            self.error = err
        finally:
            self._batch.store.account(-len(data))

    def _close(self, discard: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if discard:
            _discard(self.tmp)

    def write_whole(self, data: bytes) -> None:
        """On the I/O thread: the file made with all its content at once."""
        self._open()
        self._write(data)
        self._close(False)

    def write(self, data: bytes) -> None:
        """Append content; FleetError past the declared size."""
        self.received += len(data)
        if self.received > self.size:
            self.abort()
            raise FleetError(
                f"object {format_hash(self.digest)}: more than the declared {self.size} bytes")
        self._hash.update(data)
        store = self._batch.store
        store.account(len(data))
        if not self._opened and self.received == self.size:
            self._whole = bytes(data)  # all of it at once: written after `finish`
            return
        if not self._opened:
            self._opened = True
            store.queue(self._open)
        store.queue(functools.partial(self._write, bytes(data)))

    def finish(self) -> None:
        """Verify size and hash; on success the object joins its batch for commit."""
        if self.received != self.size:
            self.abort()
            raise FleetError(f"object {format_hash(self.digest)}: got {self.received} bytes, "
                             f"declared {self.size}")
        if self._hash.digest() != self.digest:
            self.abort()
            raise FleetError(f"object {format_hash(self.digest)}: content does not match its "
                             "hash (corrupt or forged)")
        if self._whole is not None:
            self._batch.write_whole(self, self._whole)
            self._whole = None
        else:
            self._batch.store.queue(functools.partial(self._close, False))
        self._batch.pending.append(self)

    def abort(self) -> None:
        """Drop the partial object."""
        if self._whole is not None:
            self._batch.store.account(-len(self._whole))
            self._whole = None
        if self._opened or self.queued_whole:
            self._batch.store.queue(functools.partial(self._close, True))


def _write_wholes(wholes: list[tuple[ObjectWriter, bytes]]) -> None:
    for writer, data in wholes:
        writer.write_whole(data)


class Batch:
    """Objects written together and made durable by one filesystem sync."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.pending: list[ObjectWriter] = []
        self._wholes: list[tuple[ObjectWriter, bytes]] = []  # verified, not yet queued
        self._whole_bytes = 0

    def begin(self, digest: bytes, size: int) -> ObjectWriter:
        """Start writing one object whose hash and size are declared up front;
        NoSpaceError when the store's filesystem has no room for it."""
        check_hash(digest)
        if size <= 0:
            raise FleetError("empty files are not objects")
        self.store.check_space(size)
        return ObjectWriter(self, digest, size)

    def write_whole(self, writer: ObjectWriter, data: bytes) -> None:
        """Queue the file of a verified object that arrived whole, with others."""
        self._wholes.append((writer, data))
        writer.queued_whole = True
        self._whole_bytes += len(data)
        if len(self._wholes) >= WHOLES_PER_JOB or self._whole_bytes >= WHOLE_BYTES:
            self._queue_wholes()

    def _queue_wholes(self) -> None:
        if self._wholes:
            wholes, self._wholes, self._whole_bytes = self._wholes, [], 0
            self.store.queue(functools.partial(_write_wholes, wholes))

    def commit(self) -> int:
        """Sync, then rename every verified object into place; returns how many.
        OSError if writing any of them failed (the others are still committed)."""
        return self.commit_later().result()

    def commit_later(self) -> Future[int]:
        """`commit`, queued behind the batch's writes; the future gives its result."""
        self._queue_wholes()
        pending, self.pending = self.pending, []
        return self.store.queue(functools.partial(self._commit, pending))

    def _commit(self, pending: list[ObjectWriter]) -> int:
        failed = [writer for writer in pending if writer.error is not None]
        for writer in failed:
            _discard(writer.tmp)
        good = [writer for writer in pending if writer.error is None]
        renamed = 0
        try:
            if good and self.store.durable:
                sync_filesystem(self.store.tmp_dir)
            for writer in good:
                os.rename(writer.tmp, self.store.path_for_writing(writer.digest))
                renamed += 1
            if good and self.store.durable:
                sync_filesystem(self.store.tmp_dir)
        except OSError as err:
            for writer in good[renamed:]:
                _discard(writer.tmp)
            raise self.store.write_failure(err, good[min(renamed, len(good) - 1)]) from None
        if failed:
            first = failed[0]
            assert first.error is not None
            raise self.store.write_failure(first.error, first) from None
        return len(good)

    def abort(self) -> None:
        """Forget every uncommitted object."""
        for writer, data in self._wholes:  # never written
            writer.queued_whole = False
            self.store.account(-len(data))
        self._wholes, self._whole_bytes = [], 0
        pending, self.pending = self.pending, []
        for writer in pending:
            writer.abort()
        self.store.drain()


class ObjectStore:
    """A folder of objects named by content hash.

    A `scratch` store (a staging area its user empties, such as `image get`'s)
    keeps objects flat in one folder and skips the syncs; its renames still
    protect against a killed process, though not against a power cut.
    """

    def __init__(self, root: Path, scratch: bool = False) -> None:
        self.root = Path(root)
        self.durable = not scratch
        self._fanout = not scratch
        self.unwritten = 0  # bytes queued for the I/O thread, not yet written
        self._grantable = 0  # bytes check_space may grant without asking the filesystem
        self._unwritten_lock = threading.Lock()
        self._start_io()
        self._names = itertools.count()
        self.tmp_dir = self.root / TMP_DIR
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_prefix = f"{self.tmp_dir}/{os.getpid()}.{os.urandom(4).hex()}."
        self._prefix = os.fspath(self.root) + "/"
        self._folders: set[str] = set()

    def account(self, queued: int) -> None:
        """Count bytes queued for the I/O thread (positive) or written (negative)."""
        with self._unwritten_lock:
            self.unwritten += queued

    def check_space(self, size: int) -> None:
        """NoSpaceError unless `size` more bytes fit, counting queued writes. The
        filesystem is asked again once ROOM_CHECK bytes (or what it had left, if
        less) were granted since it last was, not for every small object."""
        with self._unwritten_lock:
            if size <= self._grantable:
                self._grantable -= size
                return
        available = room_left(self.root)
        with self._unwritten_lock:
            needed = size + self.unwritten
            self._grantable = max(0, min(available - needed, ROOM_CHECK))
        if needed > available:
            check_free_space(self.root, needed)  # asked again: it says what is missing

    def write_failure(self, err: OSError, writer: ObjectWriter) -> Exception:
        """What to raise for `err` while writing the object of `writer`."""
        return space_error(err, self.root,
                           f"object {format_hash(writer.digest)} ({writer.size} bytes)")

    def _start_io(self) -> None:
        self._io = ThreadPoolExecutor(1, thread_name_prefix="object-io")
        self._room = threading.Semaphore(QUEUED_JOBS)
        self._io_pid = os.getpid()

    def queue(self, job: Callable[[], T]) -> Future[T]:
        """Run `job` on the store's I/O thread, after every job queued before it.
        Blocks while too many jobs wait (the disk sets the pace)."""
        if self._io_pid != os.getpid():  # a forked child has no copy of the thread
            self._start_io()
        self._room.acquire()
        future = self._io.submit(job)
        future.add_done_callback(lambda _: self._room.release())
        return future

    def drain(self) -> None:
        """Wait for every queued job."""
        self.queue(lambda: None).result()

    def new_tmp_path(self) -> str:
        """A fresh temporary name in the store's scratch folder."""
        return f"{self._tmp_prefix}{next(self._names)}"

    def recover(self) -> int:
        """Remove temporary files a killed process left behind; returns how many."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        if removed:
            log.info("removed %d partial object(s) left by an interrupted write", removed)
        return removed

    def path_of(self, digest: bytes) -> str:
        """Where the object with this hash lives."""
        hexa = check_hash(digest).hex()
        if not self._fanout:
            return self._prefix + hexa
        return f"{self._prefix}{hexa[:2]}/{hexa[2:4]}/{hexa[4:]}"

    def path_for_writing(self, digest: bytes) -> str:
        """`path_of`, with its folders made if needed."""
        path = self.path_of(digest)
        folder = path[:len(self._prefix) + 5]
        if self._fanout and folder not in self._folders:
            try:
                os.mkdir(folder)
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
            except FileExistsError:
                pass
            self._folders.add(folder)
        return path

    def size_of(self, digest: bytes) -> int | None:
        """Size of a stored object, or None when absent."""
        try:
            return os.stat(self.path_of(digest)).st_size
        except FileNotFoundError:
            return None

    def has(self, digest: bytes) -> bool:
        """Whether the object is stored."""
        return self.size_of(digest) is not None

    def open(self, digest: bytes) -> BinaryIO:
        """Open a stored object for reading; FleetError when absent."""
        try:
            return open(self.path_of(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"object {format_hash(digest)} is not stored") from None

    def batch(self) -> Batch:
        """A new batch of objects to write."""
        return Batch(self)

    def add_bytes(self, data: bytes) -> bytes:
        """Store `data` (non-empty) and return its hash; for small objects and tests."""
        digest = hashlib.sha256(data).digest()
        if not self.has(digest):
            batch = self.batch()
            writer = batch.begin(digest, len(data))
            writer.write(data)
            writer.finish()
            batch.commit()
        return digest

    def remove(self, digest: bytes) -> int:
        """Delete an object; returns the bytes freed (0 when it was absent)."""
        path = self.path_of(digest)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size

    def __iter__(self) -> Iterator[bytes]:
        """Every stored object's hash."""
        if not self._fanout:
            for entry in os.scandir(self.root):
                if len(entry.name) == 2 * HASH_SIZE and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(ValueError):
                        yield bytes.fromhex(entry.name)
            return
        for top in os.scandir(self.root):
            if len(top.name) != 2 or not top.is_dir(follow_symlinks=False):
                continue
            for mid in os.scandir(top.path):
                for leaf in os.scandir(mid.path):
                    hexa = top.name + mid.name + leaf.name
                    if len(hexa) == 2 * HASH_SIZE:
                        try:
                            yield bytes.fromhex(hexa)
                        except ValueError:
                            continue
