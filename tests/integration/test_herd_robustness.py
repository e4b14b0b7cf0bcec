"""The herd under faults, with a real dominator, image server and subd: an invalid MDB
row, an MDB that cannot be read, a tree over the size limit, a sub whose scans fail,
plans shared between hosts of different histories, and kept directories."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.testing.daemons import Daemon
from fleetlib.testing.fleet import FleetUnderTest, names, wait_for
from fleetlib.testing.trees import make_tree


@pytest.fixture
def start_two(tmp_path: Path, ca: Path, imageserver: Daemon, start_subd: Callable[..., Daemon]
              ) -> Iterator[Callable[..., FleetUnderTest]]:
    """Start a fleet of two hosts: `start_two(*dominator_serve_args)`."""
    started: list[FleetUnderTest] = []

    def start(*serve_args: str) -> FleetUnderTest:
        started.append(FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=2,
                                      serve_args=serve_args))
        return started[-1]
    yield start
    for fleet in started:
        fleet.stop()


@pytest.fixture
def two(start_two: Callable[..., FleetUnderTest]) -> FleetUnderTest:
    """A fleet of two hosts."""
    return start_two()


def mdb_sql(fleet: FleetUnderTest, *statements: str) -> None:
    """Run SQL on the dominator's SQLite MDB as another tool would, moving its
    revision so that the dominator rereads it."""
    connection = sqlite3.connect(fleet.tmp / "dominator" / "mdb.sqlite", timeout=30,
                                 isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("UPDATE mdb_revision SET revision = revision + 1")
        for statement in statements:
            connection.execute(statement)
        connection.execute("COMMIT")
    finally:
        connection.close()


def metric(fleet: FleetUnderTest, name: str) -> float:
    """One unlabelled sample of the dominator's /metrics."""
    text = httpx.get(f"{fleet.base}/metrics", timeout=30).text
    return next(sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == name and not sample.labels)


def add_image(fleet: FleetUnderTest, name: str, tree: Path, *extra: str) -> None:
    fleet.run("image", "add", name, str(tree), *extra)


def enrol(fleet: FleetUnderTest, image: str) -> None:
    """Every host of the fleet in the MDB, required to hold `image`."""
    for name in fleet.names:
        fleet.run("mdb", "set", name, "--address", fleet.sub(name).address,
                  "--required-image", image, "--tag", "rack=r1")


def test_an_invalid_mdb_row_marks_its_host_and_the_others_converge(
        two: FleetUnderTest) -> None:
    fleet = two
    v1 = make_tree(fleet.tmp / "v1")
    add_image(fleet, "v1", v1)
    (v1 / "etc/motd").write_text("v2\n")
    add_image(fleet, "v2", v1)
    enrol(fleet, "v1")
    fleet.wait_status(fleet.names, "synced", "v1")
    mdb_sql(fleet, "UPDATE machines SET tags = 'not json' WHERE hostname = 'host-2'",
            "INSERT INTO machines (hostname, address, required_image, planned_image, "
            "disable_updates, owner_group, tags, updated_unix) VALUES "
            "('host-9', '', '../etc', '', false, '', '{}', 0)")
    hosts = fleet.wait_status(["host-2", "host-9"], "invalid MDB entry")
    assert "Tags" in hosts["host-2"]["last_error"]
    assert "RequiredImage" in hosts["host-9"]["last_error"]
    fleet.run("mdb", "set", "host-1", "--required-image", "v2")
    fleet.wait_status(["host-1"], "synced", "v2")
    assert (fleet.root("host-1") / "etc/motd").read_text() == "v2\n"
    assert fleet.hosts()["host-2"]["status"] == "invalid MDB entry"
    assert not (fleet.root("host-2") / "etc/motd").exists()
    mdb_sql(fleet, "UPDATE machines SET tags = '{}' WHERE hostname = 'host-2'",
            "DELETE FROM machines WHERE hostname = 'host-9'")
    hosts = fleet.wait_status(["host-2"], "synced", "v1")
    assert "host-9" not in hosts


def test_an_unreadable_mdb_is_reported_retried_and_recovered(two: FleetUnderTest) -> None:
    fleet = two
    add_image(fleet, "v1", make_tree(fleet.tmp / "v1"))
    enrol(fleet, "v1")
    fleet.wait_status(fleet.names, "synced", "v1")
    assert httpx.get(f"{fleet.base}/healthz", timeout=30).status_code == 200
    assert metric(fleet, "dominator_mdb_up") == 1
    # Another tool breaks the schema: every read of the machines fails.
    mdb_sql(fleet, "ALTER TABLE machines RENAME TO machines_away")

    def healthz() -> httpx.Response:
        return httpx.get(f"{fleet.base}/healthz", timeout=30)
    # Polled through /healthz (a CLI run costs seconds of CPU), then seen in the CLI.
    health = wait_for(lambda: (reply := healthz()).status_code == 503 and reply,
                      "/healthz reports the MDB error", timeout=30)
    assert "no such table" in health.json()["error"]
    status = json.loads(fleet.run("fleet", "status", "--json"))
    assert "no such table: machines" in status["mdb_error"]
    assert metric(fleet, "dominator_mdb_up") == 0
    wait_for(lambda: metric(fleet, "dominator_mdb_read_errors_total") >= 3,
             "the read is retried")
    # The hosts keep their loops on the last view read: a change by hand is undone.
    edited = fleet.root("host-1") / "etc/hostname"
    edited.write_text("edited by hand\n")
    wait_for(lambda: edited.read_text() == "golden\n", "host-1 is corrected")
    mdb_sql(fleet, "ALTER TABLE machines_away RENAME TO machines")
    wait_for(lambda: healthz().status_code == 200, "the MDB error clears by itself",
             timeout=40)
    assert not json.loads(fleet.run("fleet", "status", "--json"))["mdb_error"]
    assert metric(fleet, "dominator_mdb_up") == 1
    log = fleet.dominator.log()
    assert log.count("cannot read the MDB") == 1, log  # once, not once per retry
    assert "Traceback" not in log
    fleet.run("mdb", "set", "host-3", "--address", "127.0.0.1:1")  # followed again
    fleet.wait_status(["host-3"], "unreachable")
    fleet.wait_status(["host-1"], "intrusion")  # the edit by hand, reported as ever


def test_a_tree_over_the_limit_is_a_clear_host_status(
        start_two: Callable[..., FleetUnderTest]) -> None:
    fleet = start_two("--max-tree-bytes", "500")
    add_image(fleet, "v1", make_tree(fleet.tmp / "v1"))
    make_tree(fleet.root("host-1"))  # a tree of a few kilobytes
    enrol(fleet, "v1")
    host = fleet.wait_status(["host-1"], "tree too large")["host-1"]
    assert "the limit is 500" in host["last_error"]
    assert "Traceback" not in fleet.dominator.log()


def test_a_sub_whose_scans_fail_is_not_synced(two: FleetUnderTest) -> None:
    fleet = two
    add_image(fleet, "v1", make_tree(fleet.tmp / "v1"))
    enrol(fleet, "v1")
    fleet.wait_status(fleet.names, "synced", "v1")
    root = fleet.root("host-1")
    away = root.with_name("host-1-away")
    root.rename(away)  # the sub's root is gone: its scans cannot complete
    try:
        host = fleet.wait_status(["host-1"], "scan failed")["host-1"]
        assert host["last_error"]
        assert fleet.hosts()["host-2"]["status"] == "synced"
    finally:
        away.rename(root)
    fleet.wait_status(["host-1"], "synced", "v1")


def test_each_host_gets_the_old_triggers_of_its_own_previous_image(
        two: FleetUnderTest, trigger_log: Path) -> None:
    """Two hosts of one tree (so one shared plan) but different previous images:
    each update stops the services of that host's previous image."""
    fleet = two
    base = make_tree(fleet.tmp / "base")
    (base / "etc/app.conf").write_text("one\n")
    (fleet.tmp / "filter").write_text("/var/lib/dhcp/.*\n")
    for name in ("alpha", "beta"):
        (fleet.tmp / f"{name}.json").write_text(json.dumps(
            [{"MatchLines": ["/etc/app.conf"], "Service": name}]))
        add_image(fleet, name, base, "--triggers", str(fleet.tmp / f"{name}.json"),
                  "--filter", str(fleet.tmp / "filter"))
    (base / "etc/app.conf").write_text("two\n")
    add_image(fleet, "next", base, "--filter", str(fleet.tmp / "filter"))
    for name in fleet.names:  # a lease below a folder no image has: kept
        (fleet.root(name) / "var/lib/dhcp").mkdir(parents=True)
        lease = fleet.root(name) / "var/lib/dhcp/leases"
        lease.write_text("lease\n")
        os.utime(lease, ns=(10**18, 10**18))  # the same on both: one tree fingerprint
    fleet.run("mdb", "set", "host-1", "--address", fleet.sub("host-1").address,
              "--required-image", "alpha")
    fleet.run("mdb", "set", "host-2", "--address", fleet.sub("host-2").address,
              "--required-image", "beta")
    fleet.wait_status(names(1), "synced", "alpha")
    fleet.wait_status(names(2), "synced", "beta")
    shown = json.loads(fleet.run("fleet", "show", "host-1", "--json"))
    assert shown["kept_paths"] == ["/var/lib/dhcp"]
    fingerprints = {json.loads(fleet.run("sub", "poll", fleet.sub(name).address,
                                         "--json"))["fingerprint"] for name in fleet.names}
    assert len(fingerprints) == 1  # one tree: the herd plans it once for both
    trigger_log.write_text("")
    fleet.run("fleet", "disable-updates", "--reason", "line up both hosts")
    for name in fleet.names:
        fleet.run("mdb", "set", name, "--required-image", "next")
    fleet.wait_status(fleet.names, "updates disabled")
    fleet.run("fleet", "enable-updates")  # both plan at once: one plan, shared
    fleet.wait_status(fleet.names, "synced", "next")
    stops = sorted(line for line in trigger_log.read_text().splitlines()
                   if line.startswith("stop "))
    assert stops == ["stop alpha", "stop beta"]
    for name in fleet.names:
        assert (fleet.root(name) / "var/lib/dhcp/leases").read_text() == "lease\n"
