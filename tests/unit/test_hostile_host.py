"""A local user who owns part of ROOT attacks subd (issue 9): swaps a file for a
symlink between the update's checks and its metadata changes, nests directories
past PATH_MAX or past the descriptor limit, and swaps FIFOs and devices in
where regular files were. Every test here makes the swap for real, at the
moment that matters, through the hooks the code already offers (a trigger's
stop action, a scan's hash lookup): no timing races."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import resource
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.diff import Change, DiffEntry, TreeDiff
from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.source import DirectorySource
from fleetlib.fstree.tree import Kind, regular
from fleetlib.fstree.triggers import make_trigger
from fleetlib.fstree.unpack import apply_metadata, unpack_tree
from subd.changes import UpdatePlan
from subd.ratelimit import _direct_read_speed
from subd.scanner import ScanConfig, Scanner
from subd.state import SubdState
from subd.trigger_runner import TriggerRunner
from subd.updater import Updater

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")

VICTIM = "/home/user/victim"
R = TypeVar("R")
T = 1_600_000_000_000_000_000


def not_subd(path: str) -> bool:
    return path == "/.subd" or path.startswith("/.subd/")


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """root's private file outside ROOT: what the attacker wants exposed."""
    path = tmp_path / "shadow"
    path.write_text("root:secret\n")
    os.chown(path, 0, 0)
    path.chmod(0o600)
    os.utime(path, ns=(T, T))
    return path


def facts(path: Path) -> tuple[int, int, int, int, list[str]]:
    """What a metadata change could alter about a file."""
    st = os.stat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, os.listxattr(path)


# ------------------------------------------------------------------ defect 4: metadata


@pytest.mark.parametrize("mode", [0o644, 0o4755])
def test_a_metadata_change_never_follows_a_symlink_swapped_in_after_the_checks(
        tmp_path: Path, secret: Path, mode: int) -> None:
    root = tmp_path / "root"
    victim = root / VICTIM.lstrip("/")
    victim.parent.mkdir(parents=True)
    victim.write_text("mine\n")
    victim.chmod(0o600)
    os.chown(victim.parent, 1000, 1000)  # the attacker's own directory
    # The trigger's stop action runs after every check and before the metadata
    # change: it plays the attacker, swapping the file for a symlink to root's file.
    script = tmp_path / "swap.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = stop ] && rm "{victim}" && ln -s "{secret}" '
                      f'"{victim}"\nexit 0\n')
    script.chmod(0o755)
    state = SubdState.at_root(root)
    updater = Updater(root, ObjectStore(root / ".subd" / "objects"), state,
                      TriggerRunner(f"{script} {{action}} {{service}}"))
    tree = scan_directory(root, exclude=not_subd)
    old = tree.inodes[tree.lookup(VICTIM)]
    new = dataclasses.replace(old, mode=stat.S_IFREG | mode, mtime_ns=T + 1,
                              xattrs=((b"user.planted", b"1"),))
    before = facts(secret)
    plan = UpdatePlan("evil", TreeDiff([DiffEntry(VICTIM, Change.METADATA, old, new)]), EMPTY,
                      triggers=[make_trigger([VICTIM], "swap")])
    outcome = updater.apply(plan, tree, not_subd)
    assert os.path.islink(victim), "the attacker's swap did not happen"
    assert facts(secret) == before
    assert not outcome.success
    assert VICTIM in outcome.error and "\n" not in outcome.error


@pytest.mark.parametrize("relative", [False, True])
def test_apply_metadata_refuses_a_symlink_where_another_kind_is_expected(
        tmp_path: Path, secret: Path, relative: bool) -> None:
    link = tmp_path / "link"
    link.symlink_to(secret)
    wanted = regular(stat.S_IFREG | 0o4755, 1000, 1000, T + 5, 12, sha(b"root:secret\n"),
                     ((b"user.planted", b"1"),))
    before = facts(secret)
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY) if relative else None
    try:
        with pytest.raises(FleetError, match="link"):
            apply_metadata("link" if relative else str(link), wanted, dir_fd=dir_fd)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    assert facts(secret) == before


# ------------------------------------------------------------------ defect 5: deep trees


def make_deep(top: Path, levels: int, name_length: int, content: bytes) -> str:
    """Nest `levels` directories with names of `name_length` characters under `top`
    (through descriptors: the full path outgrows PATH_MAX) and put `content` in a
    file at the bottom; returns the file's tree path."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        for level in range(levels):
            name = f"{level:03}".ljust(name_length, "d")
            os.mkdir(name, dir_fd=fd)
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            parts.append(name)
        file_fd = os.open("deep-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(file_fd, content)
        os.close(file_fd)
    finally:
        os.close(fd)
    return "/" + "/".join([*parts, "deep-file"])


def test_a_path_longer_than_path_max_is_scanned(tmp_path: Path) -> None:
    root = tmp_path / "root"
    deep = make_deep(root, 30, 200, b"tampered, deep down\n")
    assert len(deep) > 4096
    (root / "shallow").write_text("x")
    tree = scan_directory(root)
    ino = tree.lookup(deep)
    assert ino is not None and tree.inodes[ino].hash == sha(b"tampered, deep down\n")
    scanner = Scanner(root, ScanConfig(scan_speed_percent=0, cpu_percent=0), tmp_path / "state")
    assert scanner.scan_once().fingerprint() == tree.fingerprint()
    # ... and `image get` can build such a tree again.
    store = ObjectStore(tmp_path / "store")
    store.add_bytes(b"tampered, deep down\n")
    store.add_bytes(b"x")
    dest = tmp_path / "unpacked"
    dest.mkdir()
    assert unpack_tree(tree, dest, store) == []
    assert scan_directory(dest).fingerprint() == tree.fingerprint()


@contextlib.contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    """Lower this process's descriptor limit for a while."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def test_a_tree_deeper_than_the_descriptor_limit_is_scanned(tmp_path: Path) -> None:
    root = tmp_path / "root"
    deep = make_deep(root, 600, 3, b"bottom")
    names = deep.split("/")[1:-1]
    siblings = []  # whichever order a walk takes, some come after the deep descent
    for depth in (0, 1, 300):
        for name in ("-early", "later"):
            where = root.joinpath(*names[:depth], name)
            where.mkdir()
            (where / "file").write_text(f"depth {depth}")
            siblings.append("/" + "/".join([*names[:depth], name, "file"]))
    with fd_limit(256):
        tree = scan_directory(root)
    ino = tree.lookup(deep)
    assert ino is not None and tree.inodes[ino].hash == sha(b"bottom")
    for path in siblings:
        assert tree.lookup(path) is not None, path


# ------------------------------------------------------------------ defect 6: FIFOs, devices


def unblock(fifo: Path) -> None:
    """Let a reader stuck opening or reading `fifo` go on (it then sees end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def run_briefly(work: Callable[[], R], fifo: Path, seconds: float = 20) -> R:
    """`work()` in a thread; fails the test if it blocks for `seconds`."""
    result: list[R] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock(fifo)
        pytest.fail(f"blocked for {seconds} s on a FIFO or device")
    assert result, "the scan failed"
    return result[0]


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_zero(path: Path) -> None:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless


@pytest.mark.parametrize("swap,kind", [(make_fifo, Kind.FIFO), (make_zero, Kind.CHAR_DEVICE)])
def test_a_fifo_or_device_swapped_in_before_hashing_is_recorded_not_read(
        tmp_path: Path, swap: Callable[[Path], None], kind: Kind) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = root / "file"
    target.write_text("regular when listed\n")
    (root / "other").write_text("still hashed\n")

    def swap_then_read(path: str, st: os.stat_result) -> bytes | None:
        if path == "/file":  # after the lstat, before the open: the attacker's moment
            target.unlink()
            swap(target)
        return None

    tree = run_briefly(lambda: scan_directory(root, known_hash=swap_then_read), target)
    ino = tree.lookup("/file")
    assert ino is not None and tree.inodes[ino].kind == kind
    assert tree.inodes[tree.lookup("/other")].hash == sha(b"still hashed\n")


@pytest.mark.parametrize("swap,kind", [(make_fifo, Kind.FIFO), (make_zero, Kind.CHAR_DEVICE)])
def test_a_fifo_or_device_swapped_in_after_listing_is_recorded_not_read_by_open_first(
        tmp_path: Path, swap: Callable[[Path], None], kind: Kind) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = root / "file"
    target.write_text("a regular file when listed\n")
    (root / "other").write_text("still hashed\n")

    def swap_when_asked(path: str) -> bool:
        if path == "/file":  # listed as a regular file, not yet opened
            target.unlink()
            swap(target)
        return False

    tree = run_briefly(lambda: scan_directory(root, exclude=swap_when_asked, open_first=True),
                       target)
    ino = tree.lookup("/file")
    assert ino is not None and tree.inodes[ino].kind == kind
    assert tree.inodes[tree.lookup("/other")].hash == sha(b"still hashed\n")


def test_a_file_made_a_fifo_between_passes_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = root / "file"
    target.write_text("x" * 100)
    scanner = Scanner(root, ScanConfig(scan_speed_percent=0, cpu_percent=0), tmp_path / "state")
    scanner.scan_once()
    target.unlink()
    os.mkfifo(target)
    tree = run_briefly(lambda: scanner.scan_once(verify_all=True), target)
    assert tree.inodes[tree.lookup("/file")].kind == Kind.FIFO


def test_entries_swapped_for_a_symlink_or_socket_mid_scan_never_fail_the_pass(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name in ("a-file", "b-file", "c-file"):
        (root / name).write_text(name)

    def swap(path: str, st: os.stat_result) -> bytes | None:
        target = root / path.lstrip("/")
        target.unlink()
        if path == "/a-file":
            target.symlink_to("/etc/hostname")  # opened with O_NOFOLLOW: ELOOP
        elif path == "/b-file":
            sock = socket.socket(socket.AF_UNIX)  # opening a socket: ENXIO
            sock.bind(os.fspath(target))
            sock.close()
        else:
            target.write_text("replaced")  # another inode, read as what it is
        return None

    tree = scan_directory(root, known_hash=swap)
    assert tree.inodes[tree.lookup("/c-file")].hash == sha(b"replaced")


def test_a_directory_swapped_for_a_symlink_before_it_is_entered_is_not_followed(
        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private").write_text("not ROOT's")
    root = tmp_path / "root"
    (root / "zdir").mkdir(parents=True)

    def swap(path: str, entries: int) -> None:
        if path == "/":  # after the lstat of /zdir, before the walk enters it
            (root / "zdir").rmdir()
            (root / "zdir").symlink_to(outside)

    tree = scan_directory(root, on_directory=swap)
    assert tree.lookup("/zdir/private") is None


def test_the_read_speed_measurement_never_blocks_on_a_fifo_swapped_in(tmp_path: Path) -> None:
    fifo = tmp_path / "was-the-largest-file"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    make_zero(zero)
    (tmp_path / "real").write_bytes(os.urandom(1 << 20))
    files = [os.fspath(p) for p in (fifo, zero, tmp_path / "real")]
    speed = run_briefly(lambda: _direct_read_speed(files), fifo)
    assert speed is None or speed > 0


def test_an_image_source_file_swapped_for_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    source = tmp_path / "image"
    source.mkdir()
    (source / "file").write_text("content")
    directory = DirectorySource(source)
    (source / "file").unlink()
    os.mkfifo(source / "file")
    [(_, _, opener)] = list(directory.iter_objects(directory.tree.object_sizes()))

    def read() -> str:
        with pytest.raises(FleetError, match="not a regular file") as refused:
            opener()
        return str(refused.value)

    assert run_briefly(read, source / "file") == "/file: not a regular file (a fifo)"
