"""Tests of fstree.diff: unit cases, and a property test that applying a diff to a
real directory holding tree A yields exactly tree B."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetlib.fstree.diff import Change, TreeDiff, diff_trees
from fleetlib.fstree.filter import EMPTY, Filter, prune
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.scan import scan_directory
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
from fleetlib.fstree.unpack import apply_metadata, make_node, unpack_tree

T = 1_600_000_000_000_000_000


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def reg(data: bytes, mode: int = 0o644, uid: int = 0, mtime: int = T,
        xattrs: tuple = ()) -> Inode:
    return regular(mode, uid, uid, mtime, len(data), sha(data), xattrs)


def tree_of(spec: dict[str, Inode | str]) -> Tree:
    """A tree from {path: inode or path-of-an-earlier-entry-to-hard-link}."""
    builder = TreeBuilder()
    numbers: dict[str, int] = {}
    for path, what in spec.items():
        if isinstance(what, str):
            numbers[path] = builder.add(path, builder.tree.inodes[numbers[what]],
                                        numbers[what])
        else:
            numbers[path] = builder.add(path, what)
    return builder.tree


def changes(diff: TreeDiff) -> list[tuple[str, str, str | None]]:
    return [(e.path, e.change.value, e.link_to) for e in diff.entries]


BASE = {
    "/etc": directory(0o755, 0, 0),
    "/etc/passwd": reg(b"root:x:0:0\n"),
    "/etc/motd": reg(b"hello\n"),
    "/bin": symlink(0, 0, b"usr/bin"),
    "/dev/null": special(Kind.CHAR_DEVICE, 0o666, 0, 0, T, os.makedev(1, 3)),
    "/var/lib/db": reg(b"db" * 1000, uid=1234),
}


# ---------------------------------------------------------------- unit cases


def test_identical_trees_have_an_empty_diff() -> None:
    tree = tree_of(BASE)
    diff = diff_trees(tree, tree_of(BASE), EMPTY)
    assert not diff
    assert diff.entries == []
    assert diff.objects_needed() == {} and diff.bytes_to_write() == 0
    assert diff.counts() == {"add": 0, "replace": 0, "metadata": 0, "delete": 0}
    assert not diff_trees(tree, tree, None)


def test_add_replace_metadata_delete() -> None:
    old = tree_of(BASE)
    new_spec = dict(BASE)
    new_spec["/etc/motd"] = reg(b"changed\n")  # content
    new_spec["/etc/passwd"] = reg(b"root:x:0:0\n", mode=0o600)  # metadata only
    new_spec["/bin"] = symlink(0, 0, b"/usr/bin")  # symlink target
    new_spec["/dev/null"] = special(Kind.CHAR_DEVICE, 0o666, 0, 0, T, os.makedev(1, 5))
    new_spec["/etc/new"] = reg(b"new file")
    del new_spec["/var/lib/db"]
    new = tree_of(new_spec)
    diff = diff_trees(old, new, EMPTY)
    assert sorted(changes(diff)) == sorted([
        ("/bin", "M", None), ("/dev/null", "M", None), ("/etc/motd", "M", None),
        ("/etc/new", "+", None), ("/etc/passwd", "m", None), ("/var/lib/db", "-", None),
        ("/var/lib", "-", None), ("/var", "-", None),
    ])
    assert diff.counts() == {"add": 1, "replace": 3, "metadata": 1, "delete": 3}
    assert diff.objects_needed() == {sha(b"changed\n"): 8, sha(b"new file"): 8}
    assert diff.bytes_to_write() == 16
    motd = next(diff.of(Change.REPLACE))
    assert motd.old is not None and motd.new is not None
    assert [e.path for e in diff.of(Change.METADATA)] == ["/etc/passwd"]
    deleted = next(diff.of(Change.DELETE))
    assert deleted.new is None and deleted.old == reg(b"db" * 1000, uid=1234)


@pytest.mark.parametrize("change", [
    lambda i: reg(b"hello\n", mode=0o4755),
    lambda i: reg(b"hello\n", uid=7),
    lambda i: reg(b"hello\n", mtime=T + 1),
    lambda i: reg(b"hello\n", xattrs=((b"user.x", b"1"),)),
])
def test_metadata_changes(change) -> None:
    new_spec = dict(BASE)
    new_spec["/etc/motd"] = change(BASE["/etc/motd"])
    assert changes(diff_trees(tree_of(BASE), tree_of(new_spec), EMPTY)) == \
        [("/etc/motd", "m", None)]


def test_directory_and_symlink_metadata() -> None:
    new_spec = dict(BASE)
    new_spec["/etc"] = directory(0o700, 0, 0)
    new_spec["/bin"] = symlink(5, 5, b"usr/bin")
    assert sorted(changes(diff_trees(tree_of(BASE), tree_of(new_spec), EMPTY))) == \
        [("/bin", "m", None), ("/etc", "m", None)]
    root_changed = tree_of(BASE)
    root_changed.inodes[root_changed.root] = directory(0o700, 0, 0)
    assert changes(diff_trees(tree_of(BASE), root_changed, EMPTY)) == [("/", "m", None)]


def test_adds_come_in_walk_order_parents_first() -> None:
    new = tree_of({**BASE, "/opt/app/bin/tool": reg(b"tool"), "/opt/app/lib/x": reg(b"x")})
    diff = diff_trees(tree_of(BASE), new, EMPTY)
    added = [e.path for e in diff.of(Change.ADD)]
    assert set(added) == {"/opt", "/opt/app", "/opt/app/bin", "/opt/app/lib",
                          "/opt/app/bin/tool", "/opt/app/lib/x"}
    for path in added:
        parent = path.rpartition("/")[0]
        if parent and parent in added:
            assert added.index(parent) < added.index(path)


def test_deletes_deepest_first() -> None:
    old = tree_of({**BASE, "/d/e/f/g": reg(b"g"), "/d/e/h": reg(b"h"), "/z": reg(b"z")})
    diff = diff_trees(old, tree_of(BASE), EMPTY)
    deleted = [e.path for e in diff.entries]
    assert all(e.change == Change.DELETE for e in diff.entries)
    assert set(deleted) == {"/d", "/d/e", "/d/e/f", "/d/e/f/g", "/d/e/h", "/z"}
    for index, path in enumerate(deleted):  # every descendant before its ancestor
        for later in deleted[index + 1:]:
            assert not later.startswith(path + "/")
    assert deleted[0] == "/d/e/f/g"


def test_kind_change_file_to_directory_and_back() -> None:
    old = tree_of({**BASE, "/x": reg(b"file")})
    new = tree_of({**BASE, "/x/y": reg(b"y")})
    assert changes(diff_trees(old, new, EMPTY)) == [("/x", "M", None), ("/x/y", "+", None)]
    assert changes(diff_trees(new, old, EMPTY)) == [("/x", "M", None), ("/x/y", "-", None)]
    fifo = tree_of({**BASE, "/x": special(Kind.FIFO, 0o644, 0, 0, T, 0)})
    assert changes(diff_trees(old, fifo, EMPTY)) == [("/x", "M", None)]


def test_sparse_never_deletes() -> None:
    old = tree_of({**BASE, "/extra/file": reg(b"extra")})
    new_spec = {**BASE, "/etc/motd": reg(b"changed"), "/etc/added": reg(b"a")}
    del new_spec["/etc/passwd"]
    diff = diff_trees(old, tree_of(new_spec), None)
    assert sorted(changes(diff)) == [("/etc/added", "+", None), ("/etc/motd", "M", None)]
    assert not list(diff.of(Change.DELETE))


def test_filtered_paths_never_appear() -> None:
    flt = Filter.from_lines(["/etc/motd", "/var/lib/", "/tmp"])
    old = tree_of({**BASE, "/etc/motd.bak": reg(b"bak"), "/var/lib/cache": reg(b"c")})
    new_spec = {**BASE, "/etc/motd": reg(b"other"), "/var/lib/db": reg(b"new db"),
                "/var/lib/extra": reg(b"extra"), "/etc/passwd": reg(b"new passwd")}
    diff = diff_trees(old, tree_of(new_spec), flt)
    assert changes(diff) == [("/etc/passwd", "M", None)]
    # the same the other way round: filtered paths are not deleted either
    diff = diff_trees(tree_of(new_spec), old, flt)
    assert changes(diff) == [("/etc/passwd", "M", None)]


def test_filtered_parent_of_kept_path_is_added_when_missing() -> None:
    flt = Filter.from_lines(["!", "/opt/app/"])
    new = prune(tree_of({"/opt/app/bin": reg(b"app"), "/usr/x": reg(b"x")}), flt)
    diff = diff_trees(Tree.empty(), new, flt)
    assert changes(diff) == [("/opt", "+", None), ("/opt/app", "+", None),
                             ("/opt/app/bin", "+", None)]


def test_filtered_parent_present_on_host_is_not_touched() -> None:
    flt = Filter.from_lines(["/etc$"])
    old = tree_of({"/etc": directory(0o755, 0, 0), "/etc/passwd": reg(b"p")})
    new = tree_of({"/etc": directory(0o700, 0, 0), "/etc/passwd": reg(b"p")})
    assert changes(diff_trees(old, new, flt)) == []


def test_filtered_directory_with_nothing_kept_is_not_added() -> None:
    flt = Filter.from_lines(["/tmp"])
    new = tree_of({"/tmp/x": reg(b"x"), "/etc/a": reg(b"a")})
    assert changes(diff_trees(Tree.empty(), new, flt)) == [("/etc", "+", None),
                                                          ("/etc/a", "+", None)]


def test_excluded_directory_in_image_is_not_added() -> None:
    def excluded(path: str) -> bool:
        return path.startswith("/var/log/")

    old = tree_of({"/var/log": directory(0o755, 0, 0)})  # /var/log/apt exists, not scanned
    new = tree_of({"/var/log/apt": directory(0o755, 0, 0)})
    assert changes(diff_trees(old, new, EMPTY, excluded)) == []


def test_directory_holding_filtered_content_is_kept_not_deleted() -> None:
    """Dominator's Debian filter: leases under a /var/lib/dhcp the image lacks stay,
    with /var/lib/dhcp itself, and everything else still converges."""
    flt = Filter.from_lines([r"/var/lib/dhcp/.*", r"/etc/udev/rules[.]d/.*"])
    old = tree_of({**BASE, "/var/lib/dhcp": directory(0o755, 0, 0),
                   "/var/lib/dhcp/dhclient.leases": reg(b"lease"),
                   "/etc/udev/rules.d/70-net.rules": reg(b"rule"),
                   "/srv/old": directory(0o755, 0, 0), "/srv/old/file": reg(b"gone")})
    new = tree_of({**BASE, "/etc/motd": reg(b"motd2")})
    diff = diff_trees(old, new, flt)
    assert changes(diff) == [("/etc/motd", "M", None), ("/srv/old/file", "-", None),
                             ("/srv/old", "-", None), ("/srv", "-", None)]
    assert diff.kept == ["/etc/udev", "/etc/udev/rules.d", "/var/lib/dhcp"]


def test_directory_whose_content_is_all_excluded_is_kept() -> None:
    """An exclusion like `/var/log/.*` owns whatever is inside, though the sub's tree
    shows none of it: the directory is kept, its parent too."""
    def excluded(path: str) -> bool:
        return path.startswith("/var/log/")

    old = tree_of({**BASE, "/var/log": directory(0o755, 0, 0)})
    diff = diff_trees(old, tree_of(BASE), EMPTY, excluded)
    assert changes(diff) == []
    assert diff.kept == ["/var/log"]


def test_excluded_callable_protects_paths() -> None:
    def excluded(path: str) -> bool:
        return path.startswith("/var/lib/")

    old = tree_of({**BASE, "/var/lib/state": reg(b"host state")})
    new = tree_of({**BASE, "/var/lib/db": reg(b"other db"), "/var/lib/new": reg(b"n"),
                   "/etc/motd": reg(b"motd2")})
    for flt in (EMPTY, None, Filter.from_lines(["/nothing"])):
        diff = diff_trees(old, new, flt, excluded)
        assert changes(diff) == [("/etc/motd", "M", None)]


def test_hard_links_new_group_links_to_first_path() -> None:
    new = tree_of({"/a": reg(b"shared", mode=0o755), "/b": "/a", "/c/d": "/a",
                   "/e": reg(b""), "/f": reg(b"")})
    diff = diff_trees(Tree.empty(), new, EMPTY)
    assert changes(diff) == [("/a", "+", None), ("/b", "+", "/a"), ("/c", "+", None),
                             ("/e", "+", None), ("/f", "+", None), ("/c/d", "+", "/a")]
    assert diff.objects_needed() == {sha(b"shared"): 6}  # once; links and empty need none
    assert diff.bytes_to_write() == 6


def test_hard_links_breaking_a_group_replaces() -> None:
    linked = tree_of({"/a": reg(b"same"), "/b": "/a"})
    copies = tree_of({"/a": reg(b"same"), "/b": reg(b"same")})
    diff = diff_trees(linked, copies, EMPTY)
    assert changes(diff) == [("/a", "M", None), ("/b", "M", None)]
    assert diff.objects_needed() == {sha(b"same"): 4}
    assert diff.bytes_to_write() == 8  # two inodes now
    # and joining copies into a group
    diff = diff_trees(copies, linked, EMPTY)
    assert changes(diff) == [("/a", "M", None), ("/b", "M", "/a")]
    assert diff.bytes_to_write() == 4


def test_hard_links_group_shrinks() -> None:
    old = tree_of({"/a": reg(b"x"), "/b": "/a", "/c": "/a"})
    new = tree_of({"/a": reg(b"x"), "/b": "/a"})
    diff = diff_trees(old, new, EMPTY)
    # the remaining group is re-placed (documented), the dropped link deleted
    assert changes(diff) == [("/a", "M", None), ("/b", "M", "/a"), ("/c", "-", None)]
    assert diff.objects_needed() == {sha(b"x"): 1}


def test_metadata_change_on_linked_inode_listed_once() -> None:
    old = tree_of({"/a": reg(b"x"), "/b": "/a", "/c": "/a"})
    new = tree_of({"/a": reg(b"x", mode=0o600), "/b": "/a", "/c": "/a"})
    assert changes(diff_trees(old, new, EMPTY)) == [("/a", "m", None)]


def test_unchanged_linked_group_is_not_touched() -> None:
    spec = {"/a": reg(b"x"), "/d/b": "/a", "/d/e": reg(b"y")}
    assert not diff_trees(tree_of(spec), tree_of(spec), EMPTY)


# ---------------------------------------------------------------- property


CONTENTS = [b"", b"alpha\n", b"beta" * 300, bytes(range(256))]
MTIMES = [1_000_000_000_000_000_000, 1_500_000_000_123_456_789]
XATTRS = [(), ((b"user.tag", b"v1"),), ((b"user.tag", b"v2"), (b"user.z", b""))]

reg_spec = st.tuples(st.just("reg"), st.integers(0, len(CONTENTS) - 1),
                     st.sampled_from([0o644, 0o600, 0o4755]), st.sampled_from([0, 1234]),
                     st.sampled_from(MTIMES), st.integers(0, len(XATTRS) - 1))
leaf_spec = st.one_of(
    reg_spec,
    st.tuples(st.just("sym"), st.sampled_from([b"a", b"../x", b"/etc/passwd"]),
              st.sampled_from([0, 1234])),
    st.tuples(st.just("fifo"), st.sampled_from([0o644, 0o600])),
    st.tuples(st.just("chr"), st.sampled_from([os.makedev(1, 3), os.makedev(1, 5)])),
    st.tuples(st.just("link"), st.integers(0, 1)),
    st.tuples(st.just("link"), st.integers(0, 1)),  # twice: hard links are the hard part
)
dir_spec = st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700]), st.sampled_from([0, 1234]),
                     st.dictionaries(st.sampled_from(["x", "y", "z"]), leaf_spec, max_size=3))
tree_spec = st.tuples(
    st.sampled_from([0o755, 0o711]),
    st.lists(reg_spec, min_size=2, max_size=2),  # the two shared (hard linked) inodes
    st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.one_of(leaf_spec, dir_spec),
                    max_size=4),
)


def _leaf(spec: tuple) -> Inode:
    kind = spec[0]
    if kind == "reg":
        _, content, mode, uid, mtime, xattrs = spec
        data = CONTENTS[content]
        return regular(mode, uid, uid, mtime, len(data), sha(data), XATTRS[xattrs])
    if kind == "sym":
        return symlink(spec[2], spec[2], spec[1])
    if kind == "fifo":
        return special(Kind.FIFO, spec[1], 0, 0, MTIMES[0], 0)
    return special(Kind.CHAR_DEVICE, 0o600, 0, 0, MTIMES[1], spec[1])


def build_spec(spec: tuple) -> Tree:
    root_mode, shared, top = spec
    builder = TreeBuilder(directory(root_mode, 0, 0))
    numbers: dict[int, int] = {}

    def add(path: str, leaf: tuple) -> None:
        if leaf[0] == "link":
            index = leaf[1]
            if index in numbers:
                builder.add(path, _leaf(shared[index]), numbers[index])
            else:
                numbers[index] = builder.add(path, _leaf(shared[index]))
        else:
            builder.add(path, _leaf(leaf))

    for name, item in sorted(top.items()):
        if item[0] == "dir":
            builder.add("/" + name, directory(item[1], item[2], item[2]))
            for child, leaf in sorted(item[3].items()):
                add(f"/{name}/{child}", leaf)
        else:
            add("/" + name, item)
    return builder.tree


def _remove(real: str) -> None:
    if os.path.isdir(real) and not os.path.islink(real):
        shutil.rmtree(real)
    elif os.path.lexists(real):
        os.unlink(real)


def apply_diff(root: str, diff: TreeDiff) -> None:
    """A minimal test-only applier of a diff to the directory `root`."""
    by_hash = {sha(c): c for c in CONTENTS}

    def real(path: str) -> str:
        return root + path if path != "/" else root

    for entry in diff.entries:
        path = real(entry.path)
        if entry.change == Change.DELETE:
            _remove(path)
            continue
        new = entry.new
        assert new is not None
        if entry.change == Change.METADATA:
            apply_metadata(path, new)
            continue
        if entry.change == Change.REPLACE:
            _remove(path)
        assert not os.path.lexists(path), f"{entry.path} still there"
        if entry.link_to is not None:
            os.link(real(entry.link_to), path, follow_symlinks=False)
            continue
        if new.kind == Kind.REGULAR:
            with open(path, "wb") as f:
                f.write(by_hash[new.hash] if new.size else b"")
        else:
            make_node(path, new)
        assert apply_metadata(path, new) == []


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")


@needs_root
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(a=tree_spec, b=tree_spec, mix=st.booleans())
def test_applying_the_diff_yields_the_new_tree(tmp_path: Path, a: tuple, b: tuple,
                                               mix: bool) -> None:
    if mix:  # B mostly like A: fewer, subtler changes
        b = (b[0], [a[1][0], b[1][1]], {**a[2], **b[2]})
    old, new = build_spec(a), build_spec(b)
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        store = ObjectStore(Path(work) / "store")
        for data in CONTENTS:
            if data:
                store.add_bytes(data)
        dest = Path(work) / "root"
        dest.mkdir()
        assert unpack_tree(old, dest, store) == []
        assert scan_directory(dest).fingerprint() == old.fingerprint()
        diff = diff_trees(old, new, EMPTY)
        assert bool(diff) == (old.fingerprint() != new.fingerprint())
        apply_diff(os.fspath(dest), diff)
        assert scan_directory(dest).fingerprint() == new.fingerprint()
        assert not diff_trees(new, scan_directory(dest), EMPTY)


@settings(max_examples=300, deadline=None)
@given(a=tree_spec, b=tree_spec, mix=st.booleans())
def test_diff_empty_iff_same_fingerprint(a: tuple, b: tuple, mix: bool) -> None:
    if mix:
        b = (a[0], a[1], {**a[2], **b[2]})
    old, new = build_spec(a), build_spec(b)
    assert not diff_trees(old, old, EMPTY)
    assert not diff_trees(old, build_spec(a), None)
    diff = diff_trees(old, new, EMPTY)
    assert bool(diff) == (old.fingerprint() != new.fingerprint())
    paths = [e.path for e in diff.entries]
    assert len(paths) == len(set(paths))  # each path once
    assert set(diff.objects_needed()) <= set(new.object_sizes())
    sparse = diff_trees(old, new, None)
    assert [e for e in diff.entries if e.change != Change.DELETE] == sparse.entries
