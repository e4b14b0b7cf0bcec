"""Tests of subd's scanner and its rate limiters, on real files.

The scanner must report exactly what `fstree.scan.scan_directory` sees minus
ROOT/.subd and the scan exclusions; a fast pass over an unchanged tree reads no
content; tampering that forges (size, mtime, ctime) is caught by verification.
Only the limiters' unit tests use a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.exclusions import DEFAULT_EXCLUSIONS, SUBD_DIR, excluder, literal_prefix
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.tree import Kind, Tree
from fleetlib.testing.trees import make_tree
from subd.ratelimit import (
    DEFAULT_READ_SPEED,
    SPEED_FILE,
    CpuLimiter,
    DeviceReadCounter,
    ReadLimiter,
    measure_read_speed,
)
from subd.scanner import ScanConfig, Scanner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")

UNLIMITED = dict(scan_speed_percent=0.0, cpu_percent=0.0)


def reference_excluded(path: str) -> bool:
    """The exclusion rule written plainly: ROOT/.subd, then each regex in turn."""
    return (path == "/.subd" or path.startswith("/.subd/")
            or any(re.match(pattern, path) for pattern in DEFAULT_EXCLUSIONS))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Every inode kind (tests/trees.py) plus excluded paths and subd's own state."""
    top = make_tree(tmp_path / "root")
    for folder in ("tmp/cache", "var/log", "var/tmp", "home/alice", ".subd/objects"):
        (top / folder).mkdir(parents=True)
    (top / "tmp" / "cache" / "junk").write_bytes(os.urandom(500))
    (top / "var" / "log" / "syslog").write_text("boot\n")
    (top / "var" / "logs-kept").write_text("not under /var/log/\n")
    (top / "home" / "alice" / "notes").write_text("private\n")
    (top / SUBD_DIR / "objects" / "ab").write_bytes(os.urandom(100))
    return top


def make_scanner(root: Path, tmp_path: Path, **config: object) -> Scanner:
    """A scanner with no limits unless `config` sets them, its state outside ROOT."""
    settings = {**UNLIMITED, **config}
    # `settings` mixes ScanConfig's field types (float limits, exclusion lists).
    return Scanner(root, ScanConfig(**settings), tmp_path / "state")  # type: ignore[arg-type]


def file_hash(tree: Tree, path: str) -> bytes:
    ino = tree.lookup(path)
    assert ino is not None, path
    return tree.inodes[ino].hash


def content_bytes(tree: Tree) -> int:
    return sum(i.size for i in tree.inodes.values() if i.kind == Kind.REGULAR)


def rewrite_keeping_times(path: Path, data: bytes) -> None:
    """New content of the same size, atime and mtime restored (ctime still moves)."""
    before = os.lstat(path)
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def forge_metadata(scanner: Scanner, path: Path) -> None:
    """Make the change cache trust `path` as it is now, as if tampering had also
    restored its ctime: only content verification can catch it."""
    st = os.lstat(path)
    scanner._cache[st.st_ino].key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# The tree a pass produces.

def test_scan_equals_scan_directory_minus_exclusions(root: Path, tmp_path: Path) -> None:
    tree = make_scanner(root, tmp_path).scan_once()
    expected = scan_directory(root, exclude=reference_excluded)
    assert tree == expected
    assert tree.fingerprint() == expected.fingerprint()
    paths = set(tree.paths())
    assert {"/tmp", "/var/log", "/var/tmp", "/home", "/var/logs-kept"} <= paths
    assert {"/usr/bin/chfn", "/dev/null", "/dev/initctl", "/bin"} <= paths
    assert not {p for p in paths if p.startswith(("/.subd", "/tmp/", "/var/log/", "/home/"))}


def test_full_verification_reports_what_a_plain_scan_does(root: Path, tmp_path: Path) -> None:
    """verify_all opens regular files without an lstat (open_first) and keeps the last
    tree's inode objects where the file is as before: the tree must not differ in
    anything, and a changed file gets an inode of its own."""
    (root / "var" / "lib" / "large").write_bytes(os.urandom(3 << 20))  # read in pieces
    scanner = make_scanner(root, tmp_path)
    first = scanner.scan_once()
    again = scanner.scan_once(verify_all=True)
    assert again == scan_directory(root, exclude=reference_excluded)
    assert again.fingerprint() == first.fingerprint()
    for path in ("/usr/bin/ping", "/usr/bin/chfn", "/var/lib/large"):  # xattrs, a link
        ino = again.lookup(path)
        assert ino is not None and again.inodes[ino] is first.inodes[ino], path  # kept
    changed = root / "etc" / "ssl" / "cert.pem"
    rewrite_keeping_times(changed, bytes(reversed(changed.read_bytes())))
    after = scanner.scan_once(verify_all=True)
    assert after == scan_directory(root, exclude=reference_excluded)
    ino = after.lookup("/etc/ssl/cert.pem")
    assert ino is not None and after.inodes[ino].hash != first.inodes[ino].hash


def test_excluded_matches_filter_semantics() -> None:
    excluded = excluder(DEFAULT_EXCLUSIONS)
    for path in ("/.subd", "/.subd/objects/ab", "/tmp/x", "/tmp/a/b", "/var/log/syslog",
                 "/home/alice", "/var/spool/cron"):
        assert excluded(path), path
    for path in ("/", "/tmp", "/var/log", "/var/logs", "/.subdx", "/etc/passwd", "/home"):
        assert not excluded(path), path
    for directory in ("/", "/var", "/var/log", "/var/log/apt", "/tmp"):
        assert excluded.may_exclude_below(directory), directory
    for directory in ("/usr", "/usr/lib", "/etc", "/var/lib", "/homes"):  # asked no more
        assert not excluded.may_exclude_below(directory), directory


@pytest.mark.parametrize("exclusions", [
    [r"(?i)/OPT/.*"], [r"/a|/b/.*"], [r"/xx?y"], [r"/opt/[ab]"], [r"/e\.d/"], [r"/s{2}"],
    [r"/var/.*\.log"], ["!", "/keep"], [],
])
def test_excluder_prefix_shortcut_agrees_with_the_regexes(exclusions: list[str]) -> None:
    excluded = excluder(exclusions)
    inverted = "!" in exclusions
    patterns = [p for p in exclusions if p != "!"]
    for path in ("/opt/a", "/OPT/b", "/opt", "/a", "/ab", "/b/c", "/xy", "/xxy", "/xyz", "/y",
                 "/e.d/f", "/e.d", "/ss", "/s", "/var/x.log", "/var/log", "/keep/x", "/other",
                 "/.subd", "/.subd/x"):
        hit = any(re.match(p, path) for p in patterns) != inverted
        assert excluded(path) == (hit or path in ("/.subd", "/.subd/x")), (exclusions, path)
        if excluded(path):  # the walk's per-directory shortcut must not hide it
            parent = path.rpartition("/")[0] or "/"
            assert excluded.may_exclude_below(parent), (exclusions, path)


def test_literal_prefix() -> None:
    assert literal_prefix(r"/tmp/.*") == "/tmp/"
    assert literal_prefix(r"/xx?y") == "/x"
    assert literal_prefix(r"/a|/b") == ""
    assert literal_prefix(r"(?i)/a") == ""
    assert literal_prefix(r"/e\.d") == "/e"


def test_socket_is_skipped(root: Path, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(root / "etc" / "agent.sock"))
        tree = make_scanner(root, tmp_path).scan_once()
    finally:
        sock.close()
    assert tree.lookup("/etc/agent.sock") is None
    assert tree.lookup("/etc/hostname") is not None


def test_config_is_validated(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FleetError):
        make_scanner(root, tmp_path, cpu_percent=-1.0)
    with pytest.raises(FleetError):
        make_scanner(root, tmp_path, verify_period_seconds=0.0)
    with pytest.raises(FleetError, match="invalid regex"):
        make_scanner(root, tmp_path, exclusions=["/tmp/("])


# Fast passes, verification, generations.

def test_fast_pass_over_unchanged_tree_reads_nothing(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    first = scanner.scan_once()
    assert scanner.bytes_hashed_last_scan == content_bytes(first)
    fingerprint, generation = scanner.fingerprint, scanner.generation
    assert generation == 1 and fingerprint == first.fingerprint()
    second = scanner.scan_once()
    assert scanner.bytes_hashed_last_scan == 0
    assert second == first
    assert (scanner.fingerprint, scanner.generation, scanner.scan_count) == \
        (fingerprint, generation, 2)
    assert scanner.last_scan_seconds > 0 and scanner.last_scan_unix <= time.time()


def test_same_size_rewrite_with_restored_mtime_moves_ctime(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    before = scanner.scan_once()
    target = root / "usr" / "bin" / "ping"
    rewrite_keeping_times(target, os.urandom(os.lstat(target).st_size))
    after = scanner.scan_once()
    assert scanner.bytes_hashed_last_scan == os.lstat(target).st_size
    assert file_hash(after, "/usr/bin/ping") != file_hash(before, "/usr/bin/ping")
    assert after == scan_directory(root, exclude=reference_excluded)
    assert scanner.generation == 2


def test_forged_metadata_is_caught_by_full_verification(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    before = scanner.scan_once()
    target = root / "var" / "lib" / "app.db"
    rewrite_keeping_times(target, os.urandom(10000))
    forge_metadata(scanner, target)
    trusted = scanner.scan_once()
    assert scanner.bytes_hashed_last_scan == 0  # the fast pass believes the forgery
    assert file_hash(trusted, "/var/lib/app.db") == file_hash(before, "/var/lib/app.db")
    verified = scanner.scan_once(verify_all=True)
    assert scanner.bytes_hashed_last_scan == content_bytes(verified)
    assert verified == scan_directory(root, exclude=reference_excluded)
    assert scanner.generation == 2


def test_verification_is_spread_over_the_period(root: Path, tmp_path: Path) -> None:
    for index in range(16):
        (root / "var" / "lib" / f"blob{index}").write_bytes(os.urandom(64 << 10))
    scanner = make_scanner(root, tmp_path, verify_period_seconds=1.0)
    first = scanner.scan_once()
    total = content_bytes(first)
    time.sleep(0.3)
    scanner.scan_once()
    assert 0 < scanner.bytes_hashed_last_scan < total  # about 30 %: a share, not all
    oldest = min((e for e in scanner._cache.values() if e.inode.size),
                 key=lambda e: e.verified)
    path = next(p for p, _, i in first.walk() if i is oldest.inode)
    target = root / path.lstrip("/")
    rewrite_keeping_times(target, os.urandom(oldest.inode.size))
    forge_metadata(scanner, target)
    time.sleep(0.8)  # past the period since the first pass
    caught = scanner.scan_once()
    assert file_hash(caught, path) != oldest.inode.hash
    assert caught == scan_directory(root, exclude=reference_excluded)


def test_generation_rises_on_every_change(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    scanner.scan_once()
    assert scanner.generation == 1
    (root / "etc" / "new.conf").write_text("x = 1\n")
    scanner.scan_once()
    assert scanner.generation == 2
    os.chmod(root / "etc" / "new.conf", 0o600)
    scanner.scan_once()
    assert scanner.generation == 3
    (root / "tmp" / "cache" / "more").write_text("excluded: no change\n")
    (root / SUBD_DIR / "objects" / "cd").write_text("subd's own: no change\n")
    scanner.scan_once()
    assert scanner.generation == 3
    scanner.bump_generation()  # the object cache changed
    assert scanner.generation == 4
    (root / "etc" / "new.conf").unlink()
    scanner.scan_once()
    assert scanner.generation == 5


def test_files_changing_during_scans_never_break_a_pass(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    churn = root / "var" / "churn"
    churn.mkdir()
    done = threading.Event()

    def writer() -> None:
        count = 0
        while not done.is_set():
            count += 1
            (churn / f"f{count % 40}").write_bytes(os.urandom(count % 5000))
            (churn / f"f{(count + 20) % 40}").unlink(missing_ok=True)
            (churn / "grows").write_bytes(os.urandom(count % 300_000))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            scanner.scan_once()
    finally:
        done.set()
        thread.join()
    assert scanner.scan_count > 5
    assert scanner.scan_once() == scan_directory(root, exclude=reference_excluded)


# The background thread.

def test_background_thread_scans_on_request_and_stops(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    scanner.start()
    try:
        assert scanner.wait_for_scan(0, 5)
        count = scanner.scan_count
        (root / "etc" / "hostname").write_text("changed\n")
        asked = time.monotonic()
        scanner.request_scan()
        assert scanner.wait_for_scan(count, 3)
        assert time.monotonic() - asked < 2.0  # the 1 s floor, not the background pause
        assert scanner.tree is not None
        assert scanner.tree == scan_directory(root, exclude=reference_excluded)
    finally:
        scanner.stop()
    assert scanner._thread is not None and not scanner._thread.is_alive()


def test_background_thread_survives_root_vanishing(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    scanner.start()
    try:
        assert scanner.wait_for_scan(0, 5)
        count = scanner.scan_count
        root.rename(tmp_path / "away")
        scanner.request_scan()
        assert not scanner.wait_for_scan(count, 1.5)  # failing passes publish nothing
        (tmp_path / "away").rename(root)
        scanner.request_scan()
        assert scanner.wait_for_scan(count, 3)
    finally:
        scanner.stop()


def test_stop_interrupts_a_paced_pass(root: Path, tmp_path: Path) -> None:
    for index in range(600):  # enough files for the CPU limiter to look at its clock
        (root / "var" / "lib" / f"e{index}").touch()
    scanner = make_scanner(root, tmp_path, cpu_percent=0.001)
    scanner.start()
    time.sleep(0.3)
    stopping = time.monotonic()
    scanner.stop()
    assert time.monotonic() - stopping < 1.0
    assert scanner.scan_count == 0


# Rate limits and the device.

class FakeClock:
    """A wall clock that only sleeping advances, and a CPU clock the test advances."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.cpu = 5.0
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds
        self.slept += seconds


def test_read_limiter_paces_device_reads_to_the_rate(tmp_path: Path) -> None:
    clock = FakeClock()
    logical = DeviceReadCounter(tmp_path / "no-io-accounting")
    assert not logical.exact and logical.read(123) == 123
    limiter = ReadLimiter(1e6, logical, clock=lambda: clock.now, sleep=clock.sleep)
    for _ in range(80):
        limiter.pace(128 << 10)  # 10 MiB in all
    assert clock.now - 1000.0 == pytest.approx((10 << 20) / 1e6)
    for _ in range(80):  # reads slower than the rate are never slowed down
        clock.now += 1.0
        before = clock.slept
        limiter.pace(1000)
        assert clock.slept == before


def test_cpu_limiter_paces_thread_cpu_to_the_share() -> None:
    clock = FakeClock()
    limiter = CpuLimiter(10, cpu_clock=lambda: clock.cpu, clock=lambda: clock.now,
                         sleep=clock.sleep)
    for _ in range(1024):
        clock.cpu += 0.001
        limiter.pace()
    assert clock.now - 1000.0 == pytest.approx(1.024 / 0.10)


@pytest.mark.parametrize("percent", [0, 100, 150])
def test_cpu_limiter_off(percent: float) -> None:
    clock = FakeClock()
    limiter = CpuLimiter(percent, cpu_clock=lambda: clock.cpu, clock=lambda: clock.now,
                         sleep=clock.sleep)
    for _ in range(1000):
        clock.cpu += 1.0
        limiter.pace()
    assert clock.slept == 0


def test_read_limiter_off_and_real_counter(tmp_path: Path) -> None:
    clock = FakeClock()
    limiter = ReadLimiter(0, clock=lambda: clock.now, sleep=clock.sleep)
    limiter.pace(1 << 30)
    assert clock.slept == 0
    counter = DeviceReadCounter()
    if not counter.exact:
        pytest.skip("no per-thread I/O accounting here")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(4 << 20))
    data.read_bytes()  # now in the page cache
    before = counter.read(0)
    data.read_bytes()
    assert counter.read(0) - before < 1 << 20  # page-cache hits are not device reads


def test_measure_read_speed_is_measured_once_and_cached(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert measure_read_speed(tmp_path, state) == DEFAULT_READ_SPEED  # nothing to read
    assert not (state / SPEED_FILE).exists()  # ...so a later start measures again
    (tmp_path / "big").write_bytes(os.urandom(8 << 20))
    (tmp_path / "small").write_bytes(b"x" * 100)
    speed = measure_read_speed(tmp_path, state)
    assert speed > 0
    record = json.loads((state / SPEED_FILE).read_text())
    assert record["bytes_per_second"] == speed
    assert record["method"] in ("o_direct", "default")
    (state / SPEED_FILE).write_text(json.dumps({"bytes_per_second": 12345.0}))
    assert measure_read_speed(tmp_path, state) == 12345.0


def test_trusted_install_is_not_read_again(root: Path, tmp_path: Path) -> None:
    scanner = make_scanner(root, tmp_path)
    scanner.scan_once()
    content = os.urandom(40_000)
    (root / "etc" / "installed").write_bytes(content)
    (root / "etc" / "untrusted").write_bytes(os.urandom(1000))
    digest = hashlib.sha256(content).digest()
    scanner.trust([("/etc/installed", digest)], time.time())
    tree = scanner.scan_once()
    assert scanner.bytes_hashed_last_scan == 1000  # only the file nobody vouched for
    assert file_hash(tree, "/etc/installed") == digest
    (root / "etc" / "late").write_bytes(content)
    scanner.trust([("/etc/late", digest)], time.time() - 60)  # changed after the update
    scanner.scan_once()
    assert scanner.bytes_hashed_last_scan == len(content)


def test_paused_abandons_a_pass_and_holds_new_ones(root: Path, tmp_path: Path) -> None:
    for index in range(300):
        (root / "var" / f"bulk{index}").write_bytes(os.urandom(20_000))
    scanner = make_scanner(root, tmp_path, cpu_percent=2.0)  # a pass of several seconds
    scanner.start()
    try:
        time.sleep(0.3)  # the first pass is under way
        entered = time.monotonic()
        with scanner.paused():
            assert time.monotonic() - entered < 1.0, "the pass in flight was not abandoned"
            count = scanner.scan_count
            time.sleep(1.5)
            scanner.request_scan()
            assert scanner.scan_count == count, "no pass may complete while paused"
        assert scanner.wait_for_scan(count, 30)
    finally:
        scanner.stop()
