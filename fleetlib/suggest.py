"""'Did you mean ...?' for a name that does not exist (a hostname, an image name)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

SUGGESTIONS = 3  # at most this many close names in a message


def close_matches(word: str, candidates: Iterable[str]) -> list[str]:
    """The candidates most similar to `word`, best first (difflib's ratio >= 0.6)."""
    return difflib.get_close_matches(word, list(candidates), n=SUGGESTIONS)


def did_you_mean(matches: list[str]) -> str:
    """'did you mean a, b?' for an error message, or '' for no matches."""
    return f"did you mean {', '.join(matches)}?" if matches else ""
