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
from dataclasses import dataclass
from pathlib import Path

from fstree.errors import FleetError
from fstree.tree import Kind, Tree, join

INVERT_LINE = "!"


@dataclass(frozen=True)
class Filter:
    """A compiled filter; `lines` are kept as written for storage and display."""

    lines: tuple[str, ...]
    inverted: bool
    _regex: re.Pattern[str] | None

    @classmethod
    def from_lines(cls, lines: list[str] | tuple[str, ...], origin: str = "filter") -> Filter:
        """Compile filter lines; FleetError naming the line for a bad regex."""
        kept: list[str] = []
        inverted = False
        for number, raw in enumerate(lines, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line == INVERT_LINE:
                inverted = True
            kept.append(line)
            if line != INVERT_LINE:
                try:
                    re.compile(line)
                except re.error as err:
                    raise FleetError(f"{origin} line {number}: invalid regex {line!r}: {err}") \
                        from None
        patterns = [line for line in kept if line != INVERT_LINE]
        regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        return cls(tuple(kept), inverted, regex)

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
        hit = self._regex is not None and self._regex.match(path) is not None
        return hit != self.inverted


EMPTY = Filter.from_lines([])


def is_filtered(flt: Filter | None, path: str) -> bool:
    """Whether a path is outside the image's ownership (never for sparse images)."""
    return flt is not None and flt.matches(path)


def prune(tree: Tree, flt: Filter | None) -> Tree:
    """The tree without its filtered paths. A filtered directory stays, as a bare
    parent, only when it still holds paths the filter keeps; otherwise its whole
    subtree goes. Hard links among kept paths are preserved."""
    if flt is None or (flt._regex is None and not flt.inverted):
        return tree
    inodes: dict = {}
    children: dict[int, dict[str, int]] = {}

    def keep(path: str, ino: int) -> bool:
        inode = tree.inodes[ino]
        kept_kids: dict[str, int] = {}
        if inode.kind == Kind.DIRECTORY:
            for name, child in tree.children.get(ino, {}).items():
                if keep(join(path, name), child):
                    kept_kids[name] = child
        if path != "/" and flt.matches(path) and not kept_kids:
            return False
        inodes[ino] = inode
        if inode.kind == Kind.DIRECTORY:
            children[ino] = kept_kids
        return True

    keep("/", tree.root)
    return Tree(tree.root, inodes, children)
