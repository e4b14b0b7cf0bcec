"""Several dominators on one PostgreSQL MDB (FLEET_TEST_POSTGRES_URL; skipped without
it): real `dominator serve` processes, real subd, mutual TLS on loopback. Each host is
managed by exactly one dominator (a sampler reads the lease table every 100 ms for
the whole test: no shard ever has two owners, every shard owned within two lease
periods); a SIGKILLed one's hosts move and converge; one SIGSTOPped past its lease
comes back to find its stale calls refused by subd. And the
herd's side of the leases in this process: SQLite owns everything, a fenced refusal
stops a shard's mutations until the next round."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from dominator.herd.leases import shard_of
from dominator.herd.ownership import Ownership
from fleetlib.testing.daemons import TRACEBACK_RE, Daemon, cli
from fleetlib.testing.dominators import Dominators, manages
from fleetlib.testing.fleet import wait_for
from fleetlib.testing.trees import make_tree
from mdb.machine import Machine
from mdb.store import Mdb

HOSTS = 6
LEASE = "3"
# serve --test-mutation-delay of the one to stop: a window to stop it in, between its
# lease check and its call, that a loaded machine cannot miss
DELAY = "4"
STOPPED = "dom-3"
REFUSED = "refused: fenced: token"  # subd's log line of a fenced refusal
@pytest.fixture
def dominators(tmp_path: Path, ca: Path, postgres_url: str, imageserver: Daemon
               ) -> Iterator[Dominators]:
    started = Dominators(tmp_path, ca, postgres_url, imageserver,
                         [f"dom-{index}" for index in range(1, 4)], LEASE,
                         {STOPPED: ["--test-mutation-delay", DELAY]})
    yield started
    started.stop()


def rename_into(url: str, owner: str, host: str, subs: dict[str, Daemon]) -> str:
    """Give `host`'s subd a new MDB name whose shard `owner` holds; the new name."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            held = set(connection.execute(sa.text(
                "SELECT s.shard FROM shard_leases s JOIN dominators d ON d.id = s.owner "
                "WHERE d.name = :name AND s.expires_at > now()"), {"name": owner}).scalars())
    finally:
        engine.dispose()
    name = next(f"renamed-{i}" for i in itertools.count() if shard_of(f"renamed-{i}") in held)
    subs[name] = subs.pop(host)
    with Mdb(url) as mdb:
        mdb.delete(host)
        mdb.set(Machine(name, address=subs[name].address, required_image="v2"))
    return name


def log_since(path: Path, offset: int) -> str:
    return path.read_bytes()[offset:].decode(errors="replace")


def test_three_dominators_share_fail_over_and_fence(
        tmp_path: Path, postgres_url: str, dominators: Dominators,
        start_subd: Callable[..., Daemon]) -> None:
    doms = dominators
    names = [f"host-{index}" for index in range(1, HOSTS + 1)]
    subs = {}
    for name in names:
        (tmp_path / name).mkdir()
        subs[name] = start_subd(tmp_path / name)
    tree = make_tree(tmp_path / "tree")
    for image in ("v1", "v2", "v3"):
        doms.add_image(image, tree)
    with Mdb(postgres_url) as mdb:  # at head before three dominators race to open it
        for name in names:
            mdb.set(Machine(name, address=subs[name].address, required_image="v1"))
    doms.start()  # and the lease sampler, which checks no shard ever has two owners
    every = list(doms.daemons)
    assert doms.sampler is not None
    doms.owned_in_time()

    # Every host managed by exactly one dominator, converged; fleet list --json agrees.
    wait_for(lambda: doms.sampler and doms.sampler.owned_by(every),
             "the shards shared by three", 30)
    managed = wait_for(lambda: doms.converged(names, "v1", every), "v1 everywhere", 90)
    listed = {name: {host["hostname"]: host for host in json.loads(
        doms.run(name, "fleet", "list", "--json"))} for name in every}
    for host, manager in managed.items():
        assert {view[host]["owner"] for view in listed.values()} == {manager}
    live = json.loads(doms.run("dom-2", "fleet", "dominators", "--json"))
    assert sorted(row["name"] for row in live["dominators"]) == every
    assert sum(row["shards"] for row in live["dominators"]) == live["shards"] == 256
    assert [row["name"] for row in live["dominators"] if row["answering"]] == ["dom-2"]
    metrics = httpx.get(f"{doms.http['dom-2']}/metrics", timeout=10).text
    assert 'dominator_lease_state{state="ok"} 1.0' in metrics
    assert re.search(r"^dominator_shards_owned [1-9]", metrics, re.MULTILINE)
    assert re.search(r"^dominator_lease_renewals_failed_total ", metrics, re.MULTILINE)
    listing = doms.run("dom-1", "fleet", "list")
    assert "MANAGED BY" in listing.splitlines()[0] or len(set(managed.values())) == 1
    table = doms.run("dom-1", "fleet", "dominators")
    assert "dom-1 (this one)" in table and "dom-3" in table

    # SIGKILL the busier of the other two: its hosts move to the others within 20 s and
    # converge on an MDB change made after the kill.
    victim = max(["dom-1", "dom-2"],
                 key=lambda name: sum(1 for m in managed.values() if m == name))
    moved = [host for host, manager in managed.items() if manager == victim]
    survivors = [name for name in every if name != victim]
    doms.daemons[victim].kill()
    killed, killed_unix = time.monotonic(), int(time.time())
    with Mdb(postgres_url) as mdb:
        for host in names:
            mdb.update(host, required_image="v2")

    def moved_over() -> bool:  # each managed by one survivor, and polled since the kill
        views = doms.managers(survivors)
        if not all(host in view for view in views.values() for host in moved):
            return False
        managing = [[view[host] for name, view in views.items() if manages(name, view[host])]
                    for host in moved]
        return all(len(hosts) == 1 and hosts[0]["last_poll_unix"] >= killed_unix
                   for hosts in managing)
    wait_for(moved_over, f"{moved} managed by {survivors}", 20)
    assert time.monotonic() - killed < 20
    managed = wait_for(lambda: doms.converged(names, "v2", survivors), "v2 everywhere", 90)

    # SIGSTOP one while it holds a mutation between its lease check and the call, past
    # its lease; its hosts move and converge on a later change; after SIGCONT subd
    # refuses its stale call, and the hosts stay on the later image.
    stopped = STOPPED
    other = next(name for name in survivors if name != stopped)
    its_hosts = [host for host, manager in managed.items() if manager == stopped]
    if not its_hosts:  # none of its shards holds a host (1 in 64): rename one into them
        its_hosts = [rename_into(postgres_url, stopped, names[0], subs)]
        wait_for(lambda: doms.converged(its_hosts, "v2", [stopped]), "the renamed host", 60)
    daemon = doms.daemons[stopped]
    offset = daemon.log_path.stat().st_size
    with Mdb(postgres_url) as mdb:
        for host in its_hosts:
            mdb.update(host, required_image="v3")
    wait_for(lambda: "test delay: holding fetch" in log_since(daemon.log_path, offset),
             f"{stopped} about to fetch v3", 30)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: all(manages(other, doms.view(other).get(host, {"owner": ""}))
                             for host in its_hosts),
                 f"{its_hosts} managed by {other}", 20)
        with Mdb(postgres_url) as mdb:
            for host in its_hosts:
                mdb.update(host, required_image="v1")
        wait_for(lambda: doms.converged(its_hosts, "v1", [other]), f"{its_hosts} on v1 by "
                 f"{other}", 60)
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    wait_for(lambda: any(REFUSED in subs[host].log() for host in its_hosts),
             "a subd refusing the stopped dominator's stale call", 20)
    refusal = next(line for host in its_hosts for line in subs[host].log().splitlines()
                   if REFUSED in line)
    assert f"from {stopped} is older than" in refusal and f"from {other}" in refusal
    wait_for(lambda: "not mutating that shard's hosts" in log_since(daemon.log_path, offset),
             f"{stopped} logging the refusal", 10)
    final = wait_for(lambda: doms.converged(its_hosts, "v1", survivors), "back on v1", 60)
    assert set(final.values()) <= set(survivors)
    live = json.loads(doms.run(other, "fleet", "dominators", "--json"))
    assert sorted(row["name"] for row in live["dominators"]) == sorted(survivors)


async def test_sqlite_owns_every_host_and_fences_its_calls(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mdb.sqlite'}"
    Mdb(url).close()
    ownership = Ownership(url)
    await ownership.start("solo", "localhost:6970")
    assert ownership.polls("host-1") and ownership.owner("host-1") == "solo"
    assert ownership.elsewhere("host-1") == "" and ownership.why_not("host-1") == ""
    fence = await ownership.fence("host-1", "fetch")
    assert fence is not None and fence.owner == "solo" and fence.token > 0
    stop = asyncio.Event()
    stop.set()
    await ownership.run(stop)  # gives the shards back, closes
    assert ownership.leases.status().state == "stopped"


async def test_a_fenced_refusal_stops_the_shard_until_the_next_round(
        postgres_url: str) -> None:
    Mdb(postgres_url).close()
    ownership = Ownership(postgres_url, lease_seconds=3)
    await ownership.start("dom-a", "a:1")
    fence = await ownership.fence("host-1", "update")
    assert fence is not None
    ownership.refused("host-1", fence, "fenced: token 5 from dom-a is older than 9 from b")
    assert await ownership.fence("host-1", "update") is None
    assert "refused this dominator's token" in ownership.why_not("host-1")
    assert ownership.polls("host-1")  # still polled, read-only
    sibling = next(f"host-{i}" for i in range(2, 2000)
                   if ownership.shard(f"host-{i}") == ownership.shard("host-1"))
    assert await ownership.fence(sibling, "fetch") is None  # the whole shard
    other = next(f"host-{i}" for i in range(2, 2000)
                 if ownership.shard(f"host-{i}") != ownership.shard("host-1"))
    assert await ownership.fence(other, "fetch") is not None  # other shards go on
    stop = asyncio.Event()
    ownership.changed.clear()
    rounds = asyncio.create_task(ownership.run(stop))
    await asyncio.wait_for(ownership.changed.wait(), 10)  # the next round: still ours
    assert await ownership.fence("host-1", "update") == fence
    stop.set()
    await rounds  # gives every shard back
    assert await ownership.fence("host-1", "update") is None


async def test_a_dominator_splitting_hosts_otherwise_is_refused(
        tmp_path: Path, ca: Path, postgres_url: str) -> None:
    Mdb(postgres_url).close()
    first = Ownership(postgres_url)
    await first.start("dom-a", "a:1")  # fixes 256 shards
    await first.close()
    result = await asyncio.to_thread(
        cli, "serve", "--state-dir", str(tmp_path / "state"), "--mdb-url", postgres_url,
        "--imageserver", "127.0.0.1:1", "--port", "0", "--http-port", "0",
        "--tls-dir", str(ca / "dominator"), "--shards", "64", timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert not TRACEBACK_RE.search(result.stderr), result.stderr
    assert "splits the hosts into 256 shards, this dominator into 64" in \
        result.stderr.strip().splitlines()[-1]
