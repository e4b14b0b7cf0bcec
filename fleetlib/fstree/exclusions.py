"""Paths a sub never scans: its private ROOT/.subd and the scan-exclusion list
(start-anchored regexes, like filter lines). subd leaves them out of its tree, and
the dominator treats them as filtered for that sub, so a diff never touches them."""

from __future__ import annotations

from fleetlib.fstree.filter import Filter

SUBD_DIR = ".subd"
DEFAULT_EXCLUSIONS = [
    r"/tmp/.*", r"/var/tmp/.*", r"/var/log/.*", r"/home/.*", r"/data/.*",
    r"/var/mail/.*", r"/var/spool/.*",
]
_SUBD_PATH = "/" + SUBD_DIR
_SUBD_INSIDE = _SUBD_PATH + "/"
_REGEX_SPECIAL = frozenset("\\.^$*+?{}[]|()")


def literal_prefix(pattern: str) -> str:
    """Text that every start-anchored match of `pattern` begins with ("" when the
    regex is too clever to tell), so most paths skip the regex engine."""
    if "|" in pattern:
        return ""
    end = 0
    while end < len(pattern) and pattern[end] not in _REGEX_SPECIAL:
        end += 1
    if end < len(pattern) and pattern[end] in "*?{":  # the last letter is optional
        end -= 1
    return pattern[:end]


class Excluder:
    """Whether a sub with these scan exclusions leaves a path unscanned (call it with
    the path): ROOT/.subd and whatever an exclusion regex matches (start-anchored,
    like filter lines). The dominator treats such paths as filtered. FleetError for
    a bad regex."""

    def __init__(self, exclusions: list[str]) -> None:
        self._filter = Filter.from_lines(exclusions, "scan exclusions")
        if self._filter.inverted:
            self._prefixes: tuple[str, ...] = ("",)
        else:
            self._prefixes = (_SUBD_PATH, *{literal_prefix(line) for line in self._filter.lines})

    def __call__(self, path: str) -> bool:
        return path.startswith(self._prefixes) and (
            path == _SUBD_PATH or path.startswith(_SUBD_INSIDE) or self._filter.matches(path))

    def may_exclude_below(self, directory: str) -> bool:
        """Whether any path below the tree path `directory` may be excluded (False lets
        a walk skip asking for each of its entries)."""
        inside = directory if directory.endswith("/") else directory + "/"
        return any(prefix.startswith(inside) or inside.startswith(prefix)
                   for prefix in self._prefixes)


def excluder(exclusions: list[str]) -> Excluder:
    """The `Excluder` of these scan exclusions (ROOT/.subd is always excluded)."""
    return Excluder(exclusions)
