"""Dominator-compatible filters: which paths an image owns.

One regular expression per line, matched against the absolute path and
anchored at the start only (`re.match`), so `/etc/fstab` also matches
`/etc/fstab.bak`. A line that is exactly `!` inverts the filter. A matched
(filtered) path is left out of the image and never touched on a host. An
image with no filter at all (None, "sparse") owns every path it holds but
deletes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.tree import Inode, Kind, Tree, join

INVERT_LINE = "!"


def compile_patterns(lines: Iterable[tuple[str, str]]) -> tuple[re.Pattern[str], ...]:
    """Compile (where, regex) lines one by one, so each keeps its own flags and
    groups; FleetError naming `where` for a bad one."""
    patterns = []
    for where, line in lines:
        try:
            patterns.append(re.compile(line))
        except (re.error, RecursionError, OverflowError) as err:
            raise FleetError(f"{where}: invalid regex {line!r}: {err}") from None
    return tuple(patterns)


def match_any(patterns: tuple[re.Pattern[str], ...], path: str) -> bool:
    """Whether any pattern matches at the start of `path` (Dominator's anchoring)."""
    return any(pattern.match(path) for pattern in patterns)


@dataclass(frozen=True)
class Filter:
    """A compiled filter; `lines` are kept as written for storage and display."""

    lines: tuple[str, ...]
    inverted: bool
    _patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def from_lines(cls, lines: list[str] | tuple[str, ...], origin: str = "filter") -> Filter:
        """Compile filter lines; FleetError naming the line for a bad regex."""
        numbered = [(f"{origin} line {number}", raw.rstrip("\r\n"))
                    for number, raw in enumerate(lines, 1) if raw.strip()]
        patterns = compile_patterns(item for item in numbered if item[1] != INVERT_LINE)
        kept = tuple(line for _, line in numbered)
        return cls(kept, INVERT_LINE in kept, patterns)

    @classmethod
    def load(cls, path: Path) -> Filter:
        """Read a filter file (one regex per line)."""
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as err:
            raise FleetError(f"cannot read filter {path}: {err.strerror}") from None
        return cls.from_lines(text.splitlines(), origin=str(path))

    def matches(self, path: str) -> bool:
        """Whether `path` is filtered (not owned by the image)."""
        return match_any(self._patterns, path) != self.inverted


EMPTY = Filter.from_lines([])


def is_filtered(flt: Filter | None, path: str) -> bool:
    """Whether a path is outside the image's ownership (never for sparse images)."""
    return flt is not None and flt.matches(path)


def prune(tree: Tree, flt: Filter | None) -> Tree:
    """The tree without its filtered paths. A filtered directory stays, as a bare
    parent, only when it still holds paths the filter keeps; otherwise its whole
    subtree goes. Hard links among kept paths are preserved."""
    if flt is None or (not flt._patterns and not flt.inverted):
        return tree
    # Parents before children, then decided children first: no recursion, as a
    # hostile tree may nest deeper than Python's stack.
    order: list[tuple[str, int, int, str]] = []
    stack = [("/", tree.root, 0, "")]
    while stack:
        path, ino, parent, name = stack.pop()
        order.append((path, ino, parent, name))
        if tree.inodes[ino].kind == Kind.DIRECTORY:
            stack.extend((join(path, kid), child, ino, kid)
                         for kid, child in tree.children.get(ino, {}).items())
    inodes: dict[int, Inode] = {}
    children: dict[int, dict[str, int]] = {}
    for path, ino, parent, name in reversed(order):
        inode = tree.inodes[ino]
        kept_kids = children.get(ino, {})
        if path != "/" and flt.matches(path) and not kept_kids:
            children.pop(ino, None)
            continue
        inodes[ino] = inode
        if inode.kind == Kind.DIRECTORY:
            children[ino] = kept_kids
        if path != "/":
            children.setdefault(parent, {})[name] = ino
    return Tree(tree.root, inodes, children)
