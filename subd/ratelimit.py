"""Keeping subd's scanner gentle: how fast the device reads, how much the
scanner really read from it, and pacing that holds reads and CPU to a share.

Both limiters pace a whole scan: each `pace()` sleeps just long enough that
the amount used since the scan started, divided by the allowed rate, is no
more than the time elapsed. They look at the kernel only now and then (every
MiB read, every few hundred files), so calling them per file costs little.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.objectstore import write_file_atomically
from fleetlib.fstree.safeopen import NotRegularFile, open_regular
from fleetlib.fstree.scan import scan_directory

log = logging.getLogger(__name__)

SPEED_FILE = "device-read-speed"
# Assumed when the device cannot be measured (no O_DIRECT, as on tmpfs, or
# nothing to read): a modest SATA SSD; 2 % of it is 4 MB/s of scan reads.
DEFAULT_READ_SPEED = 200e6
IO_ACCOUNTING = Path("/proc/thread-self/io")

_MEASURE_SECONDS = 0.5
_MEASURE_BYTES = 256 << 20
_MEASURE_FILES = 4000  # directory entries looked at to find big files
_CHUNK = 1 << 20
_CHECK_BYTES = 1 << 20  # ReadLimiter reads /proc after this many logical bytes
_CHECK_UNITS = 256  # CpuLimiter reads the thread's CPU clock every this many units of work
HASH_UNIT = 64 << 10  # hashing this many bytes is about one unit (a file's lstat and upkeep)
_NOT_READ = b"\0" * 32  # a placeholder hash: the candidate search reads no content

Clock = Callable[[], float]
Sleep = Callable[[float], None]


def measure_read_speed(root: Path, state_dir: Path) -> float:
    """The read bandwidth (bytes/s) of the device holding `root`, measured once
    and then remembered in `state_dir/device-read-speed`.

    Reads the largest files found among the first few thousand entries with
    O_DIRECT (the page cache would measure memory instead) for up to 0.5 s or
    256 MiB. Without O_DIRECT support the documented DEFAULT_READ_SPEED is
    cached; with nothing to read it is used but not cached, so a later start
    can measure a populated root.
    """
    path = state_dir / SPEED_FILE
    try:
        speed = float(json.loads(path.read_bytes())["bytes_per_second"])
        if speed > 0:
            return speed
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = _largest_files(root)
    if not files:
        log.info("nothing to read under %s to measure its device: assuming %.0f MB/s",
                 root, DEFAULT_READ_SPEED / 1e6)
        return DEFAULT_READ_SPEED
    measured = _direct_read_speed(files)
    if measured is None:
        log.info("%s does not support O_DIRECT reads: assuming %.0f MB/s for its device",
                 root, DEFAULT_READ_SPEED / 1e6)
        speed, method = DEFAULT_READ_SPEED, "default"
    else:
        speed, method = measured, "o_direct"
        log.info("device of %s reads %.0f MB/s", root, speed / 1e6)
    record = {"bytes_per_second": speed, "method": method, "measured_unix": time.time()}
    write_file_atomically(path, json.dumps(record).encode() + b"\n")
    return speed


def _largest_files(root: Path) -> list[str]:
    """Real paths of non-empty regular files on root's device among the first
    _MEASURE_FILES entries, largest first (the scanner's walker, reading no content)."""
    found: list[tuple[int, str]] = []
    top = os.fspath(root)

    def enough(path: str) -> bool:
        return len(found) >= _MEASURE_FILES

    def note(path: str, st: os.stat_result) -> bytes:
        found.append((st.st_size, top + path))
        return _NOT_READ

    try:
        scan_directory(root, exclude=enough, known_hash=note)
    except FleetError:
        return []
    return [real for _, real in sorted(found, reverse=True)]


def _direct_read_speed(files: list[str]) -> float | None:
    """Bytes/s of O_DIRECT sequential reads through `files`; None when the
    filesystem refuses O_DIRECT (EINVAL) or nothing could be read."""
    buf = mmap.mmap(-1, _CHUNK)  # page-aligned, as O_DIRECT requires
    total = 0
    start = time.monotonic()
    deadline = start + _MEASURE_SECONDS
    try:
        for real in files:
            if total >= _MEASURE_BYTES or time.monotonic() >= deadline:
                break
            total += _read_direct(real, buf, deadline, _MEASURE_BYTES - total)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        log.debug("O_DIRECT read refused: %s", err)
        return None
    finally:
        buf.close()
    elapsed = time.monotonic() - start
    return total / elapsed if total and elapsed > 0 else None


def _read_direct(real: str, buf: mmap.mmap, deadline: float, limit: int) -> int:
    """Bytes read from one file with O_DIRECT, up to `limit` or `deadline`, as far
    as it can be read (it may vanish); OSError(EINVAL) without O_DIRECT support."""
    try:  # never blocks on a FIFO or reads a device swapped in since the walk
        fd, _ = open_regular(real, extra_flags=os.O_DIRECT)
    except NotRegularFile:
        return 0
    except OSError as err:
        if err.errno == errno.EINVAL:
            raise
        return 0
    read = 0
    try:
        while read < limit and time.monotonic() < deadline:
            n = os.readv(fd, [buf])
            if not n:
                break
            read += n
    except OSError as err:
        if err.errno == errno.EINVAL:
            raise
        log.debug("measuring with %s: %s", real, err)
    finally:
        os.close(fd)
    return read


class DeviceReadCounter:
    """Bytes the calling thread has really read from storage: the kernel's
    `read_bytes` I/O accounting, where page-cache hits cost nothing. Per thread,
    so other subd threads' reads do not slow the scanner; read it from the thread
    doing the reads. Where the accounting is unreadable, every logical byte counts.
    """

    def __init__(self, path: Path = IO_ACCOUNTING) -> None:
        self.path = path
        self.exact = self._kernel_count() is not None
        if not self.exact:
            log.info("%s unreadable: counting every byte read as a device read", path)

    def _kernel_count(self) -> int | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
        return None

    def read(self, logical: int) -> int:
        """Device bytes read so far, or `logical` (what the caller read) when the
        kernel does not say."""
        count = self._kernel_count() if self.exact else None
        return logical if count is None else count


class _Pacer:
    """Sleeps so that usage since the start stays within a rate of the wall clock."""

    def __init__(self, clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._start = clock()

    def _hold_to(self, seconds_of_use: float) -> None:
        """Sleep until `seconds_of_use` have passed since the start."""
        delay = self._start + seconds_of_use - self._clock()
        if delay > 0:
            self._sleep(delay)


class ReadLimiter(_Pacer):
    """Holds a scan's device reads to `bytes_per_second` (0: unlimited)."""

    def __init__(self, bytes_per_second: float, counter: DeviceReadCounter | None = None,
                 clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        super().__init__(clock, sleep)
        self.rate = bytes_per_second
        self._counter = counter if counter is not None else DeviceReadCounter()
        self._logical = 0
        self._checked = 0
        self._base = self._counter.read(0)

    def pace(self, nbytes: int) -> None:
        """Told `nbytes` more were read; sleeps when device reads run ahead of the rate."""
        if self.rate <= 0:
            return
        self._logical += nbytes
        if self._logical - self._checked < _CHECK_BYTES:
            return
        self._checked = self._logical
        self._hold_to((self._counter.read(self._logical) - self._base) / self.rate)


class CpuLimiter(_Pacer):
    """Holds the calling thread's CPU time to `percent` of the wall clock
    (0 or >= 100: unlimited)."""

    def __init__(self, percent: float, cpu_clock: Clock = time.thread_time,
                 clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        super().__init__(clock, sleep)
        self.share = percent / 100 if 0 < percent < 100 else 0.0
        self._cpu_clock = cpu_clock
        self._cpu_base = cpu_clock()
        self._units = 0

    def pace(self, units: int = 1) -> None:
        """Told `units` more work was done (a file looked at: 1; hashing: one per
        HASH_UNIT bytes); sleeps when CPU use runs ahead of the share."""
        if not self.share:
            return
        self._units += units
        if self._units < _CHECK_UNITS:
            return
        self._units = 0
        self._hold_to((self._cpu_clock() - self._cpu_base) / self.share)
