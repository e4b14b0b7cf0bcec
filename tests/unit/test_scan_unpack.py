"""Tests of fstree.scan and fstree.unpack on real directories: scan a synthetic tree
holding every kind of inode, unpack it elsewhere from an object store, and check the
copy is exact (same fingerprint, and rsync sees no difference)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import hash_bytes
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.tree import Kind, Tree
from fleetlib.fstree.unpack import MARK, check_empty_destination, unpack_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")

SETCAP = "/usr/sbin/setcap"
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
MTIME = 1_600_000_000_123_456_789
BIG = os.urandom(3 * (1 << 20) // 2)


def make_source(root: Path) -> Path:
    """Hard links, symlinks, a device, a fifo, setuid, a file capability, user xattrs,
    odd names, empty files, foreign owners, read-only folders."""
    root.mkdir()
    for folder in ("etc/ssl", "usr/bin", "dev", "var/lib", "ro"):
        (root / folder).mkdir(parents=True)
    (root / "etc" / "hostname").write_text("golden\n")
    os.setxattr(root / "etc" / "hostname", "user.origin", b"test\x00\xff")
    os.setxattr(root / "etc", "user.dir", b"d")
    os.utime(root / "etc" / "hostname", ns=(MTIME, MTIME))
    (root / "etc" / "ssl" / "cert.pem").write_bytes(os.urandom(3000))
    (root / "etc" / "ssl" / "copy.pem").write_bytes((root / "etc/ssl/cert.pem").read_bytes())
    passwd = root / "usr" / "bin" / "passwd"
    passwd.write_bytes(b"\x7fELF" + os.urandom(20000))
    passwd.chmod(0o4755)
    os.link(passwd, root / "usr" / "bin" / "chfn")
    ping = root / "usr" / "bin" / "ping"
    ping.write_bytes(b"\x7fELF" + os.urandom(5000))
    ping.chmod(0o755)
    if os.path.exists(SETCAP):
        subprocess.run([SETCAP, "cap_net_raw+ep", str(ping)], check=True)
    else:
        try:
            os.setxattr(ping, "security.capability", CAPABILITY)
        except OSError:
            pytest.skip("file capabilities unsupported here")
    (root / "usr" / "bin" / "big").write_bytes(BIG)
    (root / "etc" / "ssl" / "big-copy").write_bytes(BIG)  # streamed, then copied
    (root / "etc" / "ssl" / "big-copy").chmod(0o700)
    (root / "usr" / "bin" / "vi").symlink_to("vim.basic")
    (root / "bin").symlink_to("usr/bin")
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "dev" / "null", 0o666)
    os.mkfifo(root / "dev" / "initctl", 0o600)
    os.utime(root / "dev" / "initctl", ns=(MTIME, MTIME))
    (root / "etc" / "with space.conf").write_text("a = b\n")
    with open(os.path.join(os.fsencode(root), b"caf\xe9"), "wb") as f:
        f.write(b"non-UTF-8 name\n")
    (root / "etc" / "empty").write_bytes(b"")
    os.link(root / "etc" / "empty", root / "etc" / "empty-link")
    (root / "var" / "lib" / "empty-too").write_bytes(b"")
    owned = root / "var" / "lib" / "app.db"
    owned.write_bytes(os.urandom(10000))
    os.chown(owned, 1234, 1234)
    os.chown(root / "var" / "lib", 1234, 1234)
    (root / "var" / "lib").chmod(0o750)
    (root / "ro" / "secret").write_bytes(b"secret")
    (root / "ro" / "secret").chmod(0o000)
    (root / "ro").chmod(0o500)
    root.chmod(0o711)
    return root


def rsync_differences(source: Path, dest: Path) -> str:
    result = subprocess.run(
        ["rsync", "-naHAXOJ", "--checksum", "--numeric-ids", "--delete", "--itemize-changes",
         f"{source}/", f"{dest}/"], capture_output=True, check=True)
    return result.stdout.decode(errors="replace")


def store_objects(tree: Tree, source: Path, store: ObjectStore) -> None:
    """Put the content of every regular file of `tree` (read from `source`) in `store`."""
    for path, _, inode in tree.walk():
        if inode.kind == Kind.REGULAR and inode.size and not store.has(inode.hash):
            data = (source / path.lstrip("/")).read_bytes()
            assert store.add_bytes(data) == inode.hash


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src")


def test_scan_records_every_kind(source: Path) -> None:
    tree = scan_directory(source)
    inode = {path: tree.inodes[ino] for path, ino, _ in tree.walk()}
    st = os.lstat(source)
    assert tree.root == st.st_ino
    assert inode["/"].mode == 0o711
    assert inode["/usr/bin/passwd"].mode == 0o4755
    assert tree.lookup("/usr/bin/passwd") == tree.lookup("/usr/bin/chfn")
    assert tree.lookup("/etc/empty") == tree.lookup("/etc/empty-link")
    assert tree.lookup("/etc/ssl/cert.pem") != tree.lookup("/etc/ssl/copy.pem")
    assert inode["/etc/ssl/cert.pem"].hash == inode["/etc/ssl/copy.pem"].hash
    assert dict(inode["/usr/bin/ping"].xattrs).get(b"security.capability")
    assert inode["/etc/hostname"].xattrs == ((b"user.origin", b"test\x00\xff"),)
    assert inode["/etc/hostname"].mtime_ns == MTIME
    assert inode["/etc/hostname"].hash == hash_bytes(b"golden\n")
    assert inode["/etc"].xattrs == ((b"user.dir", b"d"),)
    assert inode["/usr/bin/big"].size == len(BIG) and inode["/usr/bin/big"].hash == \
        hash_bytes(BIG)
    assert inode["/usr/bin/vi"].kind == Kind.SYMLINK
    assert inode["/usr/bin/vi"].target == b"vim.basic"
    assert inode["/bin"].target == b"usr/bin"
    assert inode["/dev/null"].kind == Kind.CHAR_DEVICE
    assert inode["/dev/null"].rdev == os.makedev(1, 3) and inode["/dev/null"].mode == 0o666
    assert inode["/dev/initctl"].kind == Kind.FIFO and inode["/dev/initctl"].rdev == 0
    assert inode["/caf\udce9"].size == 15
    assert inode["/etc/with space.conf"].size == 6
    assert inode["/etc/empty"].size == 0 and inode["/etc/empty"].hash == b""
    assert (inode["/var/lib/app.db"].uid, inode["/var/lib/app.db"].gid) == (1234, 1234)
    assert (inode["/var/lib"].uid, inode["/var/lib"].mode) == (1234, 0o750)
    assert inode["/ro/secret"].mode == 0 and inode["/ro"].mode == 0o500
    assert scan_directory(source).fingerprint() == tree.fingerprint()  # stable


def test_scan_unpack_round_trip(source: Path, tmp_path: Path) -> None:
    tree = scan_directory(source)
    store = ObjectStore(tmp_path / "store")
    store_objects(tree, source, store)
    assert set(store) == set(tree.object_sizes())
    dest = tmp_path / "dst"
    dest.mkdir()
    check_empty_destination(dest)
    assert unpack_tree(tree, dest, store) == []
    assert not (dest / MARK).exists()
    copy = scan_directory(dest)
    assert copy.fingerprint() == tree.fingerprint()
    assert copy.lookup("/usr/bin/passwd") == copy.lookup("/usr/bin/chfn")
    assert os.lstat(dest / "usr/bin/passwd").st_mode & 0o7777 == 0o4755  # after chown
    assert os.getxattr(dest / "usr/bin/ping", "security.capability", follow_symlinks=False)
    assert os.lstat(dest / "usr/bin/passwd").st_nlink == 2
    if shutil.which("rsync") is None:
        pytest.skip("rsync not installed")
    assert rsync_differences(source, dest) == ""
    # and rsync does see a difference when there is one (the check can fail)
    os.chown(dest / "etc" / "with space.conf", 1, 1)
    assert "with space.conf" in rsync_differences(source, dest)


def test_unpack_refuses_missing_objects(source: Path, tmp_path: Path) -> None:
    tree = scan_directory(source)
    dest = tmp_path / "dst"
    dest.mkdir()
    with pytest.raises(FleetError, match="never arrived"):
        unpack_tree(tree, dest, ObjectStore(tmp_path / "empty-store"))
    assert (dest / MARK).exists()  # the mark of an unfinished build stays


def test_check_empty_destination(tmp_path: Path) -> None:
    check_empty_destination(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_empty_destination(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FleetError, match="not empty"):
        check_empty_destination(tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FleetError, match="not a folder"):
        check_empty_destination(tmp_path / "file")
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(FleetError):
        check_empty_destination(tmp_path / "dangling")


def test_socket_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "file").write_text("x")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(root / "sock"))
        assert stat.S_ISSOCK(os.lstat(root / "sock").st_mode)
        tree = scan_directory(root)
    finally:
        sock.close()
    assert sorted(tree.paths()) == ["/", "/file"]


def test_exclude_prunes_subtrees_and_hooks(source: Path) -> None:
    read: list[int] = []
    asked: list[str] = []

    def exclude(path: str) -> bool:
        return path == "/var" or path.startswith("/etc/ssl")

    def known(path: str, st: os.stat_result) -> bytes | None:
        asked.append(path)
        return b"\x01" * 32 if path == "/usr/bin/big" else None

    tree = scan_directory(source, exclude=exclude, known_hash=known, on_read=read.append)
    paths = set(tree.paths())
    assert "/var" not in paths and "/var/lib/app.db" not in paths
    assert "/etc" in paths and "/etc/ssl" not in paths and "/etc/ssl/cert.pem" not in paths
    assert "/etc/hostname" in paths
    assert tree.inodes[tree.lookup("/usr/bin/big")].hash == b"\x01" * 32  # trusted hash
    assert len(BIG) not in read  # ...so the big file was not read
    assert "/var/lib/app.db" not in asked and "/etc/empty" not in asked
    assert sorted(read) == sorted(i.size for p, _, i in tree.walk()
                                  if i.kind == Kind.REGULAR and i.size and p != "/usr/bin/big"
                                  and p != "/usr/bin/chfn")


def test_scan_refuses_non_directories(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="cannot scan"):
        scan_directory(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FleetError, match="not a directory"):
        scan_directory(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(FleetError, match="not a directory"):
        scan_directory(tmp_path / "link")


@contextlib.contextmanager
def tmpfs(where: Path) -> Iterator[None]:
    where.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "none", os.fspath(where)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", os.fspath(where)], check=True)


def test_mount_point_is_not_crossed(source: Path) -> None:
    with tmpfs(source / "mnt"):
        (source / "mnt" / "inside").write_text("on another filesystem")
        (source / "mnt" / "dir").mkdir()
        tree = scan_directory(source)
    mnt = tree.lookup("/mnt")
    assert mnt is not None and mnt != tree.root
    assert tree.inodes[mnt].kind == Kind.DIRECTORY
    assert tree.children[mnt] == {}
    assert tree.lookup("/mnt/inside") is None
    assert "/usr/bin/passwd" in tree.paths()  # the rest of the tree is intact


def test_mount_point_with_colliding_inode_number(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    with tmpfs(outer):
        (outer / "file").write_text("x")
        with tmpfs(outer / "mnt"):
            if os.lstat(outer).st_ino != os.lstat(outer / "mnt").st_ino:
                pytest.skip("the two tmpfs roots have different inode numbers here")
            tree = scan_directory(outer)
    mnt = tree.lookup("/mnt")
    assert mnt != tree.root  # not a hard link to the root directory
    assert tree.children[mnt] == {}
