"""The intrusion signal: the dominator knows every state it ever asked a host to
hold (images, and the computed files it rendered). A host path whose state
matches none of them was never desired: an intrusion. One that matches an
earlier desired state is merely outdated."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from fleetlib.fstree.diff import DiffEntry
from fleetlib.fstree.tree import Inode, Tree

# path -> every state once desired there (None: the path was desired absent)
DesiredBefore = Callable[[str], list[Inode | None]]


@dataclass
class Classification:
    """Paths that differ from the image, split by whether they were ever desired."""

    intrusion: list[str]
    outdated: list[str]


def same_state(held: Inode | None, desired: Inode | None) -> bool:
    """Whether a host's inode (or absence) is exactly a desired one."""
    if held is None or desired is None:
        return held is desired
    return held.same_content(desired) and held.same_metadata(desired)


def history(trees: list[Tree], computed: dict[str, dict[bytes, int]]) -> DesiredBefore:
    """Desired states at a path across earlier images and computed file versions
    (a computed path's states: its image inode with each content once rendered,
    `computed` mapping path -> {hash: size})."""
    def desired_before(path: str) -> list[Inode | None]:
        states: list[Inode | None] = []
        for tree in trees:
            ino = tree.lookup(path)
            inode = tree.inodes[ino] if ino is not None else None
            if inode is not None and path in computed:
                states.extend(replace(inode, hash=digest, size=size)
                              for digest, size in computed[path].items())
            else:
                states.append(inode)
        return states
    return desired_before


def classify(entries: Iterable[DiffEntry], desired_before: DesiredBefore) -> Classification:
    """Split the differing paths of a host into intrusion and outdated ones."""
    result = Classification([], [])
    for entry in entries:
        held = entry.old
        if any(same_state(held, desired) for desired in desired_before(entry.path)):
            result.outdated.append(entry.path)
        else:
            result.intrusion.append(entry.path)
    return result
