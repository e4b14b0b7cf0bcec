"""Tests of fstree.tree (model, walk order, TreeBuilder, fingerprint) and fstree.listing."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import replace

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.listing import format_inode, listing, quote
from fleetlib.fstree.tree import (
    Inode,
    Kind,
    Tree,
    TreeBuilder,
    directory,
    regular,
    special,
    symlink,
)

T = 1_700_000_000_123_456_789


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def reg(data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = T,
        xattrs: tuple = ()) -> Inode:
    return regular(mode, uid, gid, mtime, len(data), sha(data), xattrs)


def sample_entries() -> list[tuple[str, Inode, str | None]]:
    """(path, inode, hard-link-to path) of a tree with every kind of inode."""
    return [
        ("/etc", directory(0o755, 0, 0), None),
        ("/etc/hostname", reg(b"golden\n", xattrs=((b"user.a", b"1"),)), None),
        ("/etc/empty", reg(b""), None),
        ("/usr", directory(0o755, 0, 0), None),
        ("/usr/bin", directory(0o755, 0, 0), None),
        ("/usr/bin/passwd", reg(b"\x7fELF passwd", mode=0o4755), None),
        ("/usr/bin/chfn", reg(b"\x7fELF passwd", mode=0o4755), "/usr/bin/passwd"),
        ("/usr/bin/vi", symlink(0, 0, b"vim.basic"), None),
        ("/bin", symlink(0, 0, b"usr/bin"), None),
        ("/dev", directory(0o755, 0, 0), None),
        ("/dev/null", special(Kind.CHAR_DEVICE, 0o666, 0, 0, T, os.makedev(1, 3)), None),
        ("/dev/initctl", special(Kind.FIFO, 0o600, 0, 0, T, 0), None),
        ("/var", directory(0o750, 1234, 1234), None),
        ("/var/db", reg(b"data" * 100, uid=1234, gid=1234), None),
        ("/caf\udce9", reg(b"latin-1 name"), None),
    ]


def build(entries: list[tuple[str, Inode, str | None]], order: list[int] | None = None,
          first_number: int = 2) -> Tree:
    """A tree from entries, added in `order` (indices), numbering from `first_number`."""
    builder = TreeBuilder()
    builder._next = first_number
    numbers: dict[str, int] = {}
    for index in order if order is not None else range(len(entries)):
        path, inode, link = entries[index]
        if link is not None:
            if link not in numbers:  # link target not added yet: add it first
                target = next(e for e in entries if e[0] == link)
                numbers[link] = builder.add(link, target[1])
            numbers[path] = builder.add(path, inode, numbers[link])
        elif path in numbers:
            continue  # added early as a link target
        else:
            numbers[path] = builder.add(path, inode)
    return builder.tree


# ---------------------------------------------------------------- walk, paths, lookup


def test_walk_orders_entries_by_name_bytes() -> None:
    builder = TreeBuilder()
    names = ["a", "caf\udce9", "\u20ac", "B", "\udc80", "caf\u00e9"]
    for name in names:
        builder.add("/" + name, reg(name.encode("utf-8", "surrogateescape")))
    walked = [path for path, _, _ in builder.tree.walk()]
    # b"B" < b"a" < b"caf\xc3\xa9" < b"caf\xe9" < b"\x80" < b"\xe2\x82\xac": raw bytes
    # order, which differs from str order (U+20AC sorts before the escape U+DC80).
    assert walked == ["/", "/B", "/a", "/caf\u00e9", "/caf\udce9", "/\udc80", "/\u20ac"]
    assert sorted(walked[1:]) != walked[1:]  # str order would differ
    assert [os.fsencode(p) for p in walked] == sorted(os.fsencode(p) for p in walked)


def test_walk_lists_each_directory_then_its_subdirectories() -> None:
    builder = TreeBuilder()
    for path in ("/b", "/a/y", "/a/x/deep", "/c/z"):
        builder.add(path, reg(path.encode()))
    walked = [path for path, _, _ in builder.tree.walk()]
    assert walked == ["/", "/a", "/b", "/c", "/a/x", "/a/y", "/a/x/deep", "/c/z"]
    seen: set[str] = set()
    for path in walked:  # every parent comes before its children
        if path != "/":
            assert (path.rpartition("/")[0] or "/") in seen
        seen.add(path)


def test_paths_and_lookup() -> None:
    tree = build(sample_entries())
    paths = tree.paths()
    assert set(paths) == {"/"} | {p for p, _, _ in sample_entries()}
    assert paths["/"] == tree.root
    assert tree.lookup("/") == tree.root
    assert tree.lookup("/usr/bin/passwd") == paths["/usr/bin/passwd"]
    assert tree.lookup("/usr/bin/") == paths["/usr/bin"]
    assert tree.lookup("/usr/bin/chfn") == tree.lookup("/usr/bin/passwd")
    assert tree.lookup("/usr/bin/missing") is None
    assert tree.lookup("/etc/hostname/x") is None  # through a file
    assert tree.lookup("/bin/passwd") is None  # symlinks are not followed
    assert tree.inodes[paths["/caf\udce9"]].hash == sha(b"latin-1 name")


def test_link_counts_object_sizes_total_bytes() -> None:
    tree = build(sample_entries())
    counts = tree.link_counts()
    paths = tree.paths()
    assert counts[paths["/usr/bin/passwd"]] == 2
    assert counts[paths["/etc/hostname"]] == 1
    assert counts[tree.root] == 1
    assert counts[paths["/usr"]] == 1
    sizes = tree.object_sizes()
    assert sizes == {
        sha(b"golden\n"): 7, sha(b"\x7fELF passwd"): 11, sha(b"data" * 100): 400,
        sha(b"latin-1 name"): 12,
    }
    assert b"" not in sizes  # the empty file needs no object
    assert tree.total_bytes() == 7 + 11 + 400 + 12  # the hard link counted once


def test_empty_tree() -> None:
    tree = Tree.empty()
    assert list(tree.walk()) == [("/", 1, directory(0o755, 0, 0))]
    assert tree.object_sizes() == {}
    assert Tree.empty().fingerprint() == tree.fingerprint()
    assert Tree.empty(directory(0o700, 0, 0)).fingerprint() != tree.fingerprint()


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_inode_numbering_and_insertion_order() -> None:
    entries = sample_entries()
    one = build(entries)
    two = build(entries, order=list(reversed(range(len(entries)))), first_number=1000)
    assert one.paths() != two.paths()  # numbers differ...
    assert one.fingerprint() == two.fingerprint()  # ...the trees do not
    renumbered = Tree(
        one.root * 7 + 3,
        {n * 7 + 3: i for n, i in one.inodes.items()},
        {n * 7 + 3: {name: c * 7 + 3 for name, c in kids.items()}
         for n, kids in one.children.items()},
    )
    assert renumbered.fingerprint() == one.fingerprint()
    assert len(one.fingerprint()) == 16


def _changed(path: str, change) -> list[tuple[str, Inode, str | None]]:
    return [(p, change(i) if p == path else i, link) for p, i, link in sample_entries()]


@pytest.mark.parametrize("variant", [
    "mode", "uid", "gid", "mtime", "xattr value", "xattr added", "hash", "size",
    "symlink target", "symlink owner", "rdev", "device kind", "directory mode",
    "directory owner", "hard link made a copy", "copy made a hard link", "renamed",
    "extra empty file", "root mode", "file made a directory",
])
def test_fingerprint_changes_with_every_field(variant: str) -> None:
    base = build(sample_entries()).fingerprint()
    entries = {
        "mode": _changed("/etc/hostname", lambda i: replace(i, mode=0o600)),
        "uid": _changed("/etc/hostname", lambda i: replace(i, uid=1)),
        "gid": _changed("/etc/hostname", lambda i: replace(i, gid=1)),
        "mtime": _changed("/etc/hostname", lambda i: replace(i, mtime_ns=i.mtime_ns + 1)),
        "xattr value": _changed("/etc/hostname",
                                lambda i: replace(i, xattrs=((b"user.a", b"2"),))),
        "xattr added": _changed("/var/db", lambda i: replace(i, xattrs=((b"user.a", b""),))),
        "hash": _changed("/var/db", lambda i: replace(i, hash=sha(b"atad" * 100))),
        "size": _changed("/var/db", lambda i: replace(i, size=401)),
        "symlink target": _changed("/bin", lambda i: replace(i, target=b"/usr/bin")),
        "symlink owner": _changed("/bin", lambda i: replace(i, uid=5)),
        "rdev": _changed("/dev/null", lambda i: replace(i, rdev=os.makedev(1, 5))),
        "device kind": _changed("/dev/null", lambda i: replace(i, kind=Kind.BLOCK_DEVICE)),
        "directory mode": _changed("/usr/bin", lambda i: replace(i, mode=0o700)),
        "directory owner": _changed("/var", lambda i: replace(i, uid=0)),
        "hard link made a copy": [(p, i, None) for p, i, _ in sample_entries()],
        "copy made a hard link": [
            *sample_entries(), ("/var/db2", reg(b"data" * 100, uid=1234, gid=1234), "/var/db")],
        "renamed": [(p.replace("/etc/empty", "/etc/empty2"), i, link)
                    for p, i, link in sample_entries()],
        "extra empty file": [*sample_entries(), ("/etc/zz", reg(b""), None)],
        "root mode": [("/", directory(0o700, 0, 0), None), *sample_entries()],
        "file made a directory": _changed("/etc/empty", lambda i: directory(0o644, 0, 0)),
    }[variant]
    assert build(entries).fingerprint() != base


def test_fingerprint_distinguishes_copy_from_hard_link_with_same_content() -> None:
    linked = TreeBuilder()
    number = linked.add("/a", reg(b"x"))
    linked.add("/b", reg(b"x"), number)
    copied = TreeBuilder()
    copied.add("/a", reg(b"x"))
    copied.add("/b", reg(b"x"))
    assert linked.tree.paths()["/a"] == linked.tree.paths()["/b"]
    assert linked.tree.fingerprint() != copied.tree.fingerprint()


# ---------------------------------------------------------------- TreeBuilder


def test_builder_makes_implicit_parents_and_keeps_them_on_later_entry() -> None:
    builder = TreeBuilder()
    builder.add("/a/b/c", reg(b"c"))
    tree = builder.tree
    for parent in ("/a", "/a/b"):
        inode = tree.inodes[tree.lookup(parent)]
        assert inode == directory(0o755, 0, 0)
    # the directory's own entry after its contents (as tar writes it) sets metadata only
    number = builder.add("/a", directory(0o700, 5, 6))
    assert number == tree.lookup("/a")
    assert tree.inodes[number] == directory(0o700, 5, 6)
    assert tree.lookup("/a/b/c") is not None


def test_builder_replaces_an_earlier_path() -> None:
    builder = TreeBuilder()
    first = builder.add("/x", reg(b"one"))
    second = builder.add("/x", reg(b"two"))
    tree = builder.tree
    assert first != second
    assert first not in tree.inodes
    assert tree.inodes[tree.lookup("/x")].hash == sha(b"two")
    # a directory replaced by a file takes its whole subtree with it
    builder.add("/d/e/f", reg(b"f"))
    sub = tree.lookup("/d/e")
    leaf = tree.lookup("/d/e/f")
    builder.add("/d", reg(b"now a file"))
    assert sub not in tree.inodes and leaf not in tree.inodes and sub not in tree.children
    assert [p for p, _, _ in tree.walk()] == ["/", "/d", "/x"]
    assert tree.object_sizes() == {sha(b"two"): 3, sha(b"now a file"): 10}


def test_builder_replacing_one_link_keeps_the_inode_for_the_other() -> None:
    builder = TreeBuilder()
    number = builder.add("/a", reg(b"shared"))
    assert builder.add("/b", reg(b"ignored"), number) == number
    builder.add("/a", reg(b"new"))
    tree = builder.tree
    assert tree.lookup("/b") == number
    assert tree.inodes[number].hash == sha(b"shared")
    assert tree.link_counts()[number] == 1


def test_builder_remove_drops_an_entry_and_what_only_it_named() -> None:
    builder = TreeBuilder()
    shared = builder.add("/d/a", reg(b"shared"))
    builder.add("/keep", reg(b"shared"), shared)
    builder.add("/d/e/f", reg(b"f"))
    tree = builder.tree
    sub, leaf = tree.lookup("/d/e"), tree.lookup("/d/e/f")
    builder.remove(tree.root, "d")  # the last entry of /d, /d/e, /d/e/f; not of /keep's
    assert [p for p, _, _ in tree.walk()] == ["/", "/keep"]
    assert tree.lookup("/keep") == shared and shared in tree.inodes
    assert sub not in tree.inodes and leaf not in tree.inodes and sub not in tree.children
    builder.remove(tree.root, "keep")
    assert tree.inodes.keys() == {tree.root} and tree.children == {tree.root: {}}
    # a path linked again to the inode it already names keeps one count
    again = builder.add("/x", reg(b"x"))
    builder.add("/x", tree.inodes[again], again)
    builder.remove(tree.root, "x")
    assert again not in tree.inodes


def test_builder_symlink_used_as_directory_raises() -> None:
    builder = TreeBuilder()
    builder.add("/lib", symlink(0, 0, b"usr/lib"))
    with pytest.raises(FleetError, match="/lib is a symlink"):
        builder.add("/lib/x.so", reg(b"x"))
    builder.add("/file", reg(b"f"))
    with pytest.raises(FleetError, match="/file is a regular"):
        builder.add("/file/a/b", reg(b"x"))


@pytest.mark.parametrize("path", ["/a/../b", "/a/./b", "/a/", "/..", "/a\0b"])
def test_builder_rejects_bad_names(path: str) -> None:
    with pytest.raises(FleetError):
        TreeBuilder().add(path, reg(b"x"))


def test_builder_root_must_be_a_directory() -> None:
    builder = TreeBuilder()
    with pytest.raises(FleetError):
        builder.add("/", reg(b"x"))
    builder.add("/", directory(0o700, 1, 2))
    assert builder.tree.inodes[builder.tree.root] == directory(0o700, 1, 2)


def test_inode_constructors_normalise_fields() -> None:
    assert directory(stat.S_IFDIR | 0o4755, 0, 0).mode == 0o4755
    assert regular(0o100644, 0, 0, T, 0, sha(b"x")).hash == b""  # empty: no hash
    assert symlink(1, 2, b"t").mode == 0o777
    assert special(Kind.FIFO, 0o644, 0, 0, T, os.makedev(1, 3)).rdev == 0
    assert special(Kind.CHAR_DEVICE, 0o644, 0, 0, T, os.makedev(1, 3)).rdev == os.makedev(1, 3)
    a, b = reg(b"x", mode=0o600), reg(b"x", mode=0o644)
    assert a.same_content(b) and not a.same_metadata(b)
    assert not reg(b"x").same_content(reg(b"y"))


# ---------------------------------------------------------------- listing


def test_listing_lines() -> None:
    tree = build(sample_entries())
    lines = {}
    for line in listing(tree):
        path = re.search(r" (/\S*)( -> .*| \[.*\])?$", line).group(1)
        lines[path] = line
    assert len(lines) == len(tree.paths())
    assert lines["/usr/bin/passwd"].startswith("-rwsr-xr-x 2 0 0 11 2023-11-14 22:13:20.123456789")
    assert lines["/dev/null"].startswith("crw-rw-rw- 1 0 0 1,3 ")
    assert lines["/dev/initctl"].startswith("prw------- 1 0 0 - ")
    assert lines["/bin"] == "lrwxrwxrwx 1 0 0 - - /bin -> usr/bin"
    assert lines["/var"] == "drwxr-x--- 1 1234 1234 - - /var"
    assert "/caf\\xe9" in lines
    hostname = next(line for line in listing(tree, hashes=True) if "/etc/hostname" in line)
    assert hostname.endswith("/etc/hostname [user.a] sha256:" + sha(b"golden\n").hex())


def test_quote() -> None:
    assert quote("/etc/caf\u00e9 x") == "/etc/caf\u00e9 x"
    assert quote("/a\nb") == "/a\\x0ab"
    assert quote("/caf\udce9") == "/caf\\xe9"
    assert quote("/back\\slash") == "/back\\\\slash"
    line = format_inode("/x", symlink(0, 0, b"\xff"), 1)
    assert line.endswith("/x -> \\xff")
