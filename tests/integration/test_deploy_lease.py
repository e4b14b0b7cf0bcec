"""Deploy runner leases at the store's level, on a real database (a SQLite file and
PostgreSQL): each save is fenced by the runner's token, so a runner whose deploy
another dominator claimed (after expiry on PostgreSQL, at a restart on SQLite) writes
nothing; a cancel asked through another dominator reaches the runner's next round;
a deploy given back is claimed at once; one idempotency key makes one deploy."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from dominator.deploy.errors import Conflict
from dominator.deploy.model import Deploy, DeployStatus, HostProgress, Wave
from dominator.deploy.store import DeployStore, KeyUsed
from fleetlib.sql.engine import open_engine

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
