"""Schema migrations through Alembic (fleetlib.sql.schema) on real SQLite files and a real
PostgreSQL: new databases at head, databases of the hand-written runner taken over with
their data, older schemas refused on PostgreSQL until `dominator db upgrade`, newer ones
refused everywhere, upgraders taking turns, and `dominator db status`."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from dominator.deploy.store import HISTORY as DEPLOYS
from dominator.deploy.store import DeployStore
from dominator.herd.state import HISTORY as STATE
from dominator.herd.state import STATE_FILE, DominatorState
from fleetlib.auditlog import HISTORY as AUDIT
from fleetlib.auditlog import AuditLog
from fleetlib.errors import FleetError
from fleetlib.sql.engine import describe_url, open_engine, writer
from fleetlib.sql.schema import TAKEN_OVER, History, status, upgrade
from fleetlib.testing.daemons import PROJECT, TRACEBACK_RE, assert_one_line_error, cli
from imageserver.journal import HISTORY as JOURNAL
from imageserver.journal import Journal
from mdb.machine import Machine
from mdb.store import HISTORY as MDB
from mdb.store import Mdb
from tests import old_runner

HISTORIES = [MDB, STATE, DEPLOYS, AUDIT, JOURNAL]
OLD_HOSTS = [("web1", "10.0.0.1", "web/1", '{"role": "web"}'), ("db1", "10.0.0.2", "db/17", "{}")]


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    opened = open_engine(url)
    yield opened
    opened.dispose()


def shared(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"


def at_revision(engine: sa.Engine, history: History, revision: str) -> None:
    """Make the database as a dominator knowing `revision` as its head would have."""
    with writer(engine).begin() as connection:
        command.upgrade(history.config(connection), revision)


def version_of(engine: sa.Engine, history: History) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text(
            f"SELECT version_num FROM {history.version_table}")).scalars())


def old_mdb(engine: sa.Engine, steps: int) -> None:
    """An MDB the hand-written runner made (at version STEPS), with hosts and a revision."""
    assert old_runner.migrate(engine, old_runner.MDB[:steps]) == steps
    with engine.begin() as connection:
        for hostname, address, image, tags in OLD_HOSTS:
            connection.execute(sa.text(
                "INSERT INTO machines (hostname, address, required_image, tags) "
                "VALUES (:hostname, :address, :image, :tags)"),
                {"hostname": hostname, "address": address, "image": image, "tags": tags})
        connection.execute(sa.text("UPDATE mdb_revision SET revision = 41"))


def test_every_history_is_one_line_of_numbered_revisions() -> None:
    for history in HISTORIES:
        revisions = list(reversed(list(history.script().walk_revisions())))
        assert [rev.revision for rev in revisions] == \
            [history.revision(number) for number in range(1, len(revisions) + 1)]
        assert [rev.down_revision for rev in revisions] == \
            [None, *(rev.revision for rev in revisions[:-1])]
        assert all(Path(rev.path).name.startswith(f"{rev.revision}_") for rev in revisions)
        assert history.head() == revisions[-1].revision
    assert len({history.version_table for history in HISTORIES}) == len(HISTORIES)


def test_a_new_database_is_made_at_head(url: str, engine: sa.Engine) -> None:
    with Mdb(url) as store:
        assert store.schema_revision == MDB.head() == "mdb_0005"
        store.set(Machine("a"))
    assert version_of(engine, MDB) == [MDB.head()]
    assert status(engine, MDB).state == "current"
    assert MDB.old_table not in sa.inspect(engine).get_table_names()
    with Mdb(url) as again:  # and opens as it is
        assert again.list() == [Machine("a")]


def test_a_new_state_file_has_three_histories_at_head(tmp_path: Path) -> None:
    state = DominatorState(tmp_path / STATE_FILE)
    AuditLog(state.engine, "dominator")
    DeployStore(state.engine)
    for history in (STATE, DEPLOYS, AUDIT):
        assert version_of(state.engine, history) == [history.head()]
    state.engine.dispose()


@pytest.mark.parametrize("steps", [1, 3])
def test_an_old_runner_database_is_taken_over_with_its_data(url: str, engine: sa.Engine,
                                                            steps: int) -> None:
    old_mdb(engine, steps)
    found = status(engine, MDB)
    assert (found.current, found.old_runner, found.state) == (f"mdb_000{steps}", True, "behind")
    if shared(engine):
        with pytest.raises(FleetError, match=f"is at schema mdb_000{steps}, this dominator "
                                             "needs mdb_0005: run `dominator db upgrade"):
            Mdb(url)
        assert status(engine, MDB).old_runner  # refusing changed nothing
        before = upgrade(engine, MDB)
        assert (before.current, before.head) == (f"mdb_000{steps}", "mdb_0005")
    with Mdb(url) as store:  # SQLite: upgraded on open
        assert store.schema_revision == "mdb_0005"
        assert store.revision() == 41
        assert store.get("web1") == Machine("web1", "10.0.0.1", "web/1", tags={"role": "web"})
        assert store.get("db1") == Machine("db1", "10.0.0.2", "db/17")
        store.update("db1", location="eu/dc2/r1")
        assert store.revision() == 42
    assert version_of(engine, MDB) == ["mdb_0005"]
    assert "ix_machines_required_image" in {
        index["name"] for index in sa.inspect(engine).get_indexes("machines")}
    # The old runner's table keeps its history, and a row that makes the old runner
    # refuse the database rather than run on a schema it no longer keeps.
    with engine.connect() as connection:
        assert list(connection.execute(sa.text(
            "SELECT version FROM schema_version ORDER BY version")).scalars()) == \
            [*range(1, steps + 1), TAKEN_OVER]
    with pytest.raises(FleetError, match="newer than this program knows"):
        old_runner.migrate(engine, old_runner.MDB)


def test_an_old_runner_state_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    engine = open_engine(str(path))
    old_runner.migrate(engine, old_runner.STATE)
    old_runner.migrate(engine, old_runner.DEPLOYS, table=DEPLOYS.old_table)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO hosts (hostname, safety_cleared) "
                                   "VALUES ('web1', 1)"))
    state = DominatorState(path)
    DeployStore(state.engine)
    assert state.safety_cleared("web1") and not state.disruption_allowed("web1")
    assert version_of(engine, STATE) == ["state_0005"]
    assert version_of(engine, DEPLOYS) == ["deploys_0002"]
    engine.dispose()
    state.engine.dispose()


def test_an_old_runner_journal_is_taken_over(tmp_path: Path) -> None:
    """An image server's journal keeps its identity: followers know it is the same one."""
    engine = open_engine(str(tmp_path / "journal.sqlite"))
    old_runner.migrate(engine, old_runner.JOURNAL, table=JOURNAL.old_table)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO identity (singleton, id, generation) "
                                   "VALUES (1, 'abc123', 7)"))
    journal = Journal(engine)
    assert (journal.identity.id, journal.identity.generation) == ("abc123", 8)
    assert version_of(engine, JOURNAL) == ["journal_0001"]
    engine.dispose()


def test_an_older_revision_is_upgraded_on_sqlite_and_refused_on_postgresql(
        url: str, engine: sa.Engine, tmp_path: Path) -> None:
    at_revision(engine, MDB, "mdb_0003")
    if not shared(engine):
        with Mdb(url) as store:
            assert store.schema_revision == "mdb_0005"
        return
    database = describe_url(engine.url)
    served = cli("serve", "--state-dir", str(tmp_path / "state"), "--mdb-url", url,
                 "--insecure", "--port", "0", "--http-port", "0", timeout=120)
    assert served.returncode == 2, served.stderr
    assert not TRACEBACK_RE.search(served.stderr), served.stderr
    assert [line for line in served.stderr.splitlines() if line.startswith("error:")] == [
        f"error: database {database} is at schema mdb_0003, this dominator needs mdb_0005: "
        f"run `dominator db upgrade --mdb-url {database}`"]
    assert version_of(engine, MDB) == ["mdb_0003"]

    upgraded = cli("db", "upgrade", "--mdb-url", url, check=True)
    # The shared database also holds the dominators' state: one upgrade brings both.
    assert upgraded.stdout == (f"mdb {database}: mdb_0003 -> mdb_0005\n"
                               f"state {database}: empty -> state_0005\n"
                               f"deploys {database}: empty -> deploys_0002\n"
                               f"audit {database}: empty -> audit_0002\n")
    again = cli("db", "upgrade", "--mdb-url", url, "--json", check=True)
    assert json.loads(again.stdout) == [
        {"database": database, "history": "mdb", "from": "mdb_0005", "to": "mdb_0005",
         "taken_over": False},
        {"database": database, "history": "state", "from": "state_0005", "to": "state_0005",
         "taken_over": False},
        {"database": database, "history": "deploys", "from": "deploys_0002",
         "to": "deploys_0002", "taken_over": False},
        {"database": database, "history": "audit", "from": "audit_0002", "to": "audit_0002",
         "taken_over": False}]
    with Mdb(url) as store:
        assert store.schema_revision == "mdb_0005"


def test_a_newer_unknown_revision_is_refused(url: str, engine: sa.Engine) -> None:
    Mdb(url).close()
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {MDB.version_table} SET version_num = 'mdb_0099'"))
    message = (f"database {describe_url(engine.url)} was upgraded by a newer dominator "
               "(revision mdb_0099 unknown): upgrade this dominator")
    with pytest.raises(FleetError) as refused:
        Mdb(url)
    assert str(refused.value) == message
    assert_one_line_error(cli("db", "upgrade", "--mdb-url", url), message)
    shown = cli("db", "status", "--mdb-url", url, "--json")
    assert shown.returncode == 1
    entry = json.loads(shown.stdout)[0]  # then, on PostgreSQL, the shared state's history
    assert (entry["history"], entry["current"], entry["head"], entry["state"]) == (
        "mdb", "mdb_0099", "mdb_0005", "newer")
    assert version_of(engine, MDB) == ["mdb_0099"]


def test_a_failing_revision_leaves_the_database_as_it_was(engine: sa.Engine,
                                                          tmp_path: Path) -> None:
    """The whole upgrade is one transaction (transactional DDL on SQLite too)."""
    revisions = tmp_path / "revisions"
    revisions.mkdir()
    step = ("from alembic import op\nimport sqlalchemy as sa\nrevision = {rev!r}\n"
            "down_revision = {down!r}\n\ndef upgrade():\n"
            "    op.get_bind().execute(sa.text('CREATE TABLE {table} (x INTEGER)'))\n{fail}")
    (revisions / "x_0001_base.py").write_text(step.format(rev="x_0001", down=None,
                                                          table="base", fail=""))
    (revisions / "x_0002_broken.py").write_text(step.format(
        rev="x_0002", down="x_0001", table="half", fail="    raise RuntimeError('broken')\n"))
    history = History("x", revisions, "x_schema_version")
    with pytest.raises(RuntimeError, match="broken"):
        upgrade(engine, history)
    assert not {"base", "half", history.version_table} & set(
        sa.inspect(engine).get_table_names())


def test_upgraders_take_turns(url: str, engine: sa.Engine) -> None:
    """Processes upgrading one database at once: each finds the work of the one before
    (without turns, a second CREATE TABLE would fail)."""
    at_revision(engine, MDB, "mdb_0001")
    upgraders = [subprocess.Popen(
        [sys.executable, "-m", "dominator.cli", "db", "upgrade", "--mdb-url", url, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT)
        for _ in range(4)]
    outcomes = []
    for upgrader in upgraders:
        out, err = upgrader.communicate(timeout=300)
        assert upgrader.returncode == 0, err
        entry = json.loads(out)[0]  # the MDB's history comes first
        outcomes.append(entry["from"])
    assert sorted(outcomes) == ["mdb_0001", "mdb_0005", "mdb_0005", "mdb_0005"]
    assert version_of(engine, MDB) == ["mdb_0005"]


def test_openers_of_a_new_state_file_take_turns(tmp_path: Path) -> None:
    def open_all(_: int) -> None:
        state = DominatorState(tmp_path / STATE_FILE)
        AuditLog(state.engine, "dominator")
        DeployStore(state.engine)
        state.engine.dispose()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(open_all, range(4)))
    engine = open_engine(str(tmp_path / STATE_FILE))
    assert [version_of(engine, history) for history in (STATE, DEPLOYS, AUDIT)] == \
        [["state_0005"], ["deploys_0002"], ["audit_0002"]]
    engine.dispose()


def test_two_histories_share_one_postgresql_database(postgres_url: str) -> None:
    """The MDB's database may hold other kinds' tables: each history has its version table."""
    engine = open_engine(postgres_url)
    old_mdb(engine, 3)  # the old runner's `schema_version` belongs to the MDB
    upgrade(engine, MDB)
    for history in (STATE, DEPLOYS, AUDIT):
        assert status(engine, history).state == "empty"
        upgrade(engine, history)
    assert [status(engine, history).state for history in (MDB, STATE, DEPLOYS, AUDIT)] == \
        ["current"] * 4
    tables = set(sa.inspect(engine).get_table_names())
    assert {"alembic_version_mdb", "alembic_version_state", "alembic_version_deploys",
            "alembic_version_audit", "machines", "hosts", "deploys", "audit_log"} <= tables
    engine.dispose()


def test_db_status(tmp_path: Path, postgres_url: str) -> None:
    (tmp_path / "state").mkdir()
    state_dir = str(tmp_path / "state")
    shown = cli("db", "status", "--state-dir", state_dir, "--json")
    assert shown.returncode == 1  # nothing made yet, and nothing made by looking
    assert [entry["state"] for entry in json.loads(shown.stdout)] == ["empty"] * 4
    assert not list((tmp_path / "state").iterdir())

    engine = open_engine(postgres_url)
    old_mdb(engine, 3)
    shown = cli("db", "status", "--mdb-url", postgres_url, "--state-dir", state_dir, "--json")
    assert shown.returncode == 1, shown.stderr
    entries = json.loads(shown.stdout)
    database = describe_url(engine.url)
    assert entries[0] == {"database": database, "history": "mdb", "current": "mdb_0003",
                          "head": "mdb_0005", "state": "behind", "old_runner": True}
    # The shared database holds the MDB, the shared state, the deploys and the audit log;
    # the state file keeps its own histories too (a SQLite MDB uses them).
    assert [entry["history"] for entry in entries] == ["mdb", "state", "deploys", "audit",
                                                       "state", "deploys", "audit"]

    upgraded = cli("db", "upgrade", "--mdb-url", postgres_url, "--state-dir", state_dir,
                   check=True)
    assert upgraded.stdout.splitlines()[0] == \
        f"mdb {database}: mdb_0003 (taken over from the old runner) -> mdb_0005"
    shown = cli("db", "status", "--mdb-url", postgres_url, "--state-dir", state_dir)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["HISTORY", "DATABASE", "CURRENT", "HEAD", "STATE"]
    assert [line.split()[0::2] for line in lines[1:]] == [
        ["mdb", "mdb_0005", "current"], ["state", "state_0005", "current"],
        ["deploys", "deploys_0002", "current"], ["audit", "audit_0002", "current"],
        ["state", "state_0005", "current"], ["deploys", "deploys_0002", "current"],
        ["audit", "audit_0002", "current"]]
    engine.dispose()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--mdb-url", "postgresql+psycopg://user:s3cret@127.0.0.1:1/mdb"],
     "database postgresql+psycopg://user:***@127.0.0.1:1/mdb?connect_timeout=10: "),
    (["--mdb-url", "nosuchdb://host/x"], "cannot use database nosuchdb://host/x"),
    (["--mdb-url", "://mdb"], "invalid database URL"),
    ([], "give --mdb-url, --state-dir or both"),
])
@pytest.mark.parametrize("verb", ["upgrade", "status"])
def test_bad_databases_are_one_line_errors(verb: str, args: list[str], fragment: str) -> None:
    result = cli("db", verb, *args)
    assert_one_line_error(result, fragment)
    assert "s3cret" not in result.stderr
