"""Tests of fstree.tarball: real GNU tar archives of a synthetic tree, and hostile
archives made with Python's tarfile."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import random
import shutil
import stat
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from fleetlib.errors import FleetError
from fleetlib.fstree.tarball import Tarball, iter_tarball_objects, read_tarball
from fleetlib.fstree.tree import Inode, Kind, Tree, directory, regular, special, symlink

UID = 1234
BIG = random.Random(0).randbytes(3 * (1 << 20) + 1)  # more than one 1 MiB read


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------- GNU tar archives


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A directory holding every kind of inode tar can carry, owned by UID."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown and mknod")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "dev").mkdir()
    (src / "etc" / "file with spaces").write_bytes(b"hello world\n")
    (src / "bin" / "setuid").write_bytes(b"#!/bin/sh\n")
    (src / "big").write_bytes(BIG)
    (src / "empty").write_bytes(b"")
    (src / "hard1").write_bytes(b"linked")
    os.link(src / "hard1", src / "hard2")
    os.symlink("etc/file with spaces", src / "link")
    os.mknod(src / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(src / "fifo", 0o640)
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    (src / "xattr").write_bytes(b"with attributes")
    try:
        os.setxattr(src / "xattr", "user.test", b"value")
        os.setxattr(src / "xattr", "user.bin", b"\xff\x00\x01")
        os.setxattr(src / "xattr", "user.a=b%c", b"")
    except OSError:
        pass  # the filesystem refuses user xattrs: the tree simply has none
    for path in [src, *src.rglob("*")]:
        os.chown(path, UID, UID + 1, follow_symlinks=False)
    os.chown(src / "etc", 0, UID)
    (src / "bin" / "setuid").chmod(0o4755)  # after chown, which clears set-user-ID
    src.chmod(0o750)
    (src / "etc").chmod(0o711)
    return src


COMPRESSIONS = ["plain", "gzip", "zstd", "xz", "bzip2"]
# Where the program is missing, tar's output is compressed through Python instead.
PYTHON_COMPRESS = {"zstd": zstandard.ZstdCompressor().compress,
                   "xz": lambda data: lzma.compress(data, preset=0),
                   "bzip2": lambda data: bz2.compress(data, 1)}
FAST = {**os.environ, "XZ_OPT": "-0", "BZIP2": "-1"}  # the slowest compressors' fastest levels


def gnu_tar(src: Path, out: Path, compression: str, *options: str) -> Path:
    """Archive `src` with GNU tar, compressed as asked (through Python when the
    compression program is missing)."""
    flags = {"plain": [], "gzip": ["-z"], "zstd": ["--zstd"], "xz": ["-J"],
             "bzip2": ["-j"]}[compression]
    in_python = compression in PYTHON_COMPRESS and shutil.which(compression) is None
    if in_python:
        flags = []
    subprocess.run(
        ["tar", *flags, "--xattrs", "--xattrs-include=*", "--numeric-owner", *options,
         "-cpf", str(out), "-C", str(src), "."],
        check=True, env=FAST)
    if in_python:
        out.write_bytes(PYTHON_COMPRESS[compression](out.read_bytes()))
    return out


def lstat_inode(path: Path, whole_seconds: bool = False) -> Inode:
    """The inode the tree should hold for `path`, from the filesystem itself."""
    st = os.lstat(path)
    mtime_ns = st.st_mtime_ns // 10**9 * 10**9 if whole_seconds else st.st_mtime_ns
    if stat.S_ISLNK(st.st_mode):
        return symlink(st.st_uid, st.st_gid, os.fsencode(os.readlink(path)))
    xattrs = tuple(sorted(
        (name.encode(), os.getxattr(path, name, follow_symlinks=False))
        for name in os.listxattr(path, follow_symlinks=False)))
    if stat.S_ISDIR(st.st_mode):
        return directory(st.st_mode, st.st_uid, st.st_gid, xattrs)
    if stat.S_ISREG(st.st_mode):
        return regular(st.st_mode, st.st_uid, st.st_gid, mtime_ns, st.st_size,
                       sha(path.read_bytes()), xattrs)
    kind = Kind.CHAR_DEVICE if stat.S_ISCHR(st.st_mode) else Kind.FIFO
    return special(kind, st.st_mode, st.st_uid, st.st_gid, mtime_ns, st.st_rdev, xattrs)


def expected_inodes(src: Path, whole_seconds: bool = False) -> dict[str, Inode]:
    found = {"/": lstat_inode(src)}
    for path in src.rglob("*"):
        found["/" + str(path.relative_to(src))] = lstat_inode(path, whole_seconds)
    return found


def tree_inodes(tree: Tree) -> dict[str, Inode]:
    return {path: inode for path, _, inode in tree.walk()}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_gnu_tar_posix_archive_gives_exact_tree(source: Path, tmp_path: Path,
                                                compression: str) -> None:
    archive = gnu_tar(source, tmp_path / "image.tar", compression, "--format=posix")
    tree = read_tarball(archive)
    got = tree_inodes(tree)
    assert got == expected_inodes(source)

    assert got["/"] == directory(0o750, UID, UID + 1)
    assert got["/etc"] == directory(0o711, 0, UID)
    assert got["/etc/file with spaces"].hash == sha(b"hello world\n")
    assert got["/etc/file with spaces"].uid == UID
    assert got["/bin/setuid"].mode == 0o4755
    assert got["/big"].size == len(BIG) and got["/big"].hash == sha(BIG)
    assert got["/empty"] == regular(0o644, UID, UID + 1, got["/empty"].mtime_ns, 0, b"")
    assert got["/link"] == symlink(UID, UID + 1, b"etc/file with spaces")
    assert got["/dev/null"].kind == Kind.CHAR_DEVICE
    assert got["/dev/null"].rdev == os.makedev(1, 3)
    assert got["/fifo"].kind == Kind.FIFO and got["/fifo"].mode == 0o640
    assert got[os.fsdecode(b"/caf\xe9")].hash == sha(b"latin-1 name")
    assert got["/big"].mtime_ns == os.lstat(source / "big").st_mtime_ns
    assert tree.lookup("/hard1") == tree.lookup("/hard2")
    assert tree.link_counts()[tree.lookup("/hard1")] == 2
    if os.listxattr(source / "xattr"):
        assert got["/xattr"].xattrs == (
            (b"user.a=b%c", b""), (b"user.bin", b"\xff\x00\x01"), (b"user.test", b"value"))


def test_gnu_format_has_whole_second_mtimes(source: Path, tmp_path: Path) -> None:
    archive = tmp_path / "gnu.tar"
    subprocess.run(["tar", "--numeric-owner", "--format=gnu", "-cpf", str(archive),
                    "-C", str(source), "."], check=True)
    got = tree_inodes(read_tarball(archive))
    expected = expected_inodes(source, whole_seconds=True)
    assert got == {path: replace(inode, xattrs=()) for path, inode in expected.items()}


@pytest.mark.parametrize("options", [["--format=posix"], ["--format=gnu"],
                                     ["--format=posix", "--sparse-version=0.1"]])
def test_sparse_members_read_as_regular_files(tmp_path: Path, options: list[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(0, io.SEEK_END)
        f.write(b"end\n")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-S", *options, "-cf", str(archive), "-C", str(src), "sparse"],
                   check=True)
    inode = tree_inodes(read_tarball(archive))["/sparse"]
    assert inode.size == (3 << 20) + 4
    assert inode.hash == sha((src / "sparse").read_bytes())


@pytest.mark.parametrize("compression", ["plain", "gzip", "zstd"])  # xz, bzip2: the CLI test
def test_iter_objects_of_gnu_archive(source: Path, tmp_path: Path, compression: str) -> None:
    archive = gnu_tar(source, tmp_path / "image.tar", compression, "--format=posix")
    tarball = Tarball(archive)
    sizes = tarball.read().object_sizes()
    got = {}
    for digest, size, reader in tarball.iter_objects(set(sizes)):
        data = reader.read()
        assert digest not in got
        got[digest] = (size, data)
    assert {digest: size for digest, (size, _) in got.items()} == sizes
    assert all(sha(data) == digest for digest, (_, data) in got.items())


# ---------------------------------------------------------------- Python tarfile archives


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
          **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for field, value in fields.items():
        setattr(info, field, value)
    return info, data


def python_tar(path: Path, *entries: tuple[tarfile.TarInfo, bytes],
               mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def read_error(path: Path) -> str:
    with pytest.raises(FleetError) as caught:
        read_tarball(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(("entries", "words"), [
    ([entry("/etc/x", data=b"x")], ["'/etc/x'", "absolute path"]),
    ([entry("../evil", data=b"x")], ["'../evil'", "'..'"]),
    ([entry("a/../../b", data=b"x")], ["'a/../../b'", "'..'"]),
    ([entry("a", pax_headers={"path": "a\0b"})], ["NUL"]),
    ([entry("link", tarfile.SYMTYPE, linkname="/etc"), entry("link/passwd", data=b"x")],
     ["'link/passwd'", "/link is a symlink"]),
    ([entry("h", tarfile.LNKTYPE, linkname="nothere")], ["'h'", "'nothere'", "no earlier"]),
    ([entry("d", tarfile.DIRTYPE), entry("h", tarfile.LNKTYPE, linkname="d")],
     ["'h'", "directory 'd'"]),
    ([entry("a", data=b"x"), entry("h", tarfile.LNKTYPE, linkname="/a")],
     ["'h'", "hard link target '/a'", "absolute"]),
    ([entry(".", data=b"x")], ["'.'", "must be a directory"]),
    ([entry("v", b"V")], ["'v'", "unsupported member type"]),
    ([entry("a", pax_headers={"uid": "-5"})], ["'a'", "uid -5 out of range"]),
    ([entry("a", pax_headers={"mtime": "soon"})], ["'a'", "malformed pax mtime"]),
    ([entry("s", tarfile.SYMTYPE, linkname="")], ["'s'", "symlink target"]),
])
def test_bad_members_are_refused(tmp_path: Path, entries: list, words: list[str]) -> None:
    message = read_error(python_tar(tmp_path / "bad.tar", *entries))
    assert message.startswith("bad tarball ")
    for word in words:
        assert word in message


def two_member_tar(path: Path, mode: str = "w") -> Path:
    return python_tar(path, entry("a", data=b"a" * 1024),
                      entry("b", data=random.Random(1).randbytes(200_000)), mode=mode)


@pytest.mark.parametrize(("name", "cut"), [
    ("mid-data.tar", lambda data: data[:512 * 3 + 100_000]),
    ("mid-header.tar", lambda data: data[:512 * 3 + 100]),
    ("mid-data.tar.gz", lambda data: data[:len(data) // 2]),
    ("no-trailer.tar.gz", lambda data: data[:-4]),      # tar complete, gzip not
    ("mid-data.tar.zst", lambda data: data[:len(data) // 2]),
    ("mid-data.tar.xz", lambda data: data[:len(data) // 2]),
    ("no-index.tar.xz", lambda data: data[:-12]),       # the stream footer cut
    ("mid-data.tar.bz2", lambda data: data[:len(data) // 2]),
    ("no-trailer.tar.bz2", lambda data: data[:-4]),     # the stream CRC cut
])
def test_truncated_archives_are_refused(tmp_path: Path, name: str, cut) -> None:
    whole = tmp_path / "whole.tar"
    two_member_tar(whole, mode="w")
    data = whole.read_bytes()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        data = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    elif name.endswith(".xz"):
        data = lzma.compress(data)
    elif name.endswith(".bz2"):
        data = bz2.compress(data)
    damaged = tmp_path / name
    damaged.write_bytes(cut(data))
    assert read_error(damaged).startswith("truncated or corrupt tarball ")


def test_cut_at_header_is_not_taken_for_a_short_archive(tmp_path: Path) -> None:
    whole = two_member_tar(tmp_path / "whole.tar")
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:512 * 3])
    assert "end-of-archive" in read_error(tmp_path / "cut.tar")


@pytest.mark.parametrize("content", [
    b"",
    random.Random(2).randbytes(10_000),
    b"\x1f\x8b" + random.Random(3).randbytes(10_000),
    b"\x28\xb5\x2f\xfd" + random.Random(4).randbytes(10_000),
    b"\xfd7zXZ\x00" + random.Random(5).randbytes(10_000),
    b"BZh91AY&SY" + random.Random(6).randbytes(10_000),
])
def test_garbage_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "garbage.tar").write_bytes(content)
    assert read_error(tmp_path / "garbage.tar").startswith("truncated or corrupt tarball ")


def test_damaged_header_after_first_member_is_refused(tmp_path: Path) -> None:
    good = python_tar(tmp_path / "one.tar", entry("a", data=b"a" * 512)).read_bytes()
    (tmp_path / "bad.tar").write_bytes(good[:1024] + b"\xff" * 512 + bytes(1024))
    assert "bad checksum at byte 1024" in read_error(tmp_path / "bad.tar")


def test_unreadable_paths(tmp_path: Path) -> None:
    assert "cannot read tarball" in read_error(tmp_path / "missing.tar")
    assert "cannot read tarball" in read_error(tmp_path)


def test_names_are_normalised_and_root_member_sets_root(tmp_path: Path) -> None:
    archive = python_tar(
        tmp_path / "t.tar",
        entry("./", tarfile.DIRTYPE, mode=0o700, uid=7, gid=8),
        entry(".//a//b/", tarfile.DIRTYPE, mode=0o750),
        entry("./a/./b//c", data=b"c"),
    )
    tree = read_tarball(archive)
    assert tree.inodes[tree.root] == directory(0o700, 7, 8)
    assert sorted(tree.paths()) == ["/", "/a", "/a/b", "/a/b/c"]
    assert tree.inodes[tree.lookup("/a")] == directory(0o755, 0, 0)  # made as a parent
    assert tree.inodes[tree.lookup("/a/b")].mode == 0o750


def test_later_member_replaces_earlier(tmp_path: Path) -> None:
    archive = python_tar(tmp_path / "t.tar", entry("f", data=b"old"),
                         entry("f", tarfile.SYMTYPE, linkname="x"), entry("f", data=b"new"))
    tree = read_tarball(archive)
    assert tree.inodes[tree.lookup("/f")].hash == sha(b"new")
    assert len(tree.inodes) == 2


@pytest.mark.parametrize(("text", "ns"), [
    ("1700000000.123456789", 1_700_000_000_123_456_789),  # a float would end in ...768
    ("1700000000.5", 1_700_000_000_500_000_000),
    ("1700000000.1234567891", 1_700_000_000_123_456_789),
    ("1700000000", 1_700_000_000_000_000_000),
    ("-1.25", -1_250_000_000),
])
def test_pax_mtime_is_exact(tmp_path: Path, text: str, ns: int) -> None:
    archive = python_tar(tmp_path / "t.tar", entry("f", data=b"x", pax_headers={"mtime": text}))
    assert tree_inodes(read_tarball(archive))["/f"].mtime_ns == ns


def test_ustar_mtime_and_devices(tmp_path: Path) -> None:
    archive = tmp_path / "t.tar"
    info, _ = entry("f", tarfile.BLKTYPE, mtime=1234, devmajor=8, devminor=1, mode=0o660,
                    uid=5, gid=6)
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info)
    got = tree_inodes(read_tarball(archive))["/f"]
    assert got == special(Kind.BLOCK_DEVICE, 0o660, 5, 6, 1234 * 10**9, os.makedev(8, 1))


def test_pax_xattrs_sorted_as_bytes(tmp_path: Path) -> None:
    archive = python_tar(tmp_path / "t.tar", entry("f", data=b"x", pax_headers={
        "SCHILY.xattr.user.b": "2", "SCHILY.xattr.security.capability": "é",
        "SCHILY.xattr.user.a": "1"}))
    assert tree_inodes(read_tarball(archive))["/f"].xattrs == (
        (b"security.capability", "é".encode()), (b"user.a", b"1"), (b"user.b", b"2"))


# ---------------------------------------------------------------- second pass


def objects_tar(path: Path) -> Path:
    return python_tar(
        path,
        entry("x", data=b"same" * 1000),
        entry("dir/y", data=b"same" * 1000),
        entry("z", data=b"other"),
        entry("e"),
        entry("h", tarfile.LNKTYPE, linkname="x"),
    )


def test_iter_objects_yields_each_wanted_object_once(tmp_path: Path) -> None:
    archive = objects_tar(tmp_path / "t.tar")
    wanted = {sha(b"same" * 1000), sha(b"other"), sha(b"missing"), sha(b"")}
    got = [(digest, size, reader.read()) for digest, size, reader
           in iter_tarball_objects(archive, wanted)]
    assert sorted(got) == sorted([(sha(b"same" * 1000), 4000, b"same" * 1000),
                                  (sha(b"other"), 5, b"other")])


def test_iter_objects_does_not_rehash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = Tarball(objects_tar(tmp_path / "t.tar"))
    tarball.read()
    wanted = {sha(b"other")}

    def refuse(*args: object) -> None:
        raise AssertionError("hashed again")

    monkeypatch.setattr(hashlib, "sha256", refuse)
    assert [(d, r.read()) for d, _, r in tarball.iter_objects(wanted)] == [
        (next(iter(wanted)), b"other")]


def test_iter_objects_skips_members_changed_since_read(tmp_path: Path) -> None:
    archive = objects_tar(tmp_path / "t.tar")
    tarball = Tarball(archive)
    sizes = tarball.read().object_sizes()
    # x (first holder of "same") renamed, dir/y kept at its place, z gone
    python_tar(archive, entry("w", data=b"w" * 4000), entry("dir/y", data=b"same" * 1000))
    got = [(digest, reader.read()) for digest, _, reader in tarball.iter_objects(set(sizes))]
    assert got == [(sha(b"same" * 1000), b"same" * 1000)]


def test_iter_objects_on_archive_cut_since_read(tmp_path: Path) -> None:
    archive = two_member_tar(tmp_path / "t.tar")
    tarball = Tarball(archive)
    sizes = tarball.read().object_sizes()
    archive.write_bytes(archive.read_bytes()[:512 * 3 + 100_000])
    with pytest.raises(FleetError, match="truncated or corrupt tarball"):
        for _, _, reader in tarball.iter_objects(set(sizes)):
            reader.read()
