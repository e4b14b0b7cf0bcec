"""Turning "this host holds tree T, it must hold image I" into an update plan, and
describing a plan for people (`sub diff`, dry runs). Used by `sub push-image`
now and by the herd later, so both decide exactly alike."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from fleetlib.errors import FleetError
from fleetlib.fstree.diff import Change, DiffEntry, diff_trees, too_many_deletes
from fleetlib.fstree.exclusions import excluder
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import Inode, Tree, Xattrs
from fleetlib.fstree.triggers import fired
from subd.changes import UpdatePlan


@dataclass
class PlanSummary:
    """What an update would do to one host, for people and for --json."""

    added: int
    replaced: int
    metadata: int
    deleted: int
    objects_to_fetch: int
    bytes_to_fetch: int
    bytes_to_write: int
    triggers: list[str]
    unsafe: bool
    kept: int = 0  # directories the image lacks, kept because they hold filtered content

    def to_json(self) -> dict[str, object]:
        """Plain data for --json output."""
        return dict(self.__dict__)


def computed_paths(image: Image) -> Callable[[str], bool]:
    """Paths rendered per host by the dominator; a direct push leaves them alone."""
    paths = {c.path for c in image.computed_files}
    return lambda path: path in paths


def with_computed_files(tree: Tree, files: dict[str, bytes]) -> Tree:
    """The image tree as one host must hold it: each computed path's inode carries
    that host's rendered content (owner and mode stay the image's)."""
    if not files:
        return tree
    inodes = dict(tree.inodes)
    for path, data in files.items():
        ino = tree.lookup(path)
        if ino is None:
            raise FleetError(f"computed file {path} is not in the image")
        inodes[ino] = replace(inodes[ino], size=len(data),
                              hash=hashlib.sha256(data).digest() if data else b"")
    return Tree(tree.root, inodes, tree.children)


def plan_update(sub_tree: Tree, image: Image, exclusions: list[str],
                old_image: Image | None = None, disable_safety_check: bool = False,
                disruption_permitted: bool = False,
                computed: dict[str, bytes] | None = None) -> UpdatePlan:
    """The update that makes `sub_tree` hold `image` on a sub with these scan
    exclusions (which count as filtered, as does subd's own state). With
    `computed` (rendered files) those paths get this host's content, carried in
    the update itself; without, a direct push leaves computed paths alone."""
    scan_excluded = excluder(exclusions)
    left_alone = computed_paths(image) if computed is None else (lambda path: False)

    def excluded(path: str) -> bool:
        return scan_excluded(path) or left_alone(path)

    target = image.tree if computed is None else with_computed_files(image.tree, computed)
    diff = diff_trees(sub_tree, target, image.filter, excluded=excluded)
    needed = diff.objects_needed()
    inline = [data for data in (computed or {}).values()
              if data and hashlib.sha256(data).digest() in needed]
    return UpdatePlan(image.name, diff, image.filter, list(image.triggers),
                      list(old_image.triggers) if old_image is not None else [],
                      disable_safety_check, disruption_permitted, inline)


def objects_to_fetch(plan: UpdatePlan) -> dict[bytes, int]:
    """What the sub must fetch from the image server: the plan's new content
    except what travels inline (computed files)."""
    inline = {hashlib.sha256(data).digest() for data in plan.inline_objects}
    return {h: s for h, s in plan.diff.objects_needed().items() if h not in inline}


def summarize(plan: UpdatePlan, sub_tree: Tree, cached: Callable[[bytes], bool] | None = None
              ) -> PlanSummary:
    """Counts, bytes and triggers of a plan; `cached` tells objects the sub already has."""
    counts = plan.diff.counts()
    needed = objects_to_fetch(plan)
    to_fetch = {h: s for h, s in needed.items() if cached is None or not cached(h)}
    changed = [e.path for e in plan.diff.entries]
    names = [t.service for t in fired([*plan.triggers, *plan.old_triggers], changed)]
    return PlanSummary(
        added=counts["add"], replaced=counts["replace"], metadata=counts["metadata"],
        deleted=counts["delete"], objects_to_fetch=len(to_fetch),
        bytes_to_fetch=sum(to_fetch.values()), bytes_to_write=plan.diff.bytes_to_write(),
        triggers=sorted(set(names)),
        unsafe=too_many_deletes(plan.diff, len(sub_tree.inodes)), kept=len(plan.diff.kept))


def describe_entries(plan: UpdatePlan) -> list[str]:
    """One line per change, like `image diff`: `+ path`, `M path`, `m path`, `- path`."""
    lines = []
    for entry in plan.diff.entries:
        suffix = f" (link to {entry.link_to})" if entry.link_to else ""
        lines.append(f"{entry.change.value} {entry.path}{suffix}")
    return lines



def _user_xattrs(inode: Inode) -> Xattrs:
    return tuple(x for x in inode.xattrs if x[0].startswith(b"user."))


def unreachable_for(is_root: bool) -> Callable[[DiffEntry], bool]:
    """Which remaining differences a sub cannot fix: when subd is not root, owners
    and privileged extended attributes (file capabilities: security.*, trusted.*)."""
    def privileged_only(entry: DiffEntry) -> bool:
        old, new = entry.old, entry.new
        return (not is_root and entry.change == Change.METADATA and old is not None
                and new is not None and old.mode == new.mode
                and old.mtime_ns == new.mtime_ns and _user_xattrs(old) == _user_xattrs(new))
    return privileged_only
