"""Open a service database from a SQLAlchemy URL, with the settings each backend
needs: SQLite (the default, one file) or PostgreSQL (large fleets). Shared by every
store built on SQLAlchemy (the MDB, the dominator's state), with fleetlib.sql.schema."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from fleetlib.errors import FleetError

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 10
# Drivers that take libpq's `connect_timeout` connection parameter.
LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2"})
# libpq settings (unless the URL sets them) that notice a server gone silent, as in a
# network partition, within about half a minute rather than the kernel's quarter
# hour: keepalive probes while waiting for an answer, and a limit on unacknowledged
# sends. A lease renewal stuck on such a connection would otherwise stay stuck.
LIBPQ_LIVENESS = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
                  "keepalives_count": "3", "tcp_user_timeout": "20000"}
# Execution option marking a transaction that will write (see `writer`).
WRITE_OPTION = "fleet_write"


def parse_url(url: str) -> URL:
    """A SQLAlchemy URL; a bare filesystem path means a SQLite file there."""
    if not url:
        raise FleetError("empty database URL")
    if "://" not in url:
        return URL.create("sqlite", database=url)
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # The text may hold a password: do not echo it.
        raise FleetError("invalid database URL: expected dialect+driver://user:password@host/"
                         "database (e.g. postgresql+psycopg://...) or a SQLite file path") from None


def describe_url(url: URL) -> str:
    """The URL for messages and logs, password hidden."""
    return url.render_as_string(hide_password=True)


def open_engine(url: str) -> Engine:
    """An engine for `url`. SQLite: a file (in-memory databases are refused, as
    every thread would get its own), write-ahead log, foreign keys, transactional
    DDL. Other backends: connections checked before use (`pool_pre_ping`, for
    databases that restart), a connect timeout and, with libpq, `LIBPQ_LIVENESS`."""
    parsed = parse_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed)
        liveness: dict[str, str] = {}
        if parsed.get_driver_name() in LIBPQ_DRIVERS:
            if "connect_timeout" not in parsed.query:
                parsed = parsed.update_query_dict(
                    {"connect_timeout": str(CONNECT_TIMEOUT_SECONDS)})
            liveness = {name: value for name, value in LIBPQ_LIVENESS.items()
                        if name not in parsed.query}
        return create_engine(parsed, pool_pre_ping=True, connect_args=liveness)
    except (NoSuchModuleError, ImportError) as err:
        raise FleetError(f"cannot use database {describe_url(parsed)}: {err}") from None


def _sqlite_engine(url: URL) -> Engine:
    """SQLite with SQLAlchemy, not the sqlite3 module, deciding where transactions
    begin: sqlite3's legacy mode would run DDL outside them (so a failed migration
    would be half applied)."""
    if url.database in (None, "", ":memory:"):
        raise FleetError(f"{describe_url(url)}: in-memory SQLite cannot be shared between "
                         "threads; give a file path")
    _private_file(url.database)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _private_file(path: str) -> None:
    """Make the database file readable by its owner only (0600), creating it empty
    if need be: it holds who did what and deploy settings, and SQLite would create it
    (and its -wal and -shm files, which copy its permissions) world-readable."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return  # no such folder, or not ours to write: SQLite's own error says so
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    """Per new connection: hand transaction control to SQLAlchemy; WAL lets readers
    (the dominator polling the revision) run while a writer imports."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """PRAGMA journal_mode=WAL, retried while the file is locked: switching a new
    database needs a lock SQLite does not wait for (its busy timeout does not apply),
    so processes opening a new file at once would otherwise fail one another."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_begin(connection: Connection) -> None:
    """BEGIN IMMEDIATE for writers: taking the write lock up front means two
    read-then-write transactions queue (busy timeout) instead of one failing when
    it tries to upgrade its read lock."""
    write = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The same engine (and pool) for transactions that will write."""
    return engine.execution_options(**{WRITE_OPTION: True})


def error_line(err: BaseException) -> str:
    """The first line of a database error: the driver's message when there is one (no
    SQL, no parameters), else the error's own; its type's name when both are empty."""
    source: BaseException = err.orig if isinstance(err, DBAPIError) and err.orig else err
    lines = str(source).strip().splitlines()
    return lines[0] if lines else type(source).__name__


@contextmanager
def database_errors(url: URL) -> Iterator[None]:
    """Turn a driver failure (unreachable server, bad credentials, locked or
    unreadable file) into a one-line FleetError naming the database."""
    try:
        yield
    except DBAPIError as err:
        log.debug("database %s failed", describe_url(url), exc_info=True)
        raise FleetError(f"database {describe_url(url)}: {error_line(err)}") from None


def follow(stop: threading.Event, every: float, read: Callable[[], object], what: str,
           kept: str) -> None:
    """Call `read` every `every` seconds until `stop` is set (a thread's loop, for a
    store that re-reads what other processes change). A failing database is logged
    once per outage, as "WHAT unreadable, KEPT: why", and once when it answers again;
    the store keeps what it last read meanwhile."""
    failing = False
    while not stop.wait(every):
        try:
            read()
        except SQLAlchemyError as err:
            if not failing:
                log.warning("%s unreadable, %s: %s", what, kept, error_line(err))
            failing = True
            continue
        if failing:
            log.warning("%s readable again", what)
        failing = False
