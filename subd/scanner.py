"""subd's scanner: a continuous, rate-limited scan of ROOT into the tree of
docs/DESIGN.md, with the generation count and fingerprint that Poll reports.

Each pass walks ROOT with `fstree.scan.scan_directory`, leaving out ROOT/.subd,
the scan-exclusion list, sockets and other mount points. A change cache keyed
by inode number keeps what the last read of each inode found; a pass trusts an
entry whose (size, mtime, ctime) still match, so an unchanged tree costs one
lstat per entry. Trusting metadata misses tampering that forges it, so every
pass also re-reads the inodes verified longest ago, a share sized so that the
whole tree is re-hashed within `verify_period_seconds`; `verify_all` re-hashes
everything at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.exclusions import DEFAULT_EXCLUSIONS, SUBD_DIR, excluder
from fleetlib.fstree.safeopen import Directories
from fleetlib.fstree.scan import ChangeKey, inode_from_stat, scan_directory
from fleetlib.fstree.tree import Inode, Tree
from subd.ratelimit import (
    HASH_UNIT,
    CpuLimiter,
    DeviceReadCounter,
    ReadLimiter,
    measure_read_speed,
)

log = logging.getLogger(__name__)

SCAN_FLOOR_SECONDS = 1.0  # the shortest pause between two passes
# Verification budget charged per inode on top of its size: re-reading its
# metadata costs about one block, and empty files and directories need re-reads too.
_INODE_COST = 4096


@dataclass
class ScanConfig:
    """How hard the scanner may work; percents of 0 (or 100) mean unlimited."""

    scan_speed_percent: float = 2.0  # of the device's measured read bandwidth
    cpu_percent: float = 50.0  # of one core, while a pass runs
    background_cpu_percent: float = 1.5  # of one core, over passes and the pauses between
    verify_period_seconds: float = 86400.0  # every file re-hashed at least this often
    exclusions: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUSIONS))

    def validate(self) -> None:
        """FleetError for a negative percent or a verify period that is not positive."""
        percents = (self.scan_speed_percent, self.cpu_percent, self.background_cpu_percent)
        if min(percents) < 0:
            raise FleetError("scan limits must be percents of 0 or more")
        if self.verify_period_seconds <= 0:
            raise FleetError("the verify period must be positive")


@dataclass(slots=True)
class CacheEntry:
    """What the last read of one inode found, and when (time.monotonic())."""

    key: ChangeKey  # st_size, st_mtime_ns, st_ctime_ns at that read
    inode: Inode  # holds the content hash, xattrs, link target
    verified: float


class _Stopping(Exception):
    """Raised from a pass's pacing sleep once stop() is called."""


class _Abandoned(Exception):
    """Raised inside a pass when an update pauses scanning: its view would mix the
    trees before and after the update."""


class Scanner:
    """Scans `root` pass after pass and publishes the latest tree.

    Passes run one at a time (scan_once from any thread, or the background
    thread of start()); the published state is read under a lock. Published
    trees are shared: readers must not modify them.
    """

    def __init__(self, root: Path, config: ScanConfig | None = None,
                 state_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.state_dir = state_dir if state_dir is not None else self.root / SUBD_DIR
        self.reconfigure(config if config is not None else ScanConfig())
        self._cache: dict[int, CacheEntry] = {}  # in order of verification, oldest first
        self._cache_cost = 0  # its verification cost: sizes plus _INODE_COST each
        self._trusted_since_pass = False  # trust() added entries the last tree lacks
        self._verify_credit = 0.0  # bytes of re-verification owed by the spread
        self._last_pass_start: float | None = None
        self._read_speed: float | None = None
        self._device_reads = DeviceReadCounter()
        self._pass_lock = threading.Lock()
        self._cond = threading.Condition()
        self._tree: Tree | None = None
        self._fingerprint = b""
        self._generation = 0
        self._scan_count = 0
        self._last_scan_seconds = 0.0
        self._last_scan_unix = 0.0
        self._bytes_hashed = 0
        self._bytes_hashed_total = 0  # over every pass since start (for metrics)
        self._scan_seconds_total = 0.0
        self._scan_error = ""  # why background passes fail, "" once one completes
        self._pauses = 0  # updates in progress (see paused())
        self._wanted = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from any thread, without locks held) whenever the generation
        or the scan error changes."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def reconfigure(self, config: ScanConfig) -> None:
        """Use new limits and exclusions from the next pass on; FleetError for a bad
        limit or exclusion regex (the scanner then keeps its old configuration)."""
        config.validate()
        self._excluded = excluder(config.exclusions)
        self.config = config

    def excluded(self, path: str) -> bool:
        """Whether this sub leaves `path` unscanned (see `excluder`)."""
        return self._excluded(path)

    # The published state.

    @property
    def tree(self) -> Tree | None:
        """The latest tree, or None before the first pass ends."""
        with self._cond:
            return self._tree

    @property
    def fingerprint(self) -> bytes:
        """xxh3_128 fingerprint of the latest tree (b"" before the first pass)."""
        with self._cond:
            return self._fingerprint

    @property
    def generation(self) -> int:
        """Rises whenever the tree or the object cache changes."""
        with self._cond:
            return self._generation

    @property
    def scan_count(self) -> int:
        """Passes completed."""
        with self._cond:
            return self._scan_count

    @property
    def last_scan_seconds(self) -> float:
        """How long the latest pass took."""
        with self._cond:
            return self._last_scan_seconds

    @property
    def last_scan_unix(self) -> float:
        """When the latest pass started (Unix time)."""
        with self._cond:
            return self._last_scan_unix

    @property
    def bytes_hashed_last_scan(self) -> int:
        """Content bytes the latest pass read (0 for a fast pass over an unchanged tree)."""
        with self._cond:
            return self._bytes_hashed

    @property
    def bytes_hashed_total(self) -> int:
        """Content bytes every completed pass read, in all."""
        with self._cond:
            return self._bytes_hashed_total

    @property
    def scan_error(self) -> str:
        """One line saying why the background passes fail, or "" (the last completed)."""
        with self._cond:
            return self._scan_error

    @property
    def scan_seconds_total(self) -> float:
        """Time every completed pass took, in all."""
        with self._cond:
            return self._scan_seconds_total

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No pass runs inside this block (an update runs there): a pass in flight is
        abandoned, and new ones wait until the block ends."""
        with self._cond:
            self._pauses += 1
            self._cond.notify_all()  # wakes a pass sleeping in its limiters
        try:
            with self._pass_lock:  # the pass in flight, if any, has quit
                pass
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def trust(self, installed: Iterable[tuple[str, bytes]], since_unix: float) -> None:
        """Remember the content hashes of files an update just installed (verified
        when fetched), so the next pass need not re-read them at the scan rate.
        A file changed again since `since_unix` (its ctime is later) is not trusted."""
        limit = int(since_unix * 1e9)
        with self._pass_lock, contextlib.ExitStack() as stack:
            try:  # by descriptor, as the scan reads: no symlinked parent, any path length
                dirs = stack.enter_context(Directories(self.root))
            except OSError:
                return
            now = time.monotonic()
            for path, digest in installed:
                try:
                    fd, name = dirs.parent(path)
                    st = os.lstat(name, dir_fd=fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_ctime_ns > limit:
                        continue
                    inode = inode_from_stat(name, st, digest, dir_fd=fd)
                except OSError:
                    continue
                assert inode is not None, "a regular file always makes an inode"
                self._cache_drop(st.st_ino)
                self._cache_put(st.st_ino, CacheEntry(
                    (st.st_size, st.st_mtime_ns, st.st_ctime_ns), inode, now))
                self._trusted_since_pass = True

    def bump_generation(self) -> None:
        """Tell pollers something else they see changed (the object cache)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        self._changed()

    def wait_for_scan(self, count: int, timeout: float) -> bool:
        """Block until more than `count` passes have completed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._scan_count > count, timeout)

    # One pass.

    def scan_once(self, verify_all: bool = False, limited: bool = True) -> Tree:
        """Scan ROOT once, publish and return the tree. Content is re-hashed only for
        inodes whose (size, mtime, ctime) changed plus this pass's share of the
        periodic verification, or for all with `verify_all`. `limited` applies the
        configured read and CPU limits. FleetError when ROOT cannot be scanned."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pauses)
        with self._pass_lock:
            config = self.config
            started, started_unix = time.monotonic(), time.time()
            cpu = CpuLimiter(config.cpu_percent if limited else 0, sleep=self._pause)
            reads = ReadLimiter(self._read_rate(config) if limited else 0, self._device_reads,
                                sleep=self._pause)
            trusted = self._trusted(started, verify_all)
            fresh: dict[int, ChangeKey] = {}
            hashed = 0

            def on_directory(path: str, entries: int) -> None:
                if self._pauses:
                    raise _Abandoned
                cpu.pace(entries)

            pace_reads = reads.pace if reads.rate > 0 else None  # none called when off
            pace_cpu = cpu.pace if cpu.share else None

            def on_read(size: int) -> None:
                nonlocal hashed
                if self._pauses:
                    raise _Abandoned
                hashed += size
                if pace_reads is not None:
                    pace_reads(size)
                if pace_cpu is not None:
                    pace_cpu(size // HASH_UNIT)

            tree = scan_directory(self.root, exclude=self._excluded, trusted=trusted,
                                  fresh=fresh, on_read=on_read, on_directory=on_directory,
                                  open_first=verify_all,
                                  previous=self._tree.inodes if self._tree else None)
            same = self._tree is not None and tree == self._tree  # cheap: inodes shared
            self._update_cache(tree, fresh, started, same)
            self._publish(tree, same, hashed, time.monotonic() - started, started_unix)
            log.debug("scan %d: %d inodes, %d bytes hashed, %.3f s", self.scan_count,
                      len(tree.inodes), hashed, self.last_scan_seconds)
            return tree

    def _read_rate(self, config: ScanConfig) -> float:
        """Bytes/s of device reads a pass may make (0: unlimited); measures the
        device the first time it matters."""
        if not 0 < config.scan_speed_percent < 100:
            return 0.0
        if self._read_speed is None:
            self._read_speed = measure_read_speed(self.root, self.state_dir)
        return self._read_speed * config.scan_speed_percent / 100

    def _trusted(self, now: float, verify_all: bool) -> dict[int, CacheEntry]:
        """The cache entries this pass may trust while their change keys hold: all but
        those due for verification, which are taken out here (the pass reads them
        again and puts them back at the newest end); none with `verify_all`."""
        for ino in self._due_for_verification(now, verify_all):
            self._cache_drop(ino)
        return {} if verify_all else self._cache

    def _due_for_verification(self, now: float, verify_all: bool) -> list[int]:
        """Inodes this pass re-reads although unchanged: every one verified more than a
        period ago, then the oldest verified as far as the credit earned since the last
        pass goes (the period's share of the cache's bytes). A pass that verifies
        all settles every debt."""
        period = self.config.verify_period_seconds
        if verify_all:
            self._last_pass_start, self._verify_credit = now, 0.0
            return []
        if self._last_pass_start is not None:
            total = self._cache_cost
            earned = total * (now - self._last_pass_start) / period
            self._verify_credit = min(self._verify_credit + earned, total)
        self._last_pass_start = now
        due = []
        for ino, entry in self._cache.items():  # oldest verified first
            cost = entry.inode.size + _INODE_COST
            if entry.verified > now - period and cost > self._verify_credit:
                break
            due.append(ino)
            self._verify_credit -= cost
        return due

    def _cache_put(self, ino: int, entry: CacheEntry) -> None:
        """Add an entry at the newest end (the number must not be cached)."""
        self._cache[ino] = entry
        self._cache_cost += entry.inode.size + _INODE_COST

    def _cache_drop(self, ino: int) -> None:
        """Forget an inode number, if cached."""
        entry = self._cache.pop(ino, None)
        if entry is not None:
            self._cache_cost -= entry.inode.size + _INODE_COST

    def _update_cache(self, tree: Tree, fresh: dict[int, ChangeKey], started: float,
                      same: bool) -> None:
        """Record the inodes read this pass (moved to the newest end) and forget the
        inodes the pass did not see, unless the tree is the same as the last one
        (`same`) and trust() added nothing since: the cache then names no inode
        outside it. Entries are updated in place: a pass that reads a large tree again
        makes no new objects for the garbage collector to go through."""
        cache, inodes, cost = self._cache, tree.inodes, 0
        for ino, key in fresh.items():
            entry = cache.pop(ino, None)
            if entry is not None:
                cost -= entry.inode.size
            inode = inodes.get(ino)
            if inode is None:  # vanished or changed while read: read it next pass
                if entry is not None:
                    cost -= _INODE_COST
                continue
            if entry is None:
                entry = CacheEntry(key, inode, started)
                cost += _INODE_COST
            else:
                entry.key, entry.inode, entry.verified = key, inode, started
            cache[ino] = entry
            cost += inode.size
        self._cache_cost += cost
        if not same or self._trusted_since_pass:
            for ino in cache.keys() - inodes.keys():
                self._cache_drop(ino)
        self._trusted_since_pass = False

    def _publish(self, tree: Tree, same: bool, hashed: int, seconds: float,
                 started_unix: float) -> None:
        """Make `tree` the latest (`same`: equal to the one before); the generation
        rises when its fingerprint changed."""
        fingerprint = self._fingerprint if same else tree.fingerprint()
        with self._cond:
            news = fingerprint != self._fingerprint or bool(self._scan_error)
            if fingerprint != self._fingerprint:
                self._generation += 1
            self._tree, self._fingerprint = tree, fingerprint
            self._scan_count += 1
            self._last_scan_seconds, self._last_scan_unix = seconds, started_unix
            self._bytes_hashed = hashed
            self._bytes_hashed_total += hashed
            self._scan_seconds_total += seconds
            self._scan_error = ""
            self._cond.notify_all()
        if news:
            self._changed()

    # The background thread.

    def start(self) -> None:
        """Scan continuously in a daemon thread until stop()."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="subd-scanner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the background thread and wait for it; a pass running anywhere is cut
        short (with a private exception) at its next pacing sleep."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def request_scan(self) -> None:
        """Start the next pass as soon as the floor between passes allows (after an
        update, say), instead of after the background CPU pause."""
        with self._cond:
            self._wanted = True
            self._cond.notify_all()

    def _run(self) -> None:
        last_error = ""
        while True:
            cpu_before, wall_before = time.thread_time(), time.monotonic()
            try:
                self.scan_once()
                if last_error:
                    log.info("scan of %s works again", self.root)
                last_error = ""
            except _Stopping:
                return
            except _Abandoned:
                pass  # an update paused scanning; it asks for a pass when done
            except Exception as err:  # survive anything; say so once per distinct error
                if repr(err) != last_error:
                    log.warning("scan of %s failed, retrying: %s", self.root, err,
                                exc_info=not isinstance(err, FleetError))
                last_error = repr(err)
                with self._cond:  # Poll tells the dominator why the tree is stale
                    news, self._scan_error = self._scan_error != _one_line(err), _one_line(err)
                if news:
                    self._changed()
            if not self._rest(self._pause_after(time.thread_time() - cpu_before,
                                                time.monotonic() - wall_before)):
                return

    def _pause_after(self, cpu_seconds: float, wall_seconds: float) -> float:
        """The pause after a pass that keeps scanning's long-run CPU share within
        background_cpu_percent, and never below the floor."""
        percent = self.config.background_cpu_percent
        pause = cpu_seconds * 100 / percent - wall_seconds if 0 < percent < 100 else 0.0
        return max(SCAN_FLOOR_SECONDS, pause)

    def _rest(self, seconds: float) -> bool:
        """Wait `seconds` (or only the floor once request_scan() is called); False
        when stopping."""
        now = time.monotonic()
        floor_end, end = now + SCAN_FLOOR_SECONDS, now + seconds
        with self._cond:
            while not self._stopping:
                deadline = floor_end if self._wanted else end
                now = time.monotonic()
                if now >= deadline:
                    self._wanted = False
                    return True
                self._cond.wait(deadline - now)
            return False

    def _pause(self, seconds: float) -> None:
        """The limiters' sleep: cut short by stop() (_Stopping) or by an update
        pausing scans (_Abandoned), so neither waits for a throttled pass."""
        with self._cond:
            if self._cond.wait_for(lambda: self._stopping or self._pauses, seconds):
                raise _Stopping if self._stopping else _Abandoned


def _one_line(err: Exception) -> str:
    """An exception as one line of text for Poll."""
    text = str(err) if isinstance(err, FleetError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__
