"""Readable output: relative times and padded tables."""

from __future__ import annotations

from fleetlib.cli.display import ago, table, utc

NOW = 1_800_000_000.0


def test_ago_reads_like_people_speak() -> None:
    assert ago(0, NOW) == "-"
    assert ago(NOW - 3, NOW) == "just now"
    assert ago(NOW - 45, NOW) == "45 s ago"
    assert ago(NOW - 150, NOW) == "3 min ago"
    assert ago(NOW - 2 * 3600, NOW) == "2 h ago"
    assert ago(NOW - 10 * 86400, NOW) == "10 d ago"
    assert ago(NOW + 3 * 86400 - 5, NOW) == "in 3 d"  # an expiry just set for 3 d


def test_table_pads_columns_under_headers() -> None:
    text = table(("name", "size"), [("a", 1), ("longer", None)])
    assert text.splitlines() == ["NAME    SIZE", "a       1", "longer  -"]
    assert table(("x",), []) == "X"


def test_ago_rounds_to_the_unit_people_would_say() -> None:
    assert ago(NOW + 3600 - 1, NOW) == "in 1 h"  # a 1 h pause set a second ago
    assert ago(NOW - 86400 + 60, NOW) == "1 d ago"
    assert ago(NOW - 90, NOW) == "2 min ago"


def test_utc_spells_one_format() -> None:
    assert utc(0) == "1970-01-01 00:00:00 UTC"
