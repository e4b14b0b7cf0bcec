"""Reading a tarball (plain, gzip, zstd, xz or bzip2) into a Tree without unpacking it.

Tar members come from users and are untrusted (docs/DESIGN.md "Security"): every name,
link and number is validated, and a bad or damaged archive gives a one-line
FleetError and no partial tree. The archive is streamed twice at most: `Tarball.read`
builds the tree and hashes each regular member; `Tarball.iter_objects` then hands out
the content of the members holding the objects the image server lacks, using the
hashes recorded by the first pass. An image layer (fstree/oci.py) is read the same way,
from any seekable stream, into the tree of the layers below it.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, NamedTuple, Self

import zstandard

from fleetlib.errors import FleetError
from fleetlib.fstree.hashing import READ_SIZE, Reader
from fleetlib.fstree.tree import (
    Inode,
    Kind,
    Tree,
    TreeBuilder,
    Xattrs,
    directory,
    regular,
    special,
    symlink,
)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE = 0x184D2A50  # the magic of a skippable frame, low 4 bits free
_XZ_MAGIC = b"\xfd7zXZ\x00"
# "BZh", the block size digit, then a block's or the stream end's magic (so that a plain
# tar whose first member is named "BZh..." is not taken for bzip2).
_BZIP2_MAGIC = re.compile(rb"BZh[1-9](\x31\x41\x59\x26\x53\x59|\x17\x72\x45\x38\x50\x90)")
_MAGIC_BYTES = 10
# What a damaged archive raises from tarfile or a decompressor (tarfile lets
# ValueError escape from malformed pax sparse maps and hdrcharset records; bz2 raises
# OSError).
_DAMAGE = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError,
           lzma.LZMAError)
_XATTR_PREFIX = "SCHILY.xattr."
# GNU tar writes `=` and `%` in xattr names as %3D and %25 (pax keywords end at `=`).
_XATTR_ESCAPE = re.compile("%(25|3D)")
_PAX_TIME = re.compile(r"(-?)(\d{1,30})(?:\.(\d*))?")
_NS = 10**9
# Fields a later consumer packs into fixed-width integers, with their bounds.
_LIMITS = (("uid", 2**32), ("gid", 2**32), ("size", 2**63), ("devmajor", 2**31),
           ("devminor", 2**31))

# Opens the archive's bytes (compressed or not) as a new seekable stream.
Opener = Callable[[], BinaryIO]
# Told each member's tree path before the member is added; True when it took the member
# itself (an image layer's whiteout), which is then left out of the tree.
Intercept = Callable[[str], bool]


class _Stored(NamedTuple):
    """Where the first pass found a regular member's content."""

    digest: bytes
    size: int
    name: str


class _StrictInfo(tarfile.TarInfo):
    """TarInfo that reports a missing or damaged header after the first one, where
    tarfile would silently end the archive: a tarball cut at a block boundary must
    not pass for a shorter, complete one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        offset = tarfile_.fileobj.tell()
        try:
            return super().fromtarfile(tarfile_)
        # tarfile's header errors are internal: typeshed leaves them out.
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]
            raise tarfile.ReadError(
                f"data ends at byte {offset} without an end-of-archive marker") from None
        except (tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
                tarfile.InvalidHeaderError) as e:  # type: ignore[attr-defined]
            raise tarfile.ReadError(f"{e} at byte {offset}") from None


class Tarball:
    """A tarball, read in streaming passes (never unpacked, never loaded whole):
    `read` builds the Tree, `iter_objects` yields member contents.

    It is the file at `path` unless `opener` gives its bytes (an image layer inside an
    archive); `label` names it in errors (default "tarball PATH")."""

    def __init__(self, path: Path, opener: Opener | None = None, label: str = "") -> None:
        self.path = path
        self.label = label or f"tarball {path}"
        self._opener = opener or (lambda: open(path, "rb"))
        self._member_hashes: dict[int, _Stored] | None = None

    def read(self, builder: TreeBuilder | None = None,
             intercept: Intercept | None = None) -> Tree:
        """The tree the tarball holds, as `tar -x` as root would make it (over what
        `builder` holds already, if given; `intercept` is shown each member first);
        also records which member holds which content hash, for `iter_objects`."""
        tree, self._member_hashes = self._first_pass(builder or TreeBuilder(), intercept)
        return tree

    def object_digests(self) -> set[bytes]:
        """The content hashes of the regular members `read` found."""
        assert self._member_hashes is not None, "read comes first"
        return {stored.digest for stored in self._member_hashes.values()}

    def _first_pass(self, builder: TreeBuilder,
                    intercept: Intercept | None) -> tuple[Tree, dict[int, _Stored]]:
        """The tree, and where each regular member's content is (by member index)."""
        hashes: dict[int, _Stored] = {}
        with self._open() as (tar, stream):
            for index, member in enumerate(_members(tar)):
                path = self._tree_path(member, member.name)
                if intercept is not None and self._intercepted(member, path, intercept):
                    continue
                if member.islnk():
                    number = self._link_target(builder, member)
                    self._add(builder, member, path, builder.tree.inodes[number], number)
                    continue
                inode = self._inode(tar, member)
                if inode.kind == Kind.REGULAR and inode.size:
                    hashes[index] = _Stored(inode.hash, inode.size, member.name)
                self._add(builder, member, path, inode)
            # Read to the end so the decompressor checks its trailer (gzip CRC and
            # length, zstd checksum) past the end-of-archive marker.
            while stream.read(READ_SIZE):
                pass
        return builder.tree, hashes

    def iter_objects(self, wanted: set[bytes]) -> Iterator[tuple[bytes, int, Reader]]:
        """Yield (digest, size, reader) once for each wanted hash, from the first
        member holding it, so an uploader can send just the objects a server lacks.

        Reads the archive again without hashing (after a first `read` if none was
        done); the caller reads each reader fully before advancing. A member that
        changed since `read` (other name or size) is skipped; the content itself is
        not re-verified, so the object store must check hashes as it always does."""
        if self._member_hashes is None:
            _, self._member_hashes = self._first_pass(TreeBuilder(), None)
        stored = self._member_hashes
        pending = set(wanted)
        with self._open() as (tar, _):
            for index, member in enumerate(_members(tar)):
                if not pending:
                    return
                found = stored.get(index)
                if found is None or found.digest not in pending:
                    continue
                if not member.isreg() or member.name != found.name or member.size != found.size:
                    continue
                pending.discard(found.digest)
                yield found.digest, found.size, _MemberReader(self.label,
                                                              _content(tar, member))

    @contextlib.contextmanager
    def _open(self) -> Iterator[tuple[tarfile.TarFile, Reader]]:
        """The archive as a streaming TarFile over its decompressed bytes (also
        given, to read past the tar end), compression told by magic bytes."""
        try:
            raw = self._opener()
        except OSError as e:
            raise FleetError(f"cannot read {self.label}: {e.strerror or e}") from None
        with raw:
            try:
                magic = raw.read(_MAGIC_BYTES)
                raw.seek(0)
                stream: BinaryIO | gzip.GzipFile | lzma.LZMAFile | bz2.BZ2File
                if magic.startswith(_GZIP_MAGIC):
                    stream = gzip.GzipFile(fileobj=raw, mode="rb")
                elif magic.startswith(_ZSTD_MAGIC) or _skippable(magic[:4]):  # pzstd: skippable
                    _check_zstd_frames(raw)
                    raw.seek(0)
                    stream = zstandard.ZstdDecompressor().stream_reader(
                        raw, read_across_frames=True, closefd=False)
                elif magic.startswith(_XZ_MAGIC):
                    stream = lzma.LZMAFile(raw)  # as xz(1): every stream of a multi-stream file
                elif _BZIP2_MAGIC.fullmatch(magic):
                    stream = bz2.BZ2File(raw)  # every stream, as pbzip2 writes them
                else:
                    stream = raw
                with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictInfo,
                                  encoding="utf-8", errors="surrogateescape") as tar:
                    yield tar, stream
            except _DAMAGE as e:
                raise _damaged(self.label, e) from None

    def _bad(self, member: tarfile.TarInfo, reason: str) -> FleetError:
        """The error for one unacceptable member."""
        return FleetError(f"bad {self.label}: member {member.name!r}: {reason}")

    def _intercepted(self, member: tarfile.TarInfo, path: str, intercept: Intercept) -> bool:
        """Whether `intercept` took the member, naming the member when it refuses it."""
        try:
            return intercept(path)
        except FleetError as e:
            raise self._bad(member, str(e)) from None

    def _tree_path(self, member: tarfile.TarInfo, name: str, label: str = "") -> str:
        """Absolute tree path of a member's name (or of the `label`led name it links
        to): leading `./`, `.` components and repeated `/` dropped; absolute names,
        NUL and `..` refused."""
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if name.startswith("/"):
            reason = "absolute path"
        elif "\0" in name:
            reason = "NUL byte in name"
        elif ".." in parts:
            reason = "'..' in path"
        else:
            return "/" + "/".join(parts)
        raise self._bad(member, f"{label} {name!r}: {reason}" if label else reason)

    def _link_target(self, builder: TreeBuilder, member: tarfile.TarInfo) -> int:
        """Inode number a hard link member names: what an earlier member put at that
        path, which must not be a directory."""
        target = self._tree_path(member, member.linkname, "hard link target")
        number = builder.tree.lookup(target)
        if number is None:
            raise self._bad(member, f"hard link to {member.linkname!r}, "
                                    "which no earlier member holds")
        if builder.tree.inodes[number].kind == Kind.DIRECTORY:
            raise self._bad(member, f"hard link to directory {member.linkname!r}")
        return number

    def _add(self, builder: TreeBuilder, member: tarfile.TarInfo, path: str, inode: Inode,
             number: int | None = None) -> None:
        """Put one member in the tree, naming the member when the tree refuses it."""
        try:
            builder.add(path, inode, number)
        except FleetError as e:
            raise self._bad(member, str(e)) from None

    def _inode(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> Inode:
        """The inode a (non hard link) member describes; regular members are hashed."""
        for field, limit in _LIMITS:
            value = getattr(member, field)
            if not 0 <= value < limit:
                raise self._bad(member, f"{field} {value} out of range")
        mode, uid, gid = member.mode, member.uid, member.gid
        if member.issym():
            target = _raw(member.linkname)
            if not target or b"\0" in target:
                raise self._bad(member, f"invalid symlink target {member.linkname!r}")
            return symlink(uid, gid, target)
        xattrs = self._xattrs(member)
        if member.isdir():
            return directory(mode, uid, gid, xattrs)
        mtime_ns = self._mtime_ns(member)
        if member.isreg():
            digest = _hash(tar, member) if member.size else b""
            return regular(mode, uid, gid, mtime_ns, member.size, digest, xattrs)
        if member.ischr() or member.isblk():
            kind = Kind.CHAR_DEVICE if member.ischr() else Kind.BLOCK_DEVICE
            rdev = os.makedev(member.devmajor, member.devminor)
            return special(kind, mode, uid, gid, mtime_ns, rdev, xattrs)
        if member.isfifo():
            return special(Kind.FIFO, mode, uid, gid, mtime_ns, 0, xattrs)
        raise self._bad(member, f"unsupported member type {member.type!r}")

    def _mtime_ns(self, member: tarfile.TarInfo) -> int:
        """Modification time in ns: exact from a pax `mtime` (tarfile makes it a float,
        which loses the last digits), else the header's whole seconds."""
        text = member.pax_headers.get("mtime")
        if text is None:
            ns = int(member.mtime) * _NS  # whole seconds here (a float only from pax)
        else:
            match = _PAX_TIME.fullmatch(text)
            if match is None:
                raise self._bad(member, f"malformed pax mtime {text!r}")
            sign, seconds, fraction = match.groups()
            ns = int(seconds) * _NS + int((fraction or "")[:9].ljust(9, "0"))
            ns = -ns if sign else ns
        if not -(2**63) <= ns < 2**63:
            raise self._bad(member, "mtime out of range")
        return ns

    def _xattrs(self, member: tarfile.TarInfo) -> Xattrs:
        """Extended attributes from `SCHILY.xattr.<name>` pax records, sorted by name,
        as the raw bytes tar stored (tarfile decoded them with surrogate escapes)."""
        xattrs = []
        for key, value in member.pax_headers.items():
            if key.startswith(_XATTR_PREFIX):
                name = _XATTR_ESCAPE.sub(
                    lambda m: "%" if m[1] == "25" else "=", key[len(_XATTR_PREFIX):])
                if not name or "\0" in name:
                    raise self._bad(member, f"invalid extended attribute name {name!r}")
                xattrs.append((_raw(name), _raw(value)))
        return tuple(sorted(xattrs))


class _MemberReader:
    """One member's content, whose read errors are FleetErrors (the archive may have
    been cut or damaged since the first pass)."""

    def __init__(self, label: str, member_file: IO[bytes]) -> None:
        self._label = label
        self._file = member_file

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes of the member (the rest when negative)."""
        try:
            return self._file.read(size)
        except _DAMAGE as e:
            raise _damaged(self._label, e) from None


def _check_zstd_frames(raw: BinaryIO) -> None:
    """Walk the zstd frame and block headers of `raw` to its end (seeking over the
    data): zstandard's stream reader ends silently at a frame cut short, even one
    missing just its checksum, so a cut .tar.zst would pass for whole."""
    end = raw.seek(0, os.SEEK_END)
    raw.seek(0)
    while header := raw.read(4):
        if len(header) < 4:
            raise zstandard.ZstdError("zstd data ends inside a frame header")
        if _skippable(header):
            _skip(raw, end, int.from_bytes(_read_exactly(raw, 4), "little"))
            continue
        if header != _ZSTD_MAGIC:
            raise zstandard.ZstdError("not a zstd frame after the previous one")
        descriptor = _read_exactly(raw, 1)[0]
        single_segment = descriptor >> 5 & 1
        size_field = (0 if not single_segment else 1, 2, 4, 8)[descriptor >> 6]
        _skip(raw, end, (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + size_field)
        last = False
        while not last:
            block = int.from_bytes(_read_exactly(raw, 3), "little")
            last, kind, size = bool(block & 1), block >> 1 & 3, block >> 3
            if kind == 3:
                raise zstandard.ZstdError("reserved zstd block type")
            _skip(raw, end, 1 if kind == 1 else size)
        if descriptor >> 2 & 1:
            _skip(raw, end, 4)  # the content checksum


def _skippable(header: bytes) -> bool:
    """Whether four bytes are the magic of a zstd skippable frame."""
    return len(header) == 4 and int.from_bytes(header, "little") & 0xFFFFFFF0 == _ZSTD_SKIPPABLE


def _read_exactly(raw: BinaryIO, size: int) -> bytes:
    """`size` bytes of `raw`, or ZstdError when the file ends first."""
    data = raw.read(size)
    if len(data) < size:
        raise zstandard.ZstdError("zstd data cut short")
    return data


def _skip(raw: BinaryIO, end: int, size: int) -> None:
    """Seek `size` bytes forward, or ZstdError when that is past `end`."""
    position = raw.tell() + size
    if position > end:
        raise zstandard.ZstdError("zstd data cut short")
    raw.seek(position)


def _damaged(label: str, error: Exception) -> FleetError:
    """The error for an archive that cannot be read through."""
    return FleetError(f"truncated or corrupt {label}: {str(error) or type(error).__name__}")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members in archive order, each forgotten by the TarFile once handed out, so
    memory stays flat however many members the archive holds."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # real, but typeshed omits it
        yield member


def _hash(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """SHA-256 of a regular member's content, streamed in 1 MiB reads."""
    digest = hashlib.sha256()
    content = _content(tar, member)
    while chunk := content.read(READ_SIZE):
        digest.update(chunk)
    return digest.digest()


def _content(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A regular member's content stream."""
    content = tar.extractfile(member)
    assert content is not None, "tarfile gives content for every regular member"
    return content


def _raw(text: str) -> bytes:
    """The bytes tarfile decoded into `text` (UTF-8, surrogate escapes for the rest)."""
    return text.encode("utf-8", "surrogateescape")


def read_tarball(path: Path) -> Tree:
    """The tree a .tar, .tar.gz, .tar.zst, .tar.xz or .tar.bz2 file holds, read without
    unpacking it."""
    return Tarball(path).read()


def iter_tarball_objects(path: Path, wanted: set[bytes]) -> Iterator[tuple[bytes, int, Reader]]:
    """(digest, size, reader) for each wanted content hash the tarball holds, once
    each; see `Tarball.iter_objects` (this reads the archive twice)."""
    return Tarball(path).iter_objects(wanted)
