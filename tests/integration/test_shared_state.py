"""The dominator's state shared in a PostgreSQL MDB (FLEET_TEST_POSTGRES_URL; skipped
without it): two stores on one database see each other's switch, pauses, clearances
and intrusion reports within seconds, and keep their memory while the database is gone;
and two real `dominator serve` on one MDB: the fleet-wide switch set through one stops
both (hosts each manages stay put on an MDB change), a pause and a safety clearance set
through one are seen by the other, and switching updates on through the other lets both
converge again."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dominator.herd.state import DominatorState, shared_url
from fleetlib.testing.daemons import TRACEBACK_RE, Daemon
from fleetlib.testing.dominators import Dominators
from fleetlib.testing.fleet import wait_for
from fleetlib.testing.trees import make_tree
from mdb.store import Mdb
from tests.integration.sharedfleet import start_hosts, start_sharing

SEEN_WITHIN = 6.0  # seconds: the refresh (2 s) and a loaded machine's slack


def test_only_a_postgresql_mdb_shares_the_state(tmp_path: Path) -> None:
    assert shared_url(str(tmp_path / "mdb.sqlite")) is None
    assert shared_url(f"sqlite:///{tmp_path}/mdb.sqlite") is None
    url = "postgresql+psycopg://u:p@127.0.0.1/mdb"
    assert shared_url(url) == url
    state = DominatorState(tmp_path / "dominator.sqlite")
    assert not state.shared
    state.close()


def test_two_stores_share_switch_pauses_and_clearances(
        two_states: tuple[DominatorState, DominatorState], postgres_url: str) -> None:
    a, b = two_states
    assert a.shared and b.shared
    switched = a.disable_updates("alice", "freeze for the audit")
    assert a.updates_disabled() == switched
    started = time.monotonic()
    assert wait_for(b.updates_disabled, "B sees A's switch", SEEN_WITHIN) == switched
    assert time.monotonic() - started < SEEN_WITHIN

    a.pause_host("web-1", "alice", "kernel bug", int(time.time()) + 3600)
    a.clear_safety("web-2")
    a.allow_disruption("web-3")
    a.report_intrusion("web-4", ["/etc/passwd"])
    wait_for(lambda: b.host_paused("web-1"), "B sees the pause", SEEN_WITHIN)
    paused = b.host_paused("web-1")
    assert paused is not None and (paused.by, paused.reason) == ("alice", "kernel bug")
    wait_for(lambda: b.safety_cleared("web-2") and b.disruption_allowed("web-3")
             and b.intrusion("web-4") == ("/etc/passwd",), "B sees the rest", SEEN_WITHIN)

    # Through B: switch on, resume, consume, acknowledge; A sees each undone.
    b.enable_updates()
    b.resume_host("web-1")
    b.consume_safety("web-2")
    b.consume_disruption("web-3")
    b.acknowledge_intrusion("web-4")
    wait_for(lambda: a.updates_disabled() is None and a.host_paused("web-1") is None
             and not a.safety_cleared("web-2") and not a.disruption_allowed("web-3")
             and not a.intrusion("web-4"), "A sees B's changes", SEEN_WITHIN)

    # The desired-image history is one too (read from the database, not memory).
    a.record_sync("web-5", "v1", {"/etc/motd": (b"\x01" * 32, 5)})
    assert b.desired_images("web-5") == ["v1"]
    assert b.desired_computed("web-5") == {"/etc/motd": {b"\x01" * 32: 5}}
    engine = sa.create_engine(postgres_url)
    with engine.connect() as connection:
        versions = set(connection.execute(sa.text(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_name LIKE 'alembic_version_%'")).scalars())
    engine.dispose()
    assert {"alembic_version_mdb", "alembic_version_state"} <= versions


def test_a_store_survives_terminated_sessions(
        two_states: tuple[DominatorState, DominatorState], postgres_url: str) -> None:
    a, b = two_states
    a.disable_updates("alice", "freeze")
    wait_for(b.updates_disabled, "B sees the switch", SEEN_WITHIN)
    terminate_sessions(postgres_url)  # B's too
    assert b.updates_disabled() is not None
    a.enable_updates()  # on a new session (pre-ping)
    wait_for(lambda: b.updates_disabled() is None, "B reconnects and sees it on",
             SEEN_WITHIN)


def test_a_store_keeps_its_memory_while_the_database_is_gone(
        tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    state = DominatorState(tmp_path / "dominator.sqlite", postgres_url, refresh_seconds=0.2)
    try:
        state.disable_updates("alice", "freeze")
        state.pause_host("web-1", "alice", "kernel bug")
        with caplog.at_level(logging.WARNING, logger="dominator.herd.state"):
            drop_database(postgres_url)
            wait_for(lambda: "unreadable, keeping what was last read" in caplog.text,
                     "the failing refresh logged", SEEN_WITHIN)
        assert state.updates_disabled() is not None and state.host_paused("web-1") is not None
        assert caplog.text.count("unreadable") == 1  # once per outage
    finally:
        state.close()
        recreate_database(postgres_url)  # for the fixture to drop


def terminate_sessions(url: str) -> None:
    """End every other session of the database at `url`."""
    with _admin(url) as connection:
        connection.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :name AND pid <> pg_backend_pid()"),
            {"name": sa.make_url(url).database})


def drop_database(url: str) -> None:
    with _admin(url) as connection:
        connection.exec_driver_sql(f"DROP DATABASE {sa.make_url(url).database} WITH (FORCE)")


def recreate_database(url: str) -> None:
    with _admin(url) as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {sa.make_url(url).database}")


@contextmanager
def _admin(url: str) -> Iterator[sa.Connection]:
    """A session of the server's own test database (not the one at `url`)."""
    admin = sa.create_engine(os.environ["FLEET_TEST_POSTGRES_URL"], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            yield connection
    finally:
        admin.dispose()


def test_the_global_disable_switch_set_through_one_dominator_stops_all_of_them(
        tmp_path: Path, postgres_url: str, two_dominators: Dominators,
        start_subd: Callable[..., Daemon]) -> None:
    doms = two_dominators

    def fleet_status(name: str) -> dict[str, Any]:
        return doms.json(name, "fleet", "status")

    def fleet_show(name: str, host: str) -> dict[str, Any]:
        return doms.json(name, "fleet", "show", host)
    tree = make_tree(tmp_path / "tree")
    for image in ("v1", "v2"):
        (tree / "etc/release").write_text(f"{image}\n")
        doms.run("dom-a", "image", "add", image, str(tree))
    # Two hosts in the shards of each, so that each dominator manages some.
    owner = start_sharing(doms, postgres_url)
    hosts = {name: [host for host in owner if owner[host] == name] for name in doms.daemons}
    subs = start_hosts(postgres_url, tmp_path, start_subd, owner)
    every = sorted(subs)
    wait_for(lambda: (rows := doms.managed()) and sorted(rows) == every
             and all(row["current_image"] == "v1" for row in rows.values()),
             "every host on v1, each managed by one", 90)

    # The switch through A: B reports it (who and why) within seconds, from the
    # shared database.
    doms.run("dom-a", "fleet", "disable-updates", "--reason", "freeze for the audit")
    switched = time.monotonic()
    on_b = wait_for(lambda: (status := fleet_status("dom-b"))["updates_disabled"] and status,
                    "B reports updates disabled", 10)
    assert time.monotonic() - switched < 10
    on_a = fleet_status("dom-a")
    assert on_b["disabled_reason"] == "freeze for the audit"
    assert on_b["disabled_by"] and on_b["disabled_by"] == on_a["disabled_by"]
    assert on_b["disabled_unix"] == on_a["disabled_unix"]

    # Both stop: an MDB change moves no host, whichever dominator manages it.
    with Mdb(postgres_url) as mdb:
        for host in every:
            mdb.update(host, required_image="v2")
    wait_for(lambda: (rows := doms.managed()) and sorted(rows) == every
             and all(row["status"] == "updates disabled" for row in rows.values()),
             "every host held by the switch", 30)
    time.sleep(2)  # several poll cycles of both
    rows = doms.managed()
    assert {row["current_image"] for row in rows.values()} == {"v1"}, rows

    # A host pause and a safety clearance set through A, on hosts B manages.
    paused, cleared = hosts["dom-b"]
    doms.run("dom-a", "mdb", "set", paused, "--disable-updates", "--reason", "kernel bug")
    doms.run("dom-a", "fleet", "clear-safety", cleared)
    shown = wait_for(lambda: (report := fleet_show("dom-b", paused))["pause"] and report,
                     "B sees the pause", 10)
    assert shown["pause"]["reason"] == "kernel bug"
    wait_for(lambda: fleet_show("dom-b", cleared)["safety_cleared"], "B sees the clearance",
             10)

    # Switched on through B: A reports it on, and every host but the paused one
    # converges on v2 (the paused one stays, held by its pause on B).
    doms.run("dom-b", "fleet", "enable-updates")
    wait_for(lambda: not fleet_status("dom-a")["updates_disabled"], "A reports updates on",
             10)
    others = [host for host in every if host != paused]
    wait_for(lambda: (rows := doms.managed()) and all(
        rows.get(host, {}).get("current_image") == "v2" for host in others),
        "the others on v2", 90)
    assert doms.managed()[paused]["current_image"] == "v1"
    for daemon in doms.daemons.values():
        assert not TRACEBACK_RE.search(daemon.log_path.read_text(errors="replace"))
