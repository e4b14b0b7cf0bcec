"""Turning "this host holds tree T, it must hold image I" into an update plan, and
describing a plan for people (`sub diff`, dry runs). Used by `sub push-image`
now and by the herd later, so both decide exactly alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fstree.diff import Change, DiffEntry, diff_trees, too_many_deletes
from fstree.image import Image
from fstree.tree import Inode, Tree
from fstree.triggers import fired
from subd.changes import UpdatePlan
from subd.scanner import excluder


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

    def to_json(self) -> dict:
        """Plain data for --json output."""
        return dict(self.__dict__)


def computed_paths(image: Image) -> Callable[[str], bool]:
    """Paths rendered per host by the dominator; a direct push leaves them alone."""
    paths = {c.path for c in image.computed_files}
    return lambda path: path in paths


def plan_update(sub_tree: Tree, image: Image, exclusions: list[str],
                old_image: Image | None = None, disable_safety_check: bool = False,
                disruption_permitted: bool = False) -> UpdatePlan:
    """The update that makes `sub_tree` hold `image` on a sub with these scan
    exclusions (which count as filtered, as does subd's own state)."""
    scan_excluded = excluder(exclusions)
    is_computed = computed_paths(image)
    diff = diff_trees(sub_tree, image.tree, image.filter,
                      excluded=lambda path: scan_excluded(path) or is_computed(path))
    return UpdatePlan(image.name, diff, image.filter, list(image.triggers),
                      list(old_image.triggers) if old_image is not None else [],
                      disable_safety_check, disruption_permitted)


def summarize(plan: UpdatePlan, sub_tree: Tree, cached: Callable[[bytes], bool] | None = None
              ) -> PlanSummary:
    """Counts, bytes and triggers of a plan; `cached` tells objects the sub already has."""
    counts = plan.diff.counts()
    needed = plan.diff.objects_needed()
    to_fetch = {h: s for h, s in needed.items() if cached is None or not cached(h)}
    changed = [e.path for e in plan.diff.entries]
    names = [t.service for t in fired([*plan.triggers, *plan.old_triggers], changed)]
    return PlanSummary(
        added=counts["add"], replaced=counts["replace"], metadata=counts["metadata"],
        deleted=counts["delete"], objects_to_fetch=len(to_fetch),
        bytes_to_fetch=sum(to_fetch.values()), bytes_to_write=plan.diff.bytes_to_write(),
        triggers=sorted(set(names)),
        unsafe=too_many_deletes(plan.diff, len(sub_tree.inodes)))


def describe_entries(plan: UpdatePlan) -> list[str]:
    """One line per change, like `image diff`: `+ path`, `M path`, `m path`, `- path`."""
    lines = []
    for entry in plan.diff.entries:
        suffix = f" (link to {entry.link_to})" if entry.link_to else ""
        lines.append(f"{entry.change.value} {entry.path}{suffix}")
    return lines



def _user_xattrs(inode: Inode) -> tuple:
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
