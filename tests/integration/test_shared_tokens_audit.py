"""The HTTP API's tokens and the audit log shared by the dominators of one PostgreSQL
MDB (issue 11; FLEET_TEST_POSTGRES_URL, skipped without it): in process, two token
stores on one database (a token made through one works on the other at once, a
revocation holds there within the refresh, a flood of unknown tokens costs a read a
second) and two audit logs on one table, append-only there too; and two real
`dominator serve`: a token made through A authenticates on B's deploy HTTP API and,
revoked through A, is refused by B within the bound; a change made through A is in
`dominator audit` through B, naming the dominator that recorded it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from dominator.herd.state import DominatorState, shared_url
from dominator.herd.tokenstore import MISS_REREAD_SECONDS, ApiTokens
from fleetlib.auditlog import AuditLog
from fleetlib.errors import ExistsError, FleetError
from fleetlib.sql.engine import open_engine
from fleetlib.testing.daemons import Daemon, cli
from fleetlib.testing.dominators import Dominators
from fleetlib.testing.fleet import wait_for
from mdb.store import Mdb
from tests.integration.test_shared_state import drop_database, recreate_database

REFRESH = 2.0  # seconds: the token stores' re-read (the default, as serve runs it)
REVOKED_WITHIN = REFRESH + 3.0  # and a loaded machine's slack


class CountingTokens(ApiTokens):
    """The real store, counting its reads of the database."""

    reads = 0

    def reload(self) -> None:
        self.reads += 1
        super().reload()


def test_two_token_stores_share_tokens(
        two_states: tuple[DominatorState, DominatorState]) -> None:
    a, b = (ApiTokens(state, REFRESH) for state in two_states)
    try:
        token, value = a.create("ci", "deploy", "alice")
        checked = b.check(value)  # unknown to B's memory: re-read at once
        assert checked is not None and (checked.name, checked.scope) == ("ci", "deploy")
        assert [t.name for t in b.list()] == ["ci"]
        with pytest.raises(ExistsError, match="names are never reused"):
            b.create("ci", "read", "bob")

        a.revoke("ci", "alice")
        revoked = time.monotonic()
        wait_for(lambda: b.check(value) is None, "B refuses the revoked token",
                 REVOKED_WITHIN)
        assert time.monotonic() - revoked < REVOKED_WITHIN
        with pytest.raises(FleetError, match="revoked already"):
            b.revoke("ci", "bob")
        ci, = b.list()
        assert ci.revoked_by == "alice" and ci.created_by == "alice" and ci.last_used_unix
        assert token.created_unix == ci.created_unix
    finally:
        a.close()
        b.close()


def test_a_flood_of_unknown_tokens_costs_a_read_a_second(
        two_states: tuple[DominatorState, DominatorState]) -> None:
    tokens = CountingTokens(two_states[0], refresh_seconds=3600)  # no periodic re-read
    try:
        started, first = time.monotonic(), tokens.reads
        while time.monotonic() - started < 2.5:
            assert tokens.check("fdt_not-a-token") is None
        assert 1 <= tokens.reads - first <= 2.5 / MISS_REREAD_SECONDS + 1
    finally:
        tokens.close()


def test_a_file_state_reads_its_tokens_once(tmp_path: Path) -> None:
    """Not shared: the state file has one writer, so a miss reads nothing."""
    tokens = CountingTokens(DominatorState(tmp_path / "dominator.sqlite"))
    for _ in range(5):
        assert tokens.check("fdt_not-a-token") is None
    assert tokens.reads == 1 and not tokens.shared


def test_tokens_while_the_database_is_gone(
        tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Checks go on from memory (logged once per outage); making and revoking say in
    one line which database failed."""
    with Mdb(postgres_url):
        pass
    state = DominatorState(tmp_path / "dominator.sqlite", postgres_url, refresh_seconds=3600)
    tokens = ApiTokens(state, refresh_seconds=0.2)
    try:
        _, value = tokens.create("ci", "deploy", "alice")
        with caplog.at_level(logging.WARNING, logger="dominator.herd.tokenstore"):
            drop_database(postgres_url)
            wait_for(lambda: "unreadable, keeping those last read" in caplog.text,
                     "the failing refresh logged", 10)
            checked = tokens.check(value)
            assert checked is not None and checked.name == "ci"
            assert tokens.check("fdt_not-a-token") is None
            for attempt in (lambda: tokens.create("other", "read", "alice"),
                            lambda: tokens.revoke("ci", "alice"), tokens.list):
                with pytest.raises(FleetError, match=r"^database postgresql\+psycopg://") as err:
                    attempt()
                assert "\n" not in str(err.value)
        assert caplog.text.count("keeping those last read") == 1
    finally:
        tokens.close()
        state.close()
        recreate_database(postgres_url)  # for the fixture to drop


def test_tokens_of_the_state_file_are_shared_as_it_starts(
        tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Tokens made before the state was shared keep working once it is; a name the
    shared database has for another token is left out, and said."""
    path = tmp_path / "dominator.sqlite"
    alone = ApiTokens(DominatorState(path))
    _, kept = alone.create("ci", "deploy", "alice")
    _, clashing = alone.create("dashboards", "read", "alice")
    with Mdb(postgres_url):
        pass
    other = DominatorState(tmp_path / "other.sqlite", postgres_url)
    ApiTokens(other).create("dashboards", "read", "bob")
    other.close()
    state = DominatorState(path, shared_url(postgres_url))
    try:
        with caplog.at_level(logging.INFO, logger="dominator.herd.tokenstore"):
            shared = ApiTokens(state, REFRESH)
        checked = shared.check(kept)
        assert checked is not None and checked.name == "ci"
        assert shared.check(clashing) is None
        assert "copied 1 token(s) of the state file to the shared database: ci" in caplog.text
        assert "token(s) dashboards of the state file not shared" in caplog.text
        shared.close()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dominator.herd.tokenstore"):
            ApiTokens(state, REFRESH).close()  # once: a restart copies nothing more
        assert "copied" not in caplog.text
    finally:
        state.close()


def test_two_audit_logs_share_one_append_only_table(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    try:
        a, b = AuditLog(engine, "dominator a"), AuditLog(engine, "dominator b")
        first = a.record("alice", "updates.disable", "disabled updates fleet-wide: x")
        second = b.record("bob", "updates.enable", "enabled updates fleet-wide")
        assert second.id > first.id
        for log in (a, b):
            assert [(e.server, e.who, e.action) for e in log.entries()] == [
                ("dominator a", "alice", "updates.disable"),
                ("dominator b", "bob", "updates.enable")]
        assert [e.who for e in a.entries(limit=1)] == ["bob"]
        assert a.entries(since_unix_ns=second.unix_ns + 1) == []
        with pytest.raises(ValueError, match="secrets"):
            a.record("carol", "token.create", "created", token="fdt_secret")
        for statement in ("UPDATE audit_log SET who = 'mallory'", "DELETE FROM audit_log",
                          "TRUNCATE audit_log"):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(sa.text(statement))
        assert len(a.entries()) == 2
    finally:
        engine.dispose()


@pytest.fixture
def two_dominators(tmp_path: Path, ca: Path, postgres_url: str, imageserver: Daemon
                   ) -> Iterator[Dominators]:
    with Mdb(postgres_url):  # at head before two dominators race to open it
        pass
    started = Dominators(tmp_path, ca, postgres_url, imageserver, ["dom-a", "dom-b"], "3")
    started.start()
    yield started
    started.stop()


def test_tokens_and_audit_through_either_dominator(two_dominators: Dominators) -> None:
    doms = two_dominators

    def deploys_on_b(value: str) -> int:
        return httpx.get(f"{doms.http['dom-b']}/v1/deploys", timeout=30,
                         headers={"Authorization": f"Bearer {value}"}).status_code

    value = doms.run("dom-a", "tokens", "create", "dashboards", "--scope", "read").strip()
    assert value.startswith("fdt_")
    assert deploys_on_b(value) == 200  # at once: B re-reads on a digest it does not know
    listed = {t["name"]: t for t in json.loads(doms.run("dom-b", "tokens", "list", "--json"))}
    assert not listed["dashboards"]["revoked"]
    again = cli("tokens", "create", "dashboards", "--scope", "read",
                env={**doms.env, "DOMINATOR_ADDRESS": doms.daemons["dom-b"].address})
    assert again.returncode == 4 and "names are never reused" in again.stderr

    doms.run("dom-a", "tokens", "revoke", "dashboards")
    revoked = time.monotonic()
    wait_for(lambda: deploys_on_b(value) == 401, "B refuses the revoked token",
             REVOKED_WITHIN)
    assert time.monotonic() - revoked < REVOKED_WITHIN

    doms.run("dom-a", "fleet", "disable-updates", "--reason", "freeze for the audit")
    doms.run("dom-b", "fleet", "enable-updates")
    for name in ("dom-a", "dom-b"):
        entries = json.loads(doms.run(name, "audit", "--json"))
        mine = [(e["server"], e["action"], e["details"].get("name")) for e in entries
                if e["server"].startswith("dominator")]
        assert mine == [("dominator dom-a", "token.create", "dashboards"),
                        ("dominator dom-a", "token.revoke", "dashboards"),
                        ("dominator dom-a", "updates.disable", None),
                        ("dominator dom-b", "updates.enable", None)], name
        disabled, = [e for e in entries if e["action"] == "updates.disable"]
        assert "freeze for the audit" in disabled["summary"]
    lines = doms.run("dom-b", "audit").splitlines()
    assert " dominator dom-b " in lines[-1] and lines[-1].endswith("enabled updates fleet-wide")
    ours = [line for line in lines if line.split()[1] == "dominator"]
    assert len({line.index(line.split()[3]) for line in ours}) == 1  # who: one column
