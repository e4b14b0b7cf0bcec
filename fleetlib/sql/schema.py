"""Schema migrations with Alembic, run from code (no alembic.ini): one linear history per
database kind (the MDB, the dominator's state, deploys, audit log, image server journal),
each with its own folder of revisions ("mdb_0001", "mdb_0002", ...) and its own version
table (`alembic_version_<kind>`), so several kinds can share one database.

On open a store calls `open_schema`: SQLite (one machine) upgrades itself, as it always
did; PostgreSQL (shared by several dominators) is created at head when empty, and
otherwise must be exactly at this program's head: older is refused until an operator runs
`dominator db upgrade`, newer is refused until this program is upgraded.

Databases made by the hand-written runner this replaces (a `schema_version`-like table
of numbered steps) are taken over: version N is stamped as revision `<kind>_000N`, and the
old table gets a row of version TAKEN_OVER, which the old runner refuses as newer than it
knows, so an old program cannot run against a schema it no longer keeps.

Upgraders take turns: every check-then-write runs in one transaction that first holds
the database's write lock (SQLite: BEGIN IMMEDIATE) or an advisory lock named after the
version table (PostgreSQL), so the second of two processes opening a new database at once
finds the first one's work. The whole upgrade is that one transaction: a failing step
leaves the database as it was."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Engine, inspect, text

from fleetlib.errors import FleetError
from fleetlib.sql.engine import database_errors, describe_url, open_engine, writer

if TYPE_CHECKING:  # Alembic itself is imported when a database is opened, not before: a
    # CLI command importing a module that names a History does not pay for it.
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)
# Alembic's INFO lines (its plugins, "non-transactional DDL", wrong here as the caller's
# transaction holds every step) would read as news at every open: one line of ours says
# what an upgrade did.
logging.getLogger("alembic").setLevel(logging.WARNING)

ENVIRONMENT = Path(__file__).with_name("alembic_env")  # env.py, shared by every history
TAKEN_OVER = 1_000_000  # recorded in the old runner's table once Alembic keeps the schema
State = Literal["current", "empty", "behind", "newer"]


@dataclass(frozen=True)
class History:
    """One database kind's migrations: revision files `<name>_NNNN_*.py` in `directory`,
    applied in the version table `alembic_version_<name>`; `old_table` is where the
    hand-written runner recorded its numbered steps on the backends `old_backends`
    (taken over, see the module doc): only there, as another kind's old table may have
    had the same name in a database this history now shares."""

    name: str
    directory: Path
    old_table: str
    old_backends: tuple[str, ...] = ("sqlite",)

    @property
    def version_table(self) -> str:
        """Where Alembic records this history's revision."""
        return f"alembic_version_{self.name}"

    def revision(self, number: int) -> str:
        """The revision that old runner step NUMBER became."""
        return f"{self.name}_{number:04d}"

    def config(self, connection: Connection | None = None) -> Config:
        """The Alembic configuration of this history, built in code; `connection` (in a
        transaction the caller owns) is what env.py migrates."""
        from alembic.config import Config

        config = Config(attributes={"connection": connection,
                                    "version_table": self.version_table})
        config.set_main_option("script_location", str(ENVIRONMENT))
        config.set_main_option("version_locations", str(self.directory))
        config.set_main_option("path_separator", "os")
        return config

    def script(self) -> ScriptDirectory:
        """The revisions (loaded once per process)."""
        return _script(self)

    def head(self) -> str:
        """The newest revision this program knows."""
        head = self.script().get_current_head()
        if head is None:
            raise ValueError(f"history {self.name} has no revisions")
        return head


@functools.cache
def _script(history: History) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(history.config())


@dataclass(frozen=True)
class Status:
    """Where one database stands on one history. `current` is None for a database
    without this history's tables; `old_runner` when it is only recorded in the old
    runner's table (not yet taken over)."""

    database: str
    history: str
    current: str | None
    head: str
    known: bool
    old_runner: bool = False

    @property
    def state(self) -> State:
        """current (at head), empty, behind (an upgrade will fix it) or newer (unknown)."""
        if self.current is None:
            return "empty"
        if not self.known:
            return "newer"
        return "current" if self.current == self.head else "behind"

    def to_json(self) -> dict[str, Any]:
        """For `dominator db status --json`."""
        return {"database": self.database, "history": self.history, "current": self.current,
                "head": self.head, "state": self.state, "old_runner": self.old_runner}


def _old_version(connection: Connection, history: History) -> int:
    """The old runner's version (0: never ran here)."""
    if connection.dialect.name not in history.old_backends or \
            not inspect(connection).has_table(history.old_table):
        return 0
    version: int = connection.execute(text(
        f"SELECT COALESCE(MAX(version), 0) FROM {history.old_table}")).scalar_one()
    return version


def _status(connection: Connection, history: History, database: str) -> Status:
    from alembic.runtime.migration import MigrationContext

    script = history.script()
    heads = MigrationContext.configure(
        connection, opts={"version_table": history.version_table}).get_current_heads()
    old_runner = False
    if heads:
        current: str | None = heads[0] if len(heads) == 1 else ",".join(heads)
    else:
        number = _old_version(connection, history)
        current, old_runner = (history.revision(number), True) if number else (None, False)
    known = current is not None and current in {rev.revision for rev in script.walk_revisions()}
    return Status(database, history.name, current, history.head(), known, old_runner)


@contextmanager
def _schema_engine(engine: Engine) -> Iterator[Engine]:
    """The engine schema work runs on. SQLite: one of its own set up by `open_engine`
    (BEGIN IMMEDIATE, transactional DDL), whatever engine the store opened, disposed
    after, so no connection Alembic used is left in the store's pool. (Reading a
    database at head through the store's own engine broke a running dominator: its MDB
    stopped seeing SQL committed by other processes, found by test_herd_robustness.)"""
    own = open_engine(engine.url.render_as_string(hide_password=False)) \
        if engine.dialect.name == "sqlite" else engine
    try:
        yield own
    finally:
        if own is not engine:
            own.dispose()


@contextmanager
def _turn(engine: Engine, history: History) -> Iterator[Connection]:
    """A transaction that has this database's migration turn (see the module doc)."""
    with _schema_engine(engine) as own, database_errors(engine.url), \
            writer(own).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                               {"key": f"fleet-migrate:{history.version_table}"})
        yield connection


def status(engine: Engine, history: History) -> Status:
    """Where the database at `engine` stands on `history` (reads only)."""
    with _schema_engine(engine) as own, database_errors(engine.url), \
            own.connect() as connection:
        return _status(connection, history, describe_url(engine.url))


def _newer(found: Status, program: str) -> FleetError:
    return FleetError(f"database {found.database} was upgraded by a newer {program} "
                      f"(revision {found.current} unknown): upgrade this {program}")


def _take_over(connection: Connection, history: History, found: Status) -> None:
    """Stamp an old runner's database at the revision its version became."""
    from alembic import command

    assert found.current is not None
    log.info("database %s: taking over %s from the old runner's %s at revision %s",
             found.database, history.name, history.old_table, found.current)
    command.stamp(history.config(connection), found.current)
    connection.execute(text(
        f"INSERT INTO {history.old_table} (version, description, applied_unix) "
        "VALUES (:version, :description, :unix)"),
        {"version": TAKEN_OVER, "description": f"kept by Alembic in {history.version_table}",
         "unix": int(time.time())})


def upgrade(engine: Engine, history: History, program: str = "dominator") -> Status:
    """Bring the database to `history`'s head, taking over an old runner's database
    first; return where it stood before. Refuses a database newer than the code."""
    from alembic import command

    with _turn(engine, history) as connection:
        found = _status(connection, history, describe_url(engine.url))
        if found.state == "newer":
            raise _newer(found, program)
        if found.old_runner:
            _take_over(connection, history, found)
        if found.state != "current":
            log.info("database %s: upgrading %s from %s to %s", found.database,
                     history.name, found.current or "empty", found.head)
            command.upgrade(history.config(connection), found.head)
    return found


def open_schema(engine: Engine, history: History, program: str = "dominator") -> str:
    """Check (PostgreSQL) or bring (SQLite) the database's schema to `history`'s head
    as a store opens it, and return the head. One-line FleetError when it cannot be
    used: newer than this program, or (PostgreSQL) older, naming the command to run.
    A database at head is only read: no migration turn is taken."""
    found = status(engine, history)
    if found.state == "current" and not found.old_runner:
        return found.head
    if found.state == "newer":
        raise _newer(found, program)
    if found.state == "behind" and engine.dialect.name != "sqlite":
        raise FleetError(f"database {found.database} is at schema {found.current}, this "
                         f"{program} needs {found.head}: run `dominator db upgrade "
                         f"--mdb-url {found.database}`")
    upgrade(engine, history, program)  # PostgreSQL: a new database, or one to take over
    return found.head
