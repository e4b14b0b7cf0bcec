"""A canonical `ls -l`-style listing of a tree, one line per path in entry order:

    -rwsr-xr-x 1 0 0 68248 2023-03-23 13:17:04.000000000 /usr/bin/passwd
    crw-rw-rw- 1 0 0 1,3 2023-03-23 13:17:04.000000000 /dev/null
    lrwxrwxrwx 1 0 0 - - /bin -> usr/bin

Directory and symlink times are not part of a tree, so they show as `-`.
Names that are not printable UTF-8 are escaped as `\\xNN`.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Iterator

from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.tree import DEVICE_KINDS, Inode, Kind, Tree


def quote(text: str) -> str:
    """A path made printable: non-printable characters and undecodable bytes as \\xNN."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogate escape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif not char.isprintable():
            out.append("".join(f"\\x{b:02x}" for b in char.encode()))
        else:
            out.append(char)
    return "".join(out)


def format_time(mtime_ns: int) -> str:
    """UTC time with nanoseconds."""
    seconds, nanos = divmod(mtime_ns, 10**9)
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S}.{nanos:09d}"


def format_inode(path: str, inode: Inode, links: int = 1, hashes: bool = False) -> str:
    """One listing line."""
    mode = stat.filemode(inode.kind.type_bits | inode.mode)
    if inode.kind in DEVICE_KINDS:
        size = f"{os.major(inode.rdev)},{os.minor(inode.rdev)}"
    elif inode.kind == Kind.REGULAR:
        size = str(inode.size)
    else:
        size = "-"
    when = "-" if inode.kind in (Kind.DIRECTORY, Kind.SYMLINK) else format_time(inode.mtime_ns)
    line = f"{mode} {links} {inode.uid} {inode.gid} {size} {when} {quote(path)}"
    if inode.kind == Kind.SYMLINK:
        line += " -> " + quote(os.fsdecode(inode.target))
    if inode.xattrs:
        line += " [" + ",".join(quote(os.fsdecode(name)) for name, _ in inode.xattrs) + "]"
    if hashes and inode.hash:
        line += " " + format_hash(inode.hash)
    return line


def listing(tree: Tree, hashes: bool = False) -> Iterator[str]:
    """The whole tree as listing lines."""
    links = tree.link_counts()
    for path, ino, inode in tree.walk():
        yield format_inode(path, inode, links[ino], hashes)
