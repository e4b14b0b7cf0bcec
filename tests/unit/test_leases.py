"""Shard lease arithmetic: the hostname -> shard hash (stable across processes and
versions: fixed expected values) and the fair share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dominator.herd.leases import LeaseManager, fair_share, shard_of
from dominator.herd.ownership import Layout
from fleetlib.errors import FleetError
from fleetlib.sql.engine import open_engine

# SHA-256 of the lower-cased UTF-8 name, first 8 bytes big-endian, modulo the shards:
# these values are part of the contract (dominators of different versions must agree).
EXPECTED = [
    ("web1.example.com", 256, 35), ("web1.example.com", 16, 3),
    ("web1.example.com", 65536, 57891), ("db1", 256, 239), ("cache-7", 256, 254),
    ("cache-7", 65536, 13822), ("", 256, 20), ("höst.example", 256, 85),
]


@pytest.mark.parametrize(("hostname", "shards", "shard"), EXPECTED)
def test_shard_of_is_fixed(hostname: str, shards: int, shard: int) -> None:
    assert shard_of(hostname, shards) == shard


def test_shard_of_ignores_case_and_defaults_to_256_shards() -> None:
    assert shard_of("WEB1.Example.COM") == shard_of("web1.example.com") == 35
    assert shard_of("anything", 1) == 0


def test_shard_of_is_the_same_in_another_process_with_another_hash_seed() -> None:
    """Python's own hash() changes per process; shard_of must not."""
    code = "from dominator.herd.leases import shard_of; print(shard_of('db1'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert done.stdout.strip() == "239"


def test_shard_of_spreads_hosts_evenly() -> None:
    counts = [0] * 256
    for number in range(25600):
        counts[shard_of(f"host{number}.example.com")] += 1
    assert min(counts) > 50 and max(counts) < 160  # mean 100


@pytest.mark.parametrize("shards", [0, -1])
def test_shard_of_refuses_no_shards(shards: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        shard_of("db1", shards)


@pytest.mark.parametrize(("shards", "live", "share"), [
    (256, 1, 256), (256, 2, 128), (256, 3, 86), (256, 5, 52), (256, 256, 1),
    (256, 300, 1), (1, 3, 1), (10, 4, 3)])
def test_fair_share_is_the_ceiling(shards: int, live: int, share: int) -> None:
    assert fair_share(shards, live) == share


def test_fair_shares_always_cover_every_shard() -> None:
    for shards in (1, 7, 64, 256, 1000):
        for live in range(1, 40):
            share = fair_share(shards, live)
            assert share * live >= shards > (share - 1) * live


def test_fair_share_needs_a_live_dominator() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fair_share(256, 0)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"identity": ""}, "need the dominator's name"),
    ({"lease_seconds": 0}, "positive number of seconds, not 0"),
    ({"lease_seconds": -3}, "positive number of seconds"),
    ({"lease_seconds": float("nan")}, "positive number of seconds, not nan"),
    ({"lease_seconds": float("inf")}, "positive number of seconds, not inf"),
    ({"shards": 0}, "between 1 and 65536, not 0"),
    ({"shards": 70000}, "between 1 and 65536, not 70000"),
])
def test_bad_settings_get_one_line(tmp_path: Path, arguments: dict[str, object],
                                   message: str) -> None:
    engine = open_engine(str(tmp_path / "mdb.sqlite"))
    settings: dict[str, object] = {"identity": "dom-a", **arguments}
    with pytest.raises(FleetError, match=message):
        LeaseManager(engine, **settings)  # type: ignore[arg-type]
    engine.dispose()


def test_timing_follows_the_lease(tmp_path: Path) -> None:
    engine = open_engine(str(tmp_path / "mdb.sqlite"))
    manager = LeaseManager(engine, "dom-a", lease_seconds=15)
    assert (manager.renew_interval, manager.safety_margin, manager.shards) == (5.0, 5.0, 256)
    assert manager.status().state == "starting" and manager.may_mutate(0) is None
    engine.dispose()


def test_layout_moved_names_only_the_shards_whose_holder_changed() -> None:
    before = Layout(frozenset({0, 1}), {2: "d2", 3: "d3"})
    assert Layout(frozenset({0, 1}), {2: "d2", 3: "d3"}).moved(before) == frozenset()
    after = Layout(frozenset({0, 3}), {1: "d2", 2: "d2", 4: "d4"})
    # 1 went to d2, 3 came here, 4 found a holder; 0 and 2 stayed put
    assert after.moved(before) == frozenset({1, 3, 4})
    assert before.moved(after) == frozenset({1, 3, 4})
    assert after.moved(None) is None  # no earlier layout: every host is placed
