"""The MDB change feed on a real PostgreSQL (skipped without FLEET_TEST_POSTGRES_URL):
changes written by other connections are notified at once, bursts coalesce, and a
LISTEN session killed by the server is reopened with a backstop wake; a real `dominator
serve` sees an MDB change in well under a second with a backstop of a minute."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, free_port
from fleetlib.testing.fleet import wait_for
from mdb.feed import MdbFeed, open_feed
from mdb.machine import Machine
from mdb.store import Mdb

BACKSTOP = 60.0  # far beyond every wait below: only a notification can wake the tests


async def started(url: str) -> tuple[Mdb, MdbFeed, list[str]]:
    """The MDB at `url`, its feed open and up, and the list its reconnects land in."""
    store = Mdb(url)
    reconnects: list[str] = []
    feed = open_feed(store.engine_url, on_reconnect=lambda: reconnects.append("x"))
    assert feed is not None
    feed.start()
    assert await feed.wait(10) == "reconnected"  # the first opening wakes the follower too
    return store, feed, reconnects


async def test_a_change_by_another_engine_is_notified_within_a_second(
        postgres_url: str) -> None:
    store, feed, _ = await started(postgres_url)
    other = Mdb(postgres_url)
    try:
        latencies = []
        for n in range(5):
            began = time.perf_counter()
            await asyncio.to_thread(other.set, Machine(f"host{n}", required_image="web/1"))
            assert await feed.wait(BACKSTOP) == "notified"
            latencies.append(time.perf_counter() - began)
            assert feed.revision == store.revision()
        print(f"MDB feed latency (write + commit + notify), s: "
              f"{', '.join(f'{s:.4f}' for s in latencies)}")
        assert max(latencies) < 1.0
        # SQL straight into machines moves the revision (once per transaction) and is
        # notified too.
        before = store.revision()
        engine = sa.create_engine(postgres_url)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE machines SET required_image = 'web/9'"))
            connection.execute(sa.text("DELETE FROM machines WHERE hostname = 'host4'"))
        engine.dispose()
        assert await feed.wait(5) == "notified"
        assert feed.revision == store.revision() == before + 1
        # A write that changes nothing commits nothing: no notification.
        await asyncio.to_thread(other.set, Machine("host0", required_image="web/9"))
        assert await feed.wait(1.5) == "timeout"
    finally:
        feed.stop()
        other.close()
        store.close()


async def test_a_burst_coalesces_into_few_wakes_ending_at_the_last_revision(
        postgres_url: str) -> None:
    store, feed, _ = await started(postgres_url)
    other = Mdb(postgres_url)

    def burst() -> None:
        for n in range(100):
            other.set(Machine("burst", required_image=f"web/{n}"))

    try:
        writer = threading.Thread(target=burst)
        writer.start()
        reads, seen = 0, -1
        while writer.is_alive() or seen != store.revision():
            if await feed.wait(5) == "timeout":
                break
            reads += 1
            seen = await asyncio.to_thread(store.revision)
            await asyncio.sleep(0.05)  # a follower's read of the table takes a while
        writer.join()
        final = store.revision()
        print(f"burst of 100 changes: {reads} wakes, final revision {final}")
        assert seen == final and feed.revision == final
        assert store.get("burst") == Machine("burst", required_image="web/99")
        assert reads < 50
    finally:
        feed.stop()
        other.close()
        store.close()


async def test_a_killed_listen_session_reconnects_and_wakes_for_a_backstop_read(
        postgres_url: str) -> None:
    store, feed, reconnects = await started(postgres_url)
    try:
        assert kill_listeners(postgres_url) == [True]
        # Written while the feed is down or reopening: its notification may be lost,
        # the wake after reopening makes the follower read it.
        await asyncio.to_thread(store.set, Machine("meanwhile", required_image="web/2"))
        woken = []
        began = time.perf_counter()
        while "reconnected" not in woken:
            woken.append(await feed.wait(10))
            assert woken[-1] != "timeout"
        print(f"feed reopened after {time.perf_counter() - began:.2f} s: {woken}")
        assert reconnects == ["x"] and feed.up
        assert store.get("meanwhile") is not None
        await asyncio.to_thread(store.set, Machine("after", required_image="web/3"))
        assert await feed.wait(BACKSTOP) == "notified"
    finally:
        feed.stop()
        store.close()


def kill_listeners(url: str) -> list[bool]:
    """pg_terminate_backend of every LISTEN session on the database at `url`."""
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            return list(connection.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND datname = current_database()")).scalars())
    finally:
        admin.dispose()


def test_a_dominator_sees_a_required_image_change_at_once(
        tmp_path: Path, ca: Path, postgres_url: str, imageserver: Daemon) -> None:
    hosts = ["web1", "web2"]
    with Mdb(postgres_url) as store:
        for host in hosts:  # nothing listens there: the hosts stay unreachable
            store.set(Machine(host, address="127.0.0.1:1", required_image="v1"))
    http = f"http://127.0.0.1:{free_port()}"
    dominator = Daemon(
        "dominator.cli", ["serve", "--state-dir", str(tmp_path / "dom"), "--mdb-url",
                          postgres_url, "--imageserver", imageserver.address,
                          "--http-port", http.rsplit(":", 1)[1], "--token", "t",
                          "--tls-dir", str(ca / "dominator"), "--mdb-backstop", "60"],
        "dominator", free_port(), Security.from_options(str(ca / "admin"), False),
        tmp_path / "dominator.log")

    def required() -> dict[str, str]:
        try:
            reply = httpx.get(f"{http}/hosts.json", timeout=10)
            reply.raise_for_status()
        except httpx.HTTPError:
            return {}
        return {host["hostname"]: host["required_image"] for host in reply.json()["hosts"]}

    def metric(name: str) -> float:
        text = httpx.get(f"{http}/metrics", timeout=10).text
        return next(sample.value for family in text_string_to_metric_families(text)
                    for sample in family.samples if sample.name == name)

    def seen_after(change: Callable[[], None], image: str) -> float:
        began = time.perf_counter()
        change()
        while set(required().values()) != {image}:  # finer than wait_for's steps
            assert time.perf_counter() - began < 10, f"{image} not in the view in 10 s"
            time.sleep(0.01)
        return time.perf_counter() - began

    def through_store(image: str) -> Callable[[], None]:
        def change() -> None:
            with Mdb(postgres_url) as store:
                for host in hosts:
                    store.update(host, required_image=image)
        return change

    def through_sql() -> None:
        engine = sa.create_engine(postgres_url)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE machines SET required_image = 'v3'"))
        engine.dispose()

    dominator.start()
    try:
        wait_for(lambda: set(required().values()) == {"v1"}, "the hosts in the view", 30)
        latencies = [seen_after(through_store(f"v2-{n}"), f"v2-{n}") for n in range(3)]
        latencies.append(seen_after(through_sql, "v3"))
        print(f"dominator view latency of MDB changes, s: "
              f"{', '.join(f'{s:.3f}' for s in latencies)}")
        assert max(latencies) < 1.0
        assert metric("dominator_mdb_notifications_total") >= 4

        # Its LISTEN session killed: a change made meanwhile is read on reopening.
        backstop_reads = metric("dominator_mdb_backstop_reads_total")
        assert kill_listeners(postgres_url) == [True]
        seen = seen_after(through_store("v4"), "v4")
        print(f"change made as the feed was killed seen after {seen:.3f} s")
        assert seen < 10
        wait_for(lambda: metric("dominator_mdb_feed_reconnects_total") == 1,
                 "the feed reopened", 10)
        assert metric("dominator_mdb_backstop_reads_total") > backstop_reads
        assert seen_after(through_store("v5"), "v5") < 1.0
        log = dominator.log()
        assert "MDB change feed" in log and " down (reconnecting" in log
    finally:
        dominator.stop()


def test_sqlite_has_no_feed(tmp_path: Path) -> None:
    with Mdb(str(tmp_path / "mdb.sqlite")) as store:
        assert open_feed(store.engine_url) is None
