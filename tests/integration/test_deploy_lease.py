"""Deploy runner leases at the store's level, on a real database (a SQLite file and
PostgreSQL): each save is fenced by the runner's token, so a runner whose deploy
another dominator claimed (after expiry on PostgreSQL, at a restart on SQLite) writes
nothing; a cancel asked through another dominator reaches the runner's next round;
a deploy given back is claimed at once; one idempotency key makes one deploy. And
the engine on PostgreSQL through a fault proxy: a runner that cannot renew pauses its
deploy, then resumes it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dominator.deploy.engine import DeployEngine
from dominator.deploy.errors import Conflict
from dominator.deploy.lease import LeaseLost, RunnerLease
from dominator.deploy.model import Deploy, DeployStatus, HostProgress, Wave
from dominator.deploy.store import DeployStore, KeyUsed
from dominator.herd.herd import Sub
from dominator.herd.state import DominatorState
from dominator.herd.status import Status
from fleetlib.sql.engine import open_engine
from fleetlib.testing.faultproxy import Fault, FaultProxy
from mdb.machine import Machine
from mdb.store import Mdb
from tests.integration.test_deploy import FakeHerd, FakeImages, until

LEASE = 1.0


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    opened = open_engine(url)
    yield opened
    opened.dispose()


def new_deploy(deploy_id: str, hosts: list[str], key: str | None = None) -> Deploy:
    return Deploy(deploy_id, key, {"image": "v2", "select": {"hosts": hosts}},
                  [Wave("100%", len(hosts), hosts)], {h: HostProgress(1) for h in hosts})


def row(engine: sa.Engine, deploy_id: str) -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT runner, runner_token, reason, cancel_requested FROM deploys WHERE id = :id"),
            {"id": deploy_id}).one()


def test_a_stale_runner_writes_nothing(engine: sa.Engine) -> None:
    a = DeployStore(engine, "dom-a", LEASE)
    b = DeployStore(engine, "dom-b", LEASE)
    deploy = new_deploy("d1", ["h1", "h2"])
    token_a = a.insert(deploy)
    assert token_a is not None and row(engine, "d1")[:2] == ("dom-a", token_a)
    assert b.get("d1").runner == "dom-a"  # type: ignore[union-attr]
    deploy.reason = "a's first save"
    assert a.save(deploy, token_a)

    if a.postgres:  # another dominator claims only once the lease expired
        assert b.round({}, 5).claimed == []
        time.sleep(LEASE + 0.2)
        assert a.round({"d1": token_a}, 0).renewed == {}  # expired: not renewed
        taken = b.round({}, 5).claimed
    else:  # one dominator per SQLite file: a restarted one takes every running deploy
        assert b.round({}, 5).claimed == []
        taken = b.round({}, 5, mine=True).claimed
    [(claimed, token_b, previous)] = [(c.deploy, c.token, c.previous) for c in taken]
    assert claimed.id == "d1" and claimed.reason == "a's first save" and previous == "dom-a"
    assert token_b > token_a and row(engine, "d1")[:2] == ("dom-b", token_b)

    deploy.reason = "a's stale save"
    assert not a.save(deploy, token_a)  # refused by the token: nothing written
    assert row(engine, "d1").reason == "a's first save"
    assert b.round({"d1": token_b}, 5).renewed["d1"].token == token_b
    claimed.reason = "b's save"
    assert b.save(claimed, token_b)
    assert row(engine, "d1").reason == "b's save"


def test_cancel_through_another_dominator_reaches_the_runner(engine: sa.Engine) -> None:
    a = DeployStore(engine, "dom-a", LEASE)
    b = DeployStore(engine, "dom-b", LEASE)
    token = a.insert(new_deploy("d1", ["h1"]))
    assert token is not None
    asked = b.request_cancel("d1", False, 100.0)
    assert asked is not None and asked.cancel == {"rollback": False, "requestedUnix": 100.0}
    assert "canceling" in asked.progress() and asked.runner == "dom-a"
    assert a.round({"d1": token}, 0).renewed["d1"].cancel == asked.cancel
    b.request_cancel("d1", False, 200.0)  # a second one changes nothing
    b.request_cancel("d1", True, 300.0)  # one with rollback replaces one without
    assert a.round({"d1": token}, 0).renewed["d1"].cancel == {"rollback": True,
                                                               "requestedUnix": 300.0}
    # An ended deploy takes no request.
    ended = a.get("d1")
    assert ended is not None
    ended.status = DeployStatus.CANCELED
    assert a.save(ended, token)
    assert b.request_cancel("d1", True, 400.0).status == DeployStatus.CANCELED  # type: ignore
    assert b.request_cancel("nope", False, 1.0) is None


def test_a_released_deploy_is_claimed_at_once(engine: sa.Engine) -> None:
    a = DeployStore(engine, "dom-a", LEASE * 30)
    b = DeployStore(engine, "dom-b", LEASE * 30)
    token = a.insert(new_deploy("d1", ["h1"]))
    assert token is not None
    assert b.round({}, 5).claimed == []
    a.release({"d1": token})
    [taken] = b.round({}, 5).claimed
    claimed, token_b = taken.deploy, taken.token
    assert claimed.id == "d1" and token_b > token and taken.previous == ""
    assert not a.save(claimed, token)


def test_hosts_and_keys_are_one_deploy_across_dominators(engine: sa.Engine) -> None:
    a = DeployStore(engine, "dom-a", LEASE)
    b = DeployStore(engine, "dom-b", LEASE)
    a.insert(new_deploy("d1", ["h1", "h2"], key="pipeline-1"))
    with pytest.raises(Conflict, match="host h2 is in running deploy d1"):
        b.insert(new_deploy("d2", ["h2", "h3"]))
    with pytest.raises(KeyUsed, match="pipeline-1"):
        b.insert(new_deploy("d3", ["h4"], key="pipeline-1"))
    later = new_deploy("d4", ["h3"])
    later.created_unix = a.get("d1").created_unix + 0.25  # type: ignore[union-attr]
    assert b.insert(later) is not None
    assert [d.id for d in b.newest(10)] == ["d4", "d1"]  # to the sub-second, on PostgreSQL too
    assert a.get("d4").created_unix == later.created_unix  # type: ignore[union-attr]


def test_trust_ends_a_third_of_the_lease_before_the_database_expires_it() -> None:
    lease = RunnerLease(3.0, expires=True)
    lease.tokens["d1"] = 7
    with pytest.raises(LeaseLost, match="no lease round succeeded") as before:
        lease.check("d1")
    assert before.value.paused
    lease.renewed(time.monotonic())
    assert lease.check("d1") == 7
    lease.renewed(time.monotonic() - 2.05)  # began 2 s ago: lease 3 s less margin 1 s
    with pytest.raises(LeaseLost, match="paused") as lapsed:
        lease.check("d1")
    assert lapsed.value.paused
    with pytest.raises(LeaseLost, match="no longer runs it") as lost:
        lease.check("d2")
    assert not lost.value.paused
    assert RunnerLease(3.0, expires=False).trusted()  # SQLite: one dominator, no expiry


class ProxiedState:
    """The dominator state with its shared database reached through `database` (a
    fault proxy's): what the deploy engine keeps there fails with it; the rest works."""

    def __init__(self, state: DominatorState, database: sa.Engine) -> None:
        self._state = state
        self.database = database

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


async def test_a_runner_that_cannot_renew_pauses_then_resumes(
        tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The database gone for longer than the lease: the runner stops mutating (no host
    of the next wave is told the image, nothing saved), the deploy stays RUNNING (paused,
    not failed), and once the database is back the runner claims it again and it ends
    SUCCEEDED."""
    caplog.set_level(logging.INFO, logger="dominator.deploy")
    Mdb(postgres_url).close()  # at head first
    state = DominatorState(tmp_path / "state.sqlite")
    mdb = Mdb(str(tmp_path / "mdb.sqlite"))
    for name in ("h1", "h2"):
        mdb.set(Machine(name, required_image="v1"))
        state.record_sync(name, "v1", {})
    herd = FakeHerd(state)
    herd.subs = {m.hostname: Sub(m) for m in mdb.list()}
    parsed = make_url(postgres_url)
    with FaultProxy(f"{parsed.host}:{parsed.port}") as proxy:
        proxied = open_engine(parsed.set(port=int(proxy.address.rsplit(":", 1)[1]))
                              .render_as_string(hide_password=False))
        engine = DeployEngine(herd, ProxiedState(state, proxied),  # type: ignore[arg-type]
                              mdb, FakeImages(), tick=0.02, name="dom-a",
                              lease_seconds=LEASE * 2)
        await engine.start()

        def converge(name: str) -> None:
            herd.subs[name].machine = mdb.get(name)  # type: ignore[assignment]
            state.record_sync(name, "v2", {})
            herd.subs[name].set_status(Status.SYNCED)

        deploy, _ = await engine.submit({"image": "v2", "select": {"hosts": ["h1", "h2"]},
                                         "waves": ["1", "100%"]}, None)
        await until(lambda: mdb.get("h1").required_image == "v2", "h1 is told v2")
        await until(lambda: herd.subs["h1"].listeners, "the engine watches h1")
        proxy.set_fault(Fault(reset=True))
        proxy.reset_all()
        converge("h1")  # the deploy would now save and start h2: it cannot
        await until(lambda: deploy.id not in engine._running, "the deploy pauses", 10)
        await asyncio.sleep(LEASE * 2 + 0.5)  # past the lease by the database's clock too
        assert mdb.get("h2").required_image == "v1"
        assert "paused" in caplog.text

        proxy.clear()
        await until(lambda: mdb.get("h2").required_image == "v2", "h2 is told v2", 20)
        await until(lambda: herd.subs["h2"].listeners, "the engine watches h2")
        converge("h2")
        await until(lambda: (d := engine.store.get(deploy.id)) is not None
                    and d.status != "RUNNING", "the deploy ends", 20)
        ended = engine.store.get(deploy.id)
        assert ended is not None and ended.status == "SUCCEEDED", ended
        assert ended.runner == "dom-a"
        await engine.stop()
        proxied.dispose()
    mdb.close()
    state.close()
