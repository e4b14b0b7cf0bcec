"""A small versioned schema migration runner, generic over the database it
migrates (the MDB, the dominator's state store): numbered steps applied in order,
each in one transaction together with the record that it was applied."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    select,
    text,
)

from fleetlib.errors import FleetError
from fleetlib.sql.engine import describe_url, writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One schema step: `apply` runs inside the transaction that records `version`.
    Migrations are frozen history: a new need gets a new version, never an edit."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def version_table(name: str) -> Table:
    """The table recording applied migrations, one row each (an audit trail)."""
    return Table(name, MetaData(),
                 Column("version", Integer, primary_key=True, autoincrement=False),
                 Column("description", Text, nullable=False),
                 Column("applied_unix", BigInteger, nullable=False))


def current_version(connection: Connection, versions: Table) -> int:
    """The highest applied version, 0 for a new database."""
    version: int = connection.execute(
        select(func.coalesce(func.max(versions.c.version), 0))).scalar_one()
    return version


def _serialize(connection: Connection, table: str) -> None:
    """Make concurrent migrators (several processes opening a new database at
    once) take turns until this transaction ends, so each finds the work of the
    one before. SQLite: `writer`'s BEGIN IMMEDIATE did; PostgreSQL: an advisory
    lock, as the version table may not exist yet."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                           {"key": f"fleet-migrate:{table}"})


def migrate(engine: Engine, migrations: Sequence[Migration], table: str = "schema_version") -> int:
    """Bring the database up to the last of `migrations` (versions 1, 2, ... in
    order) and return that version. Refuses a database newer than the code, which
    would otherwise be read and written with the wrong assumptions."""
    if [migration.version for migration in migrations] != list(range(1, len(migrations) + 1)):
        raise ValueError("migrations must be numbered 1, 2, 3, ... in order")
    latest = len(migrations)
    versions = version_table(table)
    engine = writer(engine)
    with engine.begin() as connection:
        _serialize(connection, table)
        versions.create(connection, checkfirst=True)
        current = current_version(connection, versions)
    if current > latest:
        raise FleetError(f"database {describe_url(engine.url)} has schema version {current} "
                         f"({table}), newer than this program knows ({latest}): "
                         "upgrade the program")
    for migration in migrations[current:]:
        with engine.begin() as connection:
            _serialize(connection, table)
            if current_version(connection, versions) >= migration.version:
                continue
            log.info("migrating %s (%s) to version %d: %s", describe_url(engine.url), table,
                     migration.version, migration.description)
            migration.apply(connection)
            connection.execute(versions.insert().values(
                version=migration.version, description=migration.description,
                applied_unix=int(time.time())))
    return latest
