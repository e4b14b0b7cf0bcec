"""The diff of two trees under a filter: what to add, change and delete to turn
`old` (what a host holds) into `new` (its image), hard links preserved.

Paths are compared, never inode numbers. A path is `filtered` when the image
does not own it (its filter matches it, or the sub does not scan it): such paths
are never added, changed or deleted. A sparse image (filter None) deletes
nothing. A directory the image lacks is kept, not deleted, while it holds filtered
content (Dominator's Debian filter has `/var/lib/dhcp/.*`: a host's leases must
survive an image without /var/lib/dhcp); the diff lists such paths as `kept`.
Hard links: every path of a new inode but the first becomes a link to that first
path, and a path whose old link group differs from its new one is re-placed so
the groups come out exactly as in `new`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fleetlib.fstree.filter import Filter, is_filtered
from fleetlib.fstree.tree import Inode, Kind, Tree, split


class Change(enum.Enum):
    """What happens to one path; the value is its one-character mark in listings."""

    ADD = "+"        # nothing there yet: create it (or link it)
    REPLACE = "M"    # content, kind or link group differs: a new inode takes its place
    METADATA = "m"   # same content, other owner/mode/mtime/xattrs: change in place
    DELETE = "-"     # not in the image


@dataclass(frozen=True, slots=True)
class DiffEntry:
    """One path to change. `link_to` (ADD/REPLACE) names the earlier path of the same
    new inode: this path becomes a hard link to it instead of a new inode."""

    path: str
    change: Change
    old: Inode | None
    new: Inode | None
    link_to: str | None = None


@dataclass
class TreeDiff:
    """Every change, in walk order of the new tree, then deletions deepest first."""

    entries: list[DiffEntry] = field(default_factory=list)
    # Paths the image lacks that stay because filtered content lies below them.
    kept: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def of(self, *changes: Change) -> Iterator[DiffEntry]:
        """The entries of the given kinds."""
        return (e for e in self.entries if e.change in changes)

    def counts(self) -> dict[str, int]:
        """How many paths each kind of change touches."""
        counts = {c.name.lower(): 0 for c in Change}
        for entry in self.entries:
            counts[entry.change.name.lower()] += 1
        return counts

    def objects_needed(self) -> dict[bytes, int]:
        """Content the new inodes need (hash -> size); links need none."""
        return {e.new.hash: e.new.size for e in self.entries
                if e.new is not None and e.link_to is None and e.new.kind == Kind.REGULAR
                and e.new.size and e.change in (Change.ADD, Change.REPLACE)}

    def bytes_to_write(self) -> int:
        """Bytes of new file content the change writes (for the free-space check)."""
        return sum(e.new.size for e in self.entries
                   if e.new is not None and e.link_to is None and e.new.kind == Kind.REGULAR
                   and e.change in (Change.ADD, Change.REPLACE))


def _link_groups(paths: dict[str, int], tree: Tree) -> dict[str, tuple[str, ...]]:
    """For each path of a multiply linked regular inode, the sorted paths sharing it."""
    by_inode: dict[int, list[str]] = {}
    for path, ino in paths.items():
        if tree.inodes[ino].kind != Kind.DIRECTORY:
            by_inode.setdefault(ino, []).append(path)
    groups: dict[str, tuple[str, ...]] = {}
    for members in by_inode.values():
        if len(members) > 1:
            group = tuple(sorted(members))
            for path in members:
                groups[path] = group
    return groups


def diff_trees(old: Tree, new: Tree, flt: Filter | None,
               excluded: Callable[[str], bool] | None = None) -> TreeDiff:
    """What must change so that the owned paths of `old` equal those of `new`.

    `flt` is the image's filter (None: sparse, never delete); `excluded` adds
    paths the sub does not scan, which count as filtered too.
    """

    def filtered(path: str) -> bool:
        return path != "/" and (is_filtered(flt, path) or bool(excluded and excluded(path)))

    all_old = old.paths()
    old_paths = {p: i for p, i in all_old.items() if not filtered(p)}
    walk = list(new.walk())
    missing_parents: set[str] = set()  # filtered folders an owned path needs made
    for path, _, _ in walk:
        if not filtered(path):
            parent = split(path)[0]
            while parent != "/" and filtered(parent) and parent not in missing_parents:
                if parent not in all_old:
                    missing_parents.add(parent)
                parent = split(parent)[0]
    new_walk = [(p, i, n) for p, i, n in walk if not filtered(p) or p in missing_parents]
    new_paths = {p: i for p, i, _ in new_walk}
    old_groups = _link_groups(old_paths, old)
    new_groups = _link_groups(new_paths, new)
    first_path: dict[int, str] = {}
    result = TreeDiff()
    for path, ino, inode in new_walk:
        first = first_path.setdefault(ino, path)
        link_to = None if first == path else first
        old_ino = old_paths.get(path)
        if old_ino is None:
            result.entries.append(DiffEntry(path, Change.ADD, None, inode, link_to))
            continue
        old_inode = old.inodes[old_ino]
        if not old_inode.same_content(inode) or old_groups.get(path) != new_groups.get(path):
            result.entries.append(DiffEntry(path, Change.REPLACE, old_inode, inode, link_to))
        elif not old_inode.same_metadata(inode) and link_to is None:
            result.entries.append(DiffEntry(path, Change.METADATA, old_inode, inode))
    if flt is not None:
        gone = [p for p in old_paths if p not in new_paths]
        holders = _holders_of_filtered(gone, all_old, old_paths, filtered)
        result.kept = sorted(holders)
        deleted = [p for p in gone if p not in holders]
        deleted.sort(key=lambda p: (-p.count("/"), p))
        result.entries.extend(
            DiffEntry(p, Change.DELETE, old.inodes[old_paths[p]], None) for p in deleted)
    return result


def _holders_of_filtered(gone: list[str], all_old: dict[str, int], owned: dict[str, int],
                         filtered: Callable[[str], bool]) -> set[str]:
    """The paths of `gone` (owned, absent from the image) that must stay because
    filtered content lies below them: a filtered path the sub holds there, or a
    filter or scan exclusion that owns everything inside (`/var/log/.*` matches
    `/var/log/`), whose content the sub's tree may not even show. Their ancestors
    stay with them."""
    gone_set = set(gone)
    holders: set[str] = set()

    def hold(path: str) -> None:
        while path != "/" and path in gone_set and path not in holders:
            holders.add(path)
            path = split(path)[0]

    for path in all_old:
        if path not in owned:  # filtered: everything above it that would go, stays
            hold(split(path)[0])
    for path in gone:
        if path not in holders and filtered(path + "/"):
            hold(path)
    return holders


def too_many_deletes(diff: TreeDiff, inodes: int) -> bool:
    """The unsafe-update check: would the change delete more than half of a host's
    `inodes` (replacements count, since they delete the old inode first)?"""
    removed = sum(1 for e in diff.entries if e.change in (Change.DELETE, Change.REPLACE))
    return inodes > 0 and removed * 2 > inodes
