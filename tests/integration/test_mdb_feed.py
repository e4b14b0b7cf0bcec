"""The MDB change feed on a real PostgreSQL (skipped without FLEET_TEST_POSTGRES_URL):
changes written by other connections are notified at once, bursts coalesce, and a
LISTEN session killed by the server is reopened with a backstop wake."""

from __future__ import annotations

import asyncio
import threading
import time

import sqlalchemy as sa

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
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            killed = connection.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND datname = current_database()")).scalars().all()
            assert killed == [True]
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
        admin.dispose()
        store.close()


def test_sqlite_has_no_feed(tmp_path) -> None:  # noqa: ANN001 - pytest's tmp_path
    with Mdb(str(tmp_path / "mdb.sqlite")) as store:
        assert open_feed(store.engine_url) is None
