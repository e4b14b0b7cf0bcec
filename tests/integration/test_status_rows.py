"""Host status rows (dominator/herd/statusrows.py) on real databases: the batching
writer (one transaction for many changes, none when nothing changed, the latest state
kept and retried while the table is gone), the mirror of another dominator's rows into
the herd's subs (status through set_status, history, current image, stale owners), bad
rows shown as an error, and 64-bit columns on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import sqlalchemy as sa

from dominator.herd.herd import Sub
from dominator.herd.ownership import Ownership
from dominator.herd.state import DominatorState, shared_url
from dominator.herd.status import Status
from dominator.herd.statusrows import BadRow, HostStatus, StatusRows, StatusTable, StatusWriter
from fleetlib.testing.daemons import TRACEBACK_RE, Daemon, cli
from fleetlib.testing.dominators import TOKEN, Dominators
from fleetlib.testing.fleet import wait_for
from fleetlib.testing.trees import make_tree
from mdb.machine import Machine
from mdb.store import Mdb
from tests.integration.sharedfleet import start_hosts, start_sharing


class StandInOwnership:
    """The part of Ownership status rows ask about: who this is, who owns each host."""

    def __init__(self, name: str, owners: dict[str, str]) -> None:
        self.name = name
        self.owners = owners
        self.lease_seconds = 3.0

    def owner(self, hostname: str) -> str:
        return self.owners.get(hostname, "")


def state_on(url: str, directory: Path) -> DominatorState:
    """A dominator state whose shared database is `url` (PostgreSQL), or the state file
    itself when `url` is a SQLite path."""
    if url.startswith("postgresql"):
        with Mdb(url):  # the MDB at head first, as `dominator serve` opens it
            pass
        return DominatorState(directory / "dominator.sqlite", shared_url(url))
    return DominatorState(Path(url))


@pytest.fixture
def state(url: str, tmp_path: Path) -> Iterator[DominatorState]:
    opened = state_on(url, tmp_path / "a")
    yield opened
    opened.close()


@pytest.fixture
async def supervised() -> AsyncIterator[asyncio.Task[None]]:
    """A task standing for a sub's loop (a sub with a task is supervised here)."""
    task = asyncio.create_task(asyncio.sleep(3600))
    yield task
    task.cancel()


def subs_of(count: int, task: asyncio.Task[None] | None) -> dict[str, Sub]:
    subs = {}
    for index in range(count):
        sub = subs[f"host-{index}"] = Sub(Machine(f"host-{index}", required_image="v1"))
        sub.task = task
        sub.last_poll_unix = sub.last_scan_unix = 1_700_000_000.5
        sub.set_status(Status.SYNCED)
    return subs


def commits(engine: sa.Engine) -> list[int]:
    """A list that grows by one at each commit on `engine`."""
    seen: list[int] = []
    sa.event.listen(engine, "commit", lambda connection: seen.append(1))
    return seen


def stored(engine: sa.Engine) -> dict[str, tuple[str, str, str]]:
    with engine.connect() as connection:
        return {host: (owner, status, error) for host, owner, status, error in
                connection.execute(sa.text(
                    "SELECT hostname, owner, status, last_error FROM host_status"))}


async def test_the_writer_batches_changes_and_writes_nothing_when_nothing_changed(
        state: DominatorState, supervised: asyncio.Task[None],
        caplog: pytest.LogCaptureFixture) -> None:
    engine = state.database
    table = StatusTable(engine)
    writer = StatusWriter(table, state, heartbeat=3600)
    subs = subs_of(1000, supervised)
    for sub in subs.values():
        writer.watch(sub)  # as the herd has it when it starts supervising a host
    done = commits(engine)
    writer.stage("dom-a", subs)
    assert writer.due()
    writer.flush("dom-a")
    assert len(done) == 1 and table.rows_written == 1000
    assert len(stored(engine)) == 1000

    # Nothing changed (synced again at the next poll): nothing due, no transaction;
    # times alone wait TIMES_SECONDS.
    for sub in subs.values():
        sub.set_status(Status.SYNCED)
        sub.last_poll_unix += 5
    writer.stage("dom-a", subs)
    assert not writer.due()

    # 50 changes: one transaction of 50 rows; a failure repeated is written twice more
    # (the mirror's listeners count verdicts), then no more.
    for repeat in range(4):
        for index in range(50):
            subs[f"host-{index}"].set_status(Status.FAILED, f"update: disk {index} on fire")
        writer.stage("dom-a", subs)
        if repeat < 3:
            writer.flush("dom-a")
    assert len(done) == 4 and table.rows_written == 1150 and not writer.due()
    assert stored(engine)["host-7"] == ("dom-a", "update failed", "update: disk 7 on fire")

    # The table gone: the failure logged once, the latest state of each host kept (not
    # a queue), all of it written in one transaction once the table is back.
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE host_status RENAME TO host_status_away"))
    caplog.set_level(logging.WARNING, "dominator.herd.statusrows")
    for attempt in range(3):
        subs["host-1"].set_status(Status.UPDATING, f"attempt {attempt}")
        writer.stage("dom-a", subs)
        writer.flush("dom-a")
    assert writer.failing and writer.failures == 3
    assert sum("cannot write host status rows" in r.message for r in caplog.records) == 1
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE host_status_away RENAME TO host_status"))
    del subs["host-2"]  # gone from the MDB: its row goes at the next sweep
    writer.sweep_seconds = 0
    writer.stage("dom-a", subs)
    batches = table.batches
    writer.flush("dom-a")
    assert table.batches == batches + 1 and not writer.failing
    rows = stored(engine)
    assert rows["host-1"] == ("dom-a", "updating", "attempt 2") and "host-2" not in rows
    assert any("written to" in r.message and "again" in r.message for r in caplog.records)
    assert not writer.due()


async def test_bad_rows_read_back_as_errors_not_tracebacks(state: DominatorState) -> None:
    engine = state.database
    good = HostStatus("host-0", "dom-b", Status.SYNCED, current_image="v1",
                      history=((1.0, "polling", ""), (2.0, "synced", "")))
    StatusTable(engine).write("dom-b", [good])
    bad: dict[str, dict[str, Any]] = {
        "host-1": {"status": "on fire"},
        "host-2": {"history": "not json ["},
        "host-3": {"history": '[[1, "synced"]]'},
        "host-4": {"owner": ""},
        "host-5": {"kept_paths": '{"a": 1}'},
        "host-6": {"repeats": -1},
        "host-7": {"status": "managed elsewhere"},
    }
    with engine.begin() as connection:
        for host, changes in bad.items():
            values = {**good.values(), "hostname": host, "updated": 1.0, **changes}
            connection.execute(sa.text(
                f"INSERT INTO host_status ({', '.join(values)}) VALUES "
                f"({', '.join(':' + name for name in values)})"), values)
    read = StatusTable(engine).read()
    assert read.rows["host-0"] == HostStatus(**{**good.__dict__,
                                                "updated": read.rows["host-0"].updated})
    for host in bad:
        assert isinstance(read.rows[host], BadRow), host

    # Shown through the mirror: the host reads `managed elsewhere` with the reason.
    subs = subs_of(8, None)
    ownership = StandInOwnership("dom-a", {host: "dom-b" for host in subs})
    rows = StatusRows(subs, state, cast(Ownership, ownership))
    rows.active = True  # a SQLite state file stands in for the shared database here
    await rows.read()
    for sub in subs.values():
        rows.show(sub, "shard 1 is managed by dominator dom-b")
    assert subs["host-0"].status == Status.SYNCED and subs["host-0"].mirrored
    for host in bad:
        assert subs[host].status == Status.ELSEWHERE and not subs[host].mirrored
        assert "its status row is invalid" in subs[host].last_error, host
    assert "unknown status 'on fire'" in subs["host-1"].last_error


async def test_the_mirror_shows_the_owners_rows_and_says_when_they_are_stale(
        postgres_url: str, tmp_path: Path, supervised: asyncio.Task[None]) -> None:
    a_state = state_on(postgres_url, tmp_path / "a")
    b_state = state_on(postgres_url, tmp_path / "b")
    try:
        # B supervises 3 hosts and writes their rows; A mirrors them.
        b_subs = subs_of(3, supervised)
        b_state.record_sync("host-0", "v1", {})
        b_subs["host-0"].kept_paths = ("/var/cache/app",)
        b_subs["host-0"].change_window_ns = 3 * 2**31
        b_rows = StatusRows(b_subs, b_state, cast(Ownership, StandInOwnership("dom-b", {})))
        for sub in b_subs.values():
            b_rows.forget(sub)  # as the herd does when it starts supervising a host
        b_rows.writer.stage("dom-b", b_subs)
        b_rows.writer.flush("dom-b")

        a_subs = subs_of(3, None)
        owners = {host: "dom-b" for host in a_subs}
        a_rows = StatusRows(a_subs, a_state, cast(Ownership,
                                                  StandInOwnership("dom-a", owners)))
        heard: list[tuple[str, str]] = []
        a_subs["host-0"].listeners.append(lambda status, error: heard.append((status, error)))
        for sub in a_subs.values():
            a_rows.show(sub, "shard 9 is managed by dominator dom-b")
        assert a_subs["host-0"].status == Status.ELSEWHERE  # nothing read yet
        await a_rows.read()
        sub = a_subs["host-0"]
        assert sub.mirrored and sub.task is None and sub.status == Status.SYNCED
        assert sub.owner == "dom-b" and sub.kept_paths == ("/var/cache/app",)
        assert sub.change_window_ns == 3 * 2**31
        assert [entry[1:] for entry in sub.history] == [("synced", "")]
        assert a_state.host("host-0").current_image == "v1"
        assert heard[-1] == ("synced", "")

        # B's verdicts reach A's listeners, repeats included (a deploy counts them).
        heard.clear()
        b_subs["host-0"].set_status(Status.FAILED, "update: no")
        b_subs["host-0"].set_status(Status.FAILED, "update: no")
        b_rows.writer.stage("dom-b", b_subs)
        b_rows.writer.flush("dom-b")
        await a_rows.read()
        assert heard == [("update failed", "update: no")] * 2
        assert [entry[1] for entry in sub.history] == ["synced", "update failed"]
        await a_rows.read()
        assert len(heard) == 2  # read again, unchanged: no verdict

        # The shard moved to dom-c, which has not reported yet.
        owners["host-1"] = "dom-c"
        a_rows.show(a_subs["host-1"], "shard 9 is managed by dominator dom-c")
        assert a_subs["host-1"].status == Status.ELSEWHERE
        assert "last reported by dom-b at" in a_subs["host-1"].last_error

        # dom-b's heartbeat older than STALE_LEASES leases: its rows are stale.
        with a_state.database.begin() as connection:
            connection.execute(sa.text("UPDATE host_status_writers SET updated = updated - 60"))
        await a_rows.read()
        assert sub.status == Status.ELSEWHERE and not sub.mirrored
        assert sub.last_error.startswith("not reported by dom-b since ")
        b_rows.writer.flush("dom-b")  # a heartbeat: current again
        await a_rows.read()
        assert sub.status == Status.FAILED and sub.mirrored

        # The rows unreadable for a stale while (3 leases): shown as unread, not failed.
        a_ownership = cast(StandInOwnership, a_rows.ownership)
        a_ownership.lease_seconds = 0.1
        with a_state.database.begin() as connection:
            connection.execute(sa.text("ALTER TABLE host_status RENAME TO host_status_away"))
        time.sleep(0.4)
        await a_rows.read()
        assert sub.status == Status.ELSEWHERE and "status rows unreadable since" in \
            sub.last_error
        with a_state.database.begin() as connection:
            connection.execute(sa.text("ALTER TABLE host_status_away RENAME TO host_status"))
        a_ownership.lease_seconds = 3.0
        await a_rows.read()
        assert sub.status == Status.FAILED and sub.mirrored
    finally:
        a_state.close()
        b_state.close()


def test_postgresql_keeps_64_bit_sizes_and_times(postgres_url: str, tmp_path: Path) -> None:
    state = state_on(postgres_url, tmp_path)
    try:
        huge = 5 * 2**31  # a 10 GiB computed file
        state.record_desired("host-1", "v1", {"/etc/huge": (b"\x01" * 32, huge)})
        later = 2**31 + 1000  # past 2038
        state.pause_host("host-1", "alice", "until after 2038", later)
        assert state.desired_computed("host-1") == {"/etc/huge": {b"\x01" * 32: huge}}
        with state.database.connect() as connection:
            assert connection.execute(sa.text(
                "SELECT paused_until_unix FROM hosts WHERE hostname = 'host-1'")
            ).scalar_one() == later
        StatusTable(state.database).write("dom-a", [HostStatus(
            "host-1", "dom-a", Status.SYNCED, change_window_ns=time.time_ns(),
            last_poll_unix=later)])
        row = StatusTable(state.database).read().rows["host-1"]
        assert isinstance(row, HostStatus) and row.last_poll_unix == later
    finally:
        state.close()


def test_every_dominator_shows_every_host_with_its_owners_status(
        tmp_path: Path, postgres_url: str, two_dominators: Dominators,
        start_subd: Callable[..., Daemon]) -> None:
    doms = two_dominators
    tree = make_tree(tmp_path / "tree")
    for image in ("v1", "v2"):
        (tree / "etc/release").write_text(f"{image}\n")
        doms.run("dom-a", "image", "add", image, str(tree))
    owner = start_sharing(doms, postgres_url)
    start_hosts(postgres_url, tmp_path, start_subd, owner)

    def everywhere(host_ok: Callable[[str, dict[str, Any]], bool]) -> bool:
        views = [doms.view(name) for name in doms.daemons]
        return all(host in view and host_ok(host, view[host])
                   for view in views for host in owner)
    wait_for(lambda: everywhere(lambda host, row: row["status"] == "synced"
                                and row["current_image"] == "v1"
                                and row["owner"] == owner[host]),
             "every host synced on v1 in both dashboards, with its owner", 90)
    for name in doms.daemons:
        listed = {row["hostname"]: row for row in json.loads(
            doms.run(name, "fleet", "list", "--json"))}
        assert {host: (row["status"], row["owner"]) for host, row in listed.items()} == \
            {host: ("synced", manager) for host, manager in owner.items()}, name
    metrics = httpx.get(f"{doms.http['dom-a']}/metrics", timeout=10).text
    assert f'dominator_hosts{{status="synced"}} {len(owner)}.0' in metrics
    assert "dominator_status_rows_up 1.0" in metrics
    assert re.search(r"^dominator_hosts_mirrored [1-9]", metrics, re.MULTILINE)
    assert re.search(r"^dominator_status_row_batches_total [1-9]", metrics, re.MULTILINE)

    # B's host, shown through A: B's status, times and history.
    b_host = next(host for host, manager in owner.items() if manager == "dom-b")
    on_b = doms.json("dom-b", "fleet", "show", b_host)
    on_a = doms.json("dom-a", "fleet", "show", b_host)
    assert on_a["owner"] == on_b["owner"] == "dom-b"
    assert on_a["history_entries"] == on_b["history_entries"]
    assert on_a["status"] == "synced" and on_a["last_poll_unix"] > 0
    assert on_a["last_sync_unix"] > 0 and on_a["last_scan_unix"] > 0
    refused = cli("fleet", "fast-update", b_host,
                  env={**doms.env, "DOMINATOR_ADDRESS": doms.daemons["dom-a"].address})
    assert refused.returncode != 0
    assert "managed by dominator dom-b: ask that dominator" in refused.stderr, refused.stderr

    # An MDB change of B's host: A's view shows it converge (B's transitions included).
    with Mdb(postgres_url) as mdb:
        mdb.update(b_host, required_image="v2")
    wait_for(lambda: (row := doms.view("dom-a").get(b_host, {})).get("status") == "synced"
             and row["current_image"] == "v2", f"{b_host} synced on v2 as dom-a shows it", 60)
    shown = doms.json("dom-a", "fleet", "show", b_host)
    assert "updating" in [entry["status"] for entry in shown["history_entries"]]
    assert shown["owner"] == "dom-b"

    # A deploy through A judges every host by what it shows, B's hosts included.
    done = json.loads(doms.run("dom-a", "deploy", "start", "v2", "--select", "all",
                               "--waves", "100%", "--wait", "--json", "--url",
                               doms.http["dom-a"], "--token", TOKEN))
    assert done["status"] == "SUCCEEDED", done
    assert {host: row["status"] for host, row in done["hosts"].items()} == \
        {host: "succeeded" for host in owner}, done
    for daemon in doms.daemons.values():
        log_text = daemon.log_path.read_text(errors="replace")
        assert not TRACEBACK_RE.search(log_text)
        assert "host status rows" not in log_text  # no write or read ever failed
