"""Shard leases on a real PostgreSQL (FLEET_TEST_POSTGRES_URL; skipped without it) and
on SQLite: managers in this process driven round by round, and three managers in
three processes with a sampler reading the lease table every 100 ms for the whole
test, SIGKILL, SIGSTOP/SIGCONT and pg_terminate_backend."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dominator.herd.leases import LeaseConfigError, LeaseManager, Renewal, fair_share
from fleetlib.errors import FleetError
from fleetlib.sql.engine import open_engine
from fleetlib.testing.faultproxy import Fault, FaultProxy
from fleetlib.testing.leases import SAMPLE_EVERY, LeaseSampler, Rows, read_rows
from mdb.store import Mdb

PROJECT = Path(__file__).resolve().parents[2]
SHARDS = 256
LEASE = 3.0  # seconds, for the managers in their own processes
INTERVAL = LEASE / 3
# Scheduling slack on a loaded two-core machine, added to the bounds the design gives.
SLACK = 1.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             every: float = 0.05) -> Any:
    """Poll `predicate` until it returns something true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def pg(postgres_url: str) -> str:
    """A fresh PostgreSQL database migrated to the current MDB schema."""
    Mdb(postgres_url).close()
    return postgres_url


@pytest.fixture
def open_manager() -> Iterator[Callable[..., LeaseManager]]:
    """`open_manager(url, name, **settings)`: a manager on its own engine, disposed
    after the test."""
    engines: list[sa.Engine] = []

    def opened(url: str, name: str, **settings: Any) -> LeaseManager:
        engine = open_engine(url)
        engines.append(engine)
        return LeaseManager(engine, name, **settings)

    yield opened
    for engine in engines:
        engine.dispose()


def table(url: str) -> Rows:
    """shard -> (owner, token, unexpired) as the database sees it now."""
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            return read_rows(connection)
    finally:
        engine.dispose()


def renewed(manager: LeaseManager) -> Renewal:
    """One round that must succeed."""
    renewal = manager.renew()
    assert renewal is not None, manager.status()
    return renewal


# --- one process, round by round (PostgreSQL) ----------------------------------------------


def test_the_first_dominator_takes_every_shard_and_renewing_keeps_the_tokens(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    manager = open_manager(pg, "dom-a", lease_seconds=5)
    first = renewed(manager)
    assert (first.live, first.share, len(first.taken), first.lost) == (1, SHARDS, SHARDS, ())
    tokens = [first.taken[shard] for shard in range(SHARDS)]
    assert len(set(tokens)) == SHARDS
    assert min(tokens) > 1_700_000_000_000  # the sequence starts at its creation, in ms
    assert manager.owned() == dict(first.taken) == manager.mutable()
    assert all(manager.may_mutate(shard) == first.taken[shard] for shard in range(SHARDS))
    assert manager.may_mutate(SHARDS) is None
    second = renewed(manager)
    assert (dict(second.held), second.taken, second.released, second.lost) == \
        (dict(first.taken), {}, (), ())
    assert dict(second.mutable_before) == dict(first.taken)
    assert {owner for owner, _, live in table(pg).values() if live} == \
        {manager.status().dominator_id}
    status = manager.status()
    assert (status.state, status.reason, status.owned, status.mutable, status.live,
            status.share) == ("ok", "", SHARDS, SHARDS, 1, SHARDS)


def test_a_joining_dominator_gets_the_highest_shards_with_newer_tokens(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    a = open_manager(pg, "dom-a", lease_seconds=5)
    b = open_manager(pg, "dom-b", lease_seconds=5)
    old = dict(renewed(a).taken)
    joined = renewed(b)
    assert (joined.live, joined.share, joined.taken) == (2, 128, {})  # nothing free yet
    gave = renewed(a)
    assert gave.released == tuple(range(128, SHARDS)) and gave.taken == {}
    assert dict(gave.held) == {shard: old[shard] for shard in range(128)}
    assert all(a.may_mutate(shard) is None for shard in range(128, SHARDS))  # at once
    took = renewed(b)
    assert sorted(took.taken) == list(range(128, SHARDS))
    assert min(took.taken.values()) > max(old.values())
    assert renewed(a).held == gave.held and renewed(b).taken == {}  # stable
    c = open_manager(pg, "dom-c", lease_seconds=5)
    renewed(c)
    gave_a, gave_b = renewed(a), renewed(b)  # share 86: each gives back its top 42
    assert gave_a.released == tuple(range(86, 128))
    assert gave_b.released == tuple(range(214, SHARDS))
    took_c = renewed(c)
    assert sorted(took_c.taken) == [*range(86, 128), *range(214, SHARDS)]
    held = [set(renewed(m).held) for m in (a, b, c)]
    assert set().union(*held) == set(range(SHARDS)) and sum(map(len, held)) == SHARDS
    assert max(map(len, held)) <= fair_share(SHARDS, 3) == 86


def test_an_expired_lease_stops_mutation_first_and_is_granted_anew(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    a = open_manager(pg, "dom-a", lease_seconds=3)
    b = open_manager(pg, "dom-b", lease_seconds=3)
    started = time.monotonic()
    old = dict(renewed(a).taken)
    wait_for(lambda: a.may_mutate(0) is None, 4, "the local deadline")
    assert time.monotonic() - started < 3  # before the database's expiry...
    assert all(live for _, _, live in table(pg).values())  # ...which has not come yet
    assert a.status().state == "lapsed" and a.owned() == old  # still polled, read-only
    wait_for(lambda: not any(live for _, _, live in table(pg).values()), 4,
             "the database's expiry")
    took = renewed(b)  # a is no longer live either: b's share is everything
    assert (took.live, len(took.taken)) == (1, SHARDS)
    assert all(took.taken[shard] > old[shard] for shard in range(SHARDS))
    back = renewed(a)
    assert back.mutable_before == {} and back.lost == tuple(range(SHARDS))
    assert (back.live, back.share, back.held) == (2, 128, {})


def test_a_lease_expired_but_not_taken_is_granted_again_with_a_new_token(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    a = open_manager(pg, "dom-a", lease_seconds=1)
    old = dict(renewed(a).taken)
    time.sleep(1.1)
    again = renewed(a)
    assert again.lost == tuple(range(SHARDS)) and sorted(again.taken) == list(range(SHARDS))
    assert min(again.taken.values()) > max(old.values())


def test_a_round_after_the_deadline_but_before_the_expiry_keeps_the_tokens(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    """The safety margin: no longer trusted here, still held in the database."""
    a = open_manager(pg, "dom-a", lease_seconds=3)
    tokens = dict(renewed(a).taken)
    wait_for(lambda: a.may_mutate(0) is None, 3, "the local deadline")
    assert all(live for _, _, live in table(pg).values())
    back = renewed(a)
    assert (back.mutable_before, back.lost, back.taken, dict(back.held)) == ({}, (), {}, tokens)
    assert a.mutable() == tokens


def test_release_all_hands_the_shards_over_at_once(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    a = open_manager(pg, "dom-a", lease_seconds=30)
    b = open_manager(pg, "dom-b", lease_seconds=30)
    renewed(a)
    renewed(b)
    a.release_all()
    assert a.may_mutate(0) is None and a.owned() == {}
    assert a.status().state == "stopped"
    assert [d.name for d in b.live_dominators()] == ["dom-b"]
    assert len(renewed(b).taken) == SHARDS  # no waiting for 30 s
    a.release_all()  # twice: nothing to do


def test_another_shard_count_is_refused(pg: str,
                                        open_manager: Callable[..., LeaseManager]) -> None:
    renewed(open_manager(pg, "dom-a"))
    other = open_manager(pg, "dom-b", shards=64)
    with pytest.raises(LeaseConfigError, match=r"splits the hosts into 256 shards, this "
                                                r"dominator into 64: every dominator on one "
                                                r"database must use the same count"):
        other.renew()


def test_live_dominators_show_shard_counts_and_ages(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    a = open_manager(pg, "dom-a", address="10.0.0.1:6970", lease_seconds=3)
    b = open_manager(pg, "dom-b", lease_seconds=3)
    first = time.monotonic()
    renewed(a)
    time.sleep(0.3)
    renewed(b)
    last = time.monotonic()
    renewed(a)
    listed = a.live_dominators()
    elapsed, since_last = time.monotonic() - first, time.monotonic() - last
    assert [(d.name, d.address, d.shards) for d in listed] == \
        [("dom-a", "10.0.0.1:6970", 128), ("dom-b", "", 0)]
    assert 0.3 <= (listed[0].lease_age or 0) <= elapsed and listed[1].lease_age is None
    assert 0 <= listed[0].renewal_age <= since_last  # a renewed last, b before it
    assert listed[0].renewal_age <= listed[1].renewal_age <= elapsed
    assert listed[0].started <= listed[0].last_renewal
    time.sleep(3.1)  # a renews no more: after one lease it is no longer listed
    renewed(b)
    assert [(d.name, d.shards) for d in b.live_dominators()] == [("dom-b", SHARDS)]


def test_a_forgotten_dominator_registers_again(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    a = open_manager(pg, "dom-a", lease_seconds=5)
    renewed(a)
    first_id = a.status().dominator_id
    engine = open_engine(pg)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM dominators"))
    engine.dispose()
    again = renewed(a)
    assert a.status().dominator_id != first_id
    assert again.lost == tuple(range(SHARDS)) and again.held == {}  # its old id's, unexpired


def test_concurrent_rounds_never_give_one_shard_to_two(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    """Eight managers renewing at the same instant, round after round."""
    managers = [open_manager(pg, f"dom-{n}", lease_seconds=30) for n in range(8)]
    barrier = threading.Barrier(len(managers))
    results: list[list[Renewal | None]] = [[] for _ in managers]

    def rounds(index: int) -> None:
        for _ in range(8):
            barrier.wait()
            results[index].append(managers[index].renew())
            barrier.wait()

    threads = [threading.Thread(target=rounds, args=(n,)) for n in range(len(managers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for round_number in range(8):
        held = [dict(r[round_number].held) for r in results if r[round_number] is not None]
        assert len(held) == len(managers)
        shards = [shard for one in held for shard in one]
        assert len(shards) == len(set(shards)), f"round {round_number}: a shard twice"
    final = [m.owned() for m in managers]
    assert sum(map(len, final)) == SHARDS
    assert max(map(len, final)) <= fair_share(SHARDS, 8)
    grants = table(pg)
    assert all(grants[shard][1] == token for owned in final for shard, token in owned.items())


def test_an_unreachable_database_lapses_the_leases_then_they_come_back(
        pg: str, open_manager: Callable[..., LeaseManager],
        caplog: pytest.LogCaptureFixture) -> None:
    url = make_url(pg)
    with FaultProxy(f"{url.host}:{url.port}", lifetime=120) as proxy:
        through = url.set(port=int(proxy.address.rpartition(":")[2]))
        manager = open_manager(through.render_as_string(hide_password=False), "dom-a",
                               lease_seconds=3)
        started = time.monotonic()
        tokens = dict(renewed(manager).taken)
        caplog.set_level(logging.INFO, logger="dominator.herd.leases")
        proxy.set_fault(Fault(reset=True))
        assert manager.renew() is None
        status = manager.status()
        assert status.state == "failing" and status.reason
        assert status.mutable == SHARDS  # still trusted until the deadline
        wait_for(lambda: manager.may_mutate(7) is None, 4, "the lease to lapse")
        assert time.monotonic() - started < 3
        for _ in range(3):
            assert manager.renew() is None
        status = manager.status()
        assert (status.state, status.mutable, status.owned) == ("lapsed", 0, SHARDS)
        said = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [(r.levelname, r.getMessage().split(" (")[0]) for r in said] == \
            [("WARNING", "shard lease renewal failed"), ("ERROR", "shard leases lapsed")]
        port = proxy.address.rpartition(":")[2]  # the latest failure's words, not the first's
        assert f"port {port} failed" in status.reason and f"port {port}" in said[0].getMessage()
        wait_for(lambda: not any(live for _, _, live in table(pg).values()), 4,
                 "the database's expiry too")
        proxy.clear()
        back = renewed(manager)
        assert manager.status().state == "ok" and manager.status().reason == ""
        assert back.lost == tuple(range(SHARDS))  # expired meanwhile: new grants
        assert all(back.taken[shard] > tokens[shard] for shard in range(SHARDS))
        assert "shard lease renewal works again" in caplog.text


def test_a_renewal_paused_with_its_rows_locked_does_not_hold_up_the_takeover(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    """A dominator stopped inside its renewal transaction holds row locks that peers
    skip: the server ends that transaction after a renew interval, so the shards
    move once expired instead of when the paused process wakes up."""
    engine = open_engine(pg)
    paused = threading.Event()

    def pause(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "UPDATE shard_leases SET expires_at" in statement and not paused.is_set():
            paused.set()
            time.sleep(5)  # idle in transaction, the renewed rows locked

    try:
        a = LeaseManager(engine, "dom-a", lease_seconds=1.5)
        b = open_manager(pg, "dom-b", lease_seconds=1.5)
        renewed(a)
        sa.event.listen(engine, "after_cursor_execute", pause)
        outcome: list[Renewal | None] = []
        stuck = threading.Thread(target=lambda: outcome.append(a.renew()))
        stuck.start()
        assert paused.wait(5)

        def b_holds_everything() -> bool:
            renewal = b.renew()
            return renewal is not None and len(renewal.held) == SHARDS

        wait_for(b_holds_everything, 4, "b to take every shard", every=0.1)
        assert stuck.is_alive()  # a is still paused
        stuck.join(10)
        assert outcome == [None] and a.status().state == "lapsed"  # its session was ended
        assert renewed(a).lost == tuple(range(SHARDS))
    finally:
        engine.dispose()


def test_database_sessions_notice_a_silent_server(pg: str) -> None:
    """A partition (no answer, no reset) ends a session within about half a minute, so a
    renewal stuck on one fails and the next starts afresh; the URL may override."""
    for url, idle in ((pg, "10"), (f"{pg}?keepalives_idle=7", "7")):
        engine = open_engine(url)
        try:
            with engine.connect() as connection:
                dsn = connection.connection.dbapi_connection.info.dsn  # type: ignore[union-attr]
        finally:
            engine.dispose()
        settings = dict(item.split("=", 1) for item in dsn.split())
        assert (settings["keepalives_idle"], settings["keepalives_interval"],
                settings["keepalives_count"], settings["tcp_user_timeout"]) == \
            (idle, "5", "3", "20000")


async def test_run_renews_in_the_background_and_gives_back_on_stop(
        pg: str, open_manager: Callable[..., LeaseManager]) -> None:
    manager = open_manager(pg, "dom-a", lease_seconds=3)
    stop = asyncio.Event()
    seen: list[Renewal | None] = []
    task = asyncio.create_task(manager.run(stop, seen.append))
    while len(seen) < 3:
        await asyncio.sleep(0.05)
    assert all(renewal is not None for renewal in seen)
    assert seen[-1] is not None and seen[-1].held == seen[0].taken  # renewed, same tokens
    stop.set()
    await asyncio.wait_for(task, 5)
    assert manager.status().state == "stopped" and manager.may_mutate(0) is None
    assert {owner for owner, _, _ in table(pg).values()} == {None}


# --- SQLite: one dominator owns everything ---------------------------------------------------


def test_sqlite_one_dominator_owns_every_shard_without_expiry(
        tmp_path: Path, open_manager: Callable[..., LeaseManager]) -> None:
    url = str(tmp_path / "mdb.sqlite")
    Mdb(url).close()
    manager = open_manager(url, "dom-a", lease_seconds=0.3)
    first = renewed(manager)
    assert (first.live, first.share, len(first.taken)) == (1, SHARDS, SHARDS)
    time.sleep(0.5)  # past the lease: SQLite leases do not lapse
    assert all(manager.may_mutate(shard) == first.taken[shard] for shard in range(SHARDS))
    again = renewed(manager)
    assert (dict(again.held), again.taken, again.lost) == (dict(first.taken), {}, ())
    assert manager.status().state == "ok"
    [listed] = open_manager(url, "reader", lease_seconds=15).live_dominators()
    assert (listed.name, listed.shards) == ("dom-a", SHARDS)


def test_sqlite_a_dominator_started_later_takes_over(
        tmp_path: Path, open_manager: Callable[..., LeaseManager],
        caplog: pytest.LogCaptureFixture) -> None:
    url = str(tmp_path / "mdb.sqlite")
    Mdb(url).close()
    old, new = open_manager(url, "dom-a"), open_manager(url, "dom-b")
    before = dict(renewed(old).taken)
    after = dict(renewed(new).taken)
    assert all(after[shard] > max(before.values()) for shard in range(SHARDS))
    lost = renewed(old)
    assert lost.lost == tuple(range(SHARDS)) and old.may_mutate(0) is None
    assert "a dominator started later on this SQLite database took its 256 shards" in caplog.text
    old.release_all()  # gives back nothing of the new one's
    assert renewed(new).held == after


def test_sqlite_refuses_another_shard_count_too(
        tmp_path: Path, open_manager: Callable[..., LeaseManager]) -> None:
    url = str(tmp_path / "mdb.sqlite")
    Mdb(url).close()
    renewed(open_manager(url, "dom-a", shards=16))
    with pytest.raises(FleetError, match="splits the hosts into 16 shards"):
        open_manager(url, "dom-b").renew()


# --- three processes -------------------------------------------------------------------------


class Runner:
    """One LeaseManager in its own process (tests.integration.leaserunner)."""

    def __init__(self, url: str, name: str, folder: Path) -> None:
        self.name = name
        self.out = folder / f"{name}.jsonl"
        self.log = folder / f"{name}.log"
        with self.out.open("w") as out, self.log.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.leaserunner", url, name,
                 "--lease", str(LEASE), "--shards", str(SHARDS), "--tick", "0.1"],
                stdout=out, stderr=err, cwd=PROJECT)

    def events(self, kind: str) -> list[dict[str, Any]]:
        """Its complete JSON lines of `kind` so far."""
        lines = self.out.read_text().split("\n")[:-1]  # the last may be half written
        return [event for event in map(json.loads, lines) if event["event"] == kind]

    def renewals(self) -> list[dict[str, Any]]:
        return self.events("renewal")

    def dominator_id(self) -> int:
        """Its id in the dominators table (from its last good round)."""
        return int(wait_for(lambda: [r["id"] for r in self.renewals() if r["ok"]], 20,
                            f"{self.name}'s first renewal")[-1])

    def stop(self) -> None:
        """SIGTERM (it gives its shards back) and wait; SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"{self.name} did not stop on SIGTERM: {self.log.read_text()}")


def fair(sampler: LeaseSampler, ids: set[int]) -> bool:
    """Every shard held unexpired, only by `ids`, each within its fair share."""
    owners = sampler.owners()
    share = fair_share(SHARDS, len(ids))
    return set(owners) == ids and sum(map(len, owners.values())) == SHARDS and \
        all(len(shards) <= share for shards in owners.values())


def assert_never_both_mutable(runners: list[Runner]) -> None:
    """From the managers' own reports every 100 ms: no shard was ever mutable for
    two grants at once, and each later grant has a higher token."""
    spans: dict[int, dict[int, list[Any]]] = {}  # shard -> token -> [first, last, name]
    for runner in runners:
        for tick in runner.events("tick"):
            for shard, token in tick["mutable"].items():
                span = spans.setdefault(int(shard), {}).setdefault(
                    token, [tick["t"], tick["t"], runner.name])
                assert span[2] == runner.name, f"token {token} held by two dominators"
                span[1] = tick["t"]
    assert spans, "no tick reported a mutable shard"
    for shard, by_token in spans.items():
        ordered = sorted(by_token.items(), key=lambda item: item[1][0])
        for (token, (_, last, name)), (later_token, (first, _, later_name)) in \
                itertools.pairwise(ordered):
            assert last < first and token < later_token, \
                f"shard {shard}: {name} (token {token}) mutable until {last}, " \
                f"{later_name} (token {later_token}) from {first}"


def assert_within_share(runner: Runner) -> None:
    for renewal in runner.renewals():
        if renewal["ok"]:
            assert len(renewal["held"]) <= renewal["share"], renewal


@pytest.fixture
def cluster(pg: str, tmp_path: Path) -> Iterator[tuple[LeaseSampler, list[Runner]]]:
    """The sampler and three managers in three processes ("lease-a/b/c"); at the end
    they stop (giving every shard back) and the invariants are checked."""
    sampler = LeaseSampler(pg).start()
    runners = [Runner(pg, f"lease-{name}", tmp_path) for name in "abc"]
    try:
        yield sampler, runners
        for runner in runners:
            runner.stop()
        wait_for(lambda: {owner for owner, _, _ in sampler.latest().values()} == {None}, 5,
                 "every shard given back on SIGTERM")
        for runner in runners:
            assert_within_share(runner)
        assert_never_both_mutable(runners)
    finally:
        for runner in runners:
            if runner.process.poll() is None:
                runner.process.kill()
                runner.process.wait()
        sampler.stop()


def settled(cluster: tuple[LeaseSampler, list[Runner]]) -> dict[str, int]:
    """Wait for every shard to be held within two lease periods of the first start, then
    for fair shares; name -> dominator id."""
    sampler, runners = cluster
    ids = {runner.name: runner.dominator_id() for runner in runners}
    first = min(runner.events("started")[0]["t"] for runner in runners)
    owned_at = wait_for(lambda: next(
        (t for t, rows in list(sampler.samples) if t > first and
         all(owner is not None and live for owner, _, live in rows.values())), None),
        30, "every shard owned")
    assert owned_at - first <= 2 * LEASE + SLACK
    wait_for(lambda: fair(sampler, set(ids.values())), 6 * LEASE, "fair shares")
    return ids


def test_three_dominators_share_fairly_and_take_over_a_killed_one(
        cluster: tuple[LeaseSampler, list[Runner]]) -> None:
    sampler, (a, b, c) = cluster
    ids = settled(cluster)
    killed = sampler.owners()[ids[c.name]]
    killed_at = time.monotonic()
    c.process.kill()
    c.process.wait()

    def moved() -> bool:
        owners = sampler.owners()
        return all(any(shard in owners.get(ids[r.name], ()) for r in (a, b)) for shard in killed)

    wait_for(moved, LEASE + INTERVAL + SLACK + 1, "the killed dominator's shards to move")
    # taken when they expire (its last renewal came before the kill), not a round later
    assert time.monotonic() - killed_at <= LEASE + 0.75
    wait_for(lambda: fair(sampler, {ids[a.name], ids[b.name]}), 4 * LEASE,
             "fair shares between the two left")


def test_a_stopped_dominator_loses_its_shards_and_knows_before_renewing(
        cluster: tuple[LeaseSampler, list[Runner]]) -> None:
    sampler, (a, b, c) = cluster
    ids = settled(cluster)
    tokens = {shard: token for shard, (owner, token, _) in sampler.latest().items()
              if owner == ids[b.name]}
    stopped_at = time.monotonic()
    b.process.send_signal(signal.SIGSTOP)

    def moved() -> bool:
        owners = sampler.owners()
        return all(any(shard in owners.get(ids[r.name], ()) for r in (a, c)) for shard in tokens)

    wait_for(moved, LEASE + INTERVAL + SLACK + 1, "the stopped dominator's shards to move")
    # Not before its lease could have expired (renewed at most an interval before the stop).
    assert time.monotonic() - stopped_at >= LEASE - INTERVAL - SAMPLE_EVERY
    time.sleep(max(0.0, stopped_at + LEASE + 1 - time.monotonic()))
    resumed_at = time.monotonic()
    b.process.send_signal(signal.SIGCONT)
    after = wait_for(lambda: [r for r in b.renewals() if r["ok"] and r["began"] > resumed_at],
                     10, "the resumed dominator's next good renewal")[0]
    assert after["mutable_before"] == {}  # it stopped itself before the database said so
    assert set(tokens) <= {int(shard) for shard in after["lost"]}
    for tick in b.events("tick"):
        if tick["t"] > resumed_at:
            stale = {shard for shard, token in tick["mutable"].items()
                     if tokens.get(int(shard)) == token}
            assert not stale, f"after SIGCONT, shards {stale} still mutable with old tokens"
    wait_for(lambda: fair(sampler, set(ids.values())), 6 * LEASE,
             "the resumed dominator's share back")


def test_ended_database_sessions_cause_no_double_ownership(
        cluster: tuple[LeaseSampler, list[Runner]], pg: str) -> None:
    sampler, (a, b, c) = cluster
    ids = settled(cluster)
    engine = open_engine(pg)
    ended = 0
    try:
        until = time.monotonic() + LEASE + 1
        while time.monotonic() < until:
            with engine.connect() as connection:
                ended += sum(1 for (done,) in connection.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'lease-b' AND datname = current_database()"))
                    if done)
            time.sleep(0.02)
    finally:
        engine.dispose()
    assert ended > 0
    ended_at = time.monotonic()
    wait_for(lambda: [t for t in b.events("tick") if t["t"] > ended_at and t["state"] == "ok"],
             4 * LEASE, "the dominator whose sessions were ended to renew again")
    wait_for(lambda: fair(sampler, set(ids.values())), 6 * LEASE, "fair shares again")
