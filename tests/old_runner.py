"""The hand-written migration runner Alembic replaced, and the steps it ran, frozen as
they were released (fleetlib/sql/migrate.py, mdb/migrations.py, dominator/herd/state.py,
dominator/deploy/store.py and imageserver/journal.py before the move): the tests make
databases with them exactly as a deployed dominator (or image server) did, then open them
with the current code."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    func,
    select,
    text,
)

from fleetlib.errors import FleetError
from fleetlib.sql.engine import writer

Step = Callable[[Connection], None]


def version_table(name: str) -> Table:
    return Table(name, MetaData(),
                 Column("version", Integer, primary_key=True, autoincrement=False),
                 Column("description", Text, nullable=False),
                 Column("applied_unix", BigInteger, nullable=False))


def migrate(engine: Engine, steps: Sequence[Step], table: str = "schema_version") -> int:
    """The old runner: apply `steps` (versions 1, 2, ...) not yet recorded in `table`;
    refuse a database whose recorded version is above the last step."""
    versions = version_table(table)
    engine = writer(engine)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                               {"key": f"fleet-migrate:{table}"})
        versions.create(connection, checkfirst=True)
        current = connection.execute(
            select(func.coalesce(func.max(versions.c.version), 0))).scalar_one()
    if current > len(steps):
        raise FleetError(f"database has schema version {current} ({table}), newer than "
                         f"this program knows ({len(steps)}): upgrade the program")
    for version, step in enumerate(steps[current:], current + 1):
        with engine.begin() as connection:
            step(connection)
            connection.execute(versions.insert().values(
                version=version, description=step.__name__, applied_unix=int(time.time())))
    return len(steps)


def mdb_v1(connection: Connection) -> None:
    metadata = MetaData()
    Table("machines", metadata,
          Column("hostname", String(253), primary_key=True),
          Column("address", String, nullable=False, server_default=""),
          Column("required_image", String, nullable=False, server_default=""),
          Column("planned_image", String, nullable=False, server_default=""),
          Column("disable_updates", Boolean, nullable=False, server_default=false()),
          Column("owner_group", String, nullable=False, server_default=""),
          Column("tags", Text, nullable=False, server_default="{}"))
    revision = Table("mdb_revision", metadata,
                     Column("id", Integer, primary_key=True, autoincrement=False),
                     Column("revision", BigInteger, nullable=False))
    metadata.create_all(connection)
    connection.execute(revision.insert().values(id=1, revision=0))


def mdb_v2(connection: Connection) -> None:
    connection.execute(text(
        "ALTER TABLE machines ADD COLUMN updated_unix BIGINT NOT NULL DEFAULT 0"))
    connection.execute(text(
        "CREATE INDEX ix_machines_required_image ON machines (required_image)"))


def mdb_v3(connection: Connection) -> None:
    connection.execute(text(
        "ALTER TABLE machines ADD COLUMN location VARCHAR NOT NULL DEFAULT ''"))


def state_v1(conn: Connection) -> None:
    conn.execute(text("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
    conn.execute(text(
        "CREATE TABLE hosts (hostname TEXT PRIMARY KEY, safety_cleared INTEGER NOT NULL "
        "DEFAULT 0, intrusion_paths TEXT, intrusion_unix INTEGER, last_sync_unix INTEGER, "
        "current_image TEXT)"))
    conn.execute(text(
        "CREATE TABLE desired_images (hostname TEXT NOT NULL, image TEXT NOT NULL, "
        "last_unix INTEGER NOT NULL, PRIMARY KEY (hostname, image))"))
    conn.execute(text(
        "CREATE TABLE desired_computed (hostname TEXT NOT NULL, path TEXT NOT NULL, "
        "hash TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (hostname, path, hash))"))


def state_v2(conn: Connection) -> None:
    conn.execute(text(
        "CREATE TABLE api_tokens (name TEXT PRIMARY KEY, scope TEXT NOT NULL, "
        "sha256 TEXT NOT NULL UNIQUE, created_unix INTEGER NOT NULL, created_by TEXT NOT NULL, "
        "last_used_unix INTEGER, revoked_unix INTEGER, revoked_by TEXT)"))


def deploys_v1(conn: Connection) -> None:
    conn.execute(text(
        "CREATE TABLE deploys (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, "
        "image TEXT NOT NULL, dry_run INTEGER NOT NULL, request TEXT NOT NULL, "
        "status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, "
        "created_unix REAL NOT NULL, updated_unix REAL NOT NULL)"))
    conn.execute(text("CREATE INDEX ix_deploys_status ON deploys (status)"))
    conn.execute(text("CREATE INDEX ix_deploys_created ON deploys (created_unix)"))


def journal_v1(conn: Connection) -> None:
    statements = [
        "CREATE TABLE identity (singleton INTEGER PRIMARY KEY CHECK (singleton = 1), "
        "id TEXT NOT NULL, generation INTEGER NOT NULL)",
        "CREATE TABLE events (sequence INTEGER PRIMARY KEY AUTOINCREMENT, "
        "kind INTEGER NOT NULL, name TEXT NOT NULL, digest BLOB NOT NULL, "
        "expires_unix INTEGER NOT NULL, unix INTEGER NOT NULL)",
        "CREATE TABLE live (name TEXT PRIMARY KEY, digest BLOB NOT NULL, "
        "expires_unix INTEGER NOT NULL)",
        "CREATE TABLE tombstones (name TEXT PRIMARY KEY, digest BLOB NOT NULL, "
        "deleted_unix INTEGER NOT NULL)",
        "CREATE TABLE follower (singleton INTEGER PRIMARY KEY CHECK (singleton = 1), "
        "upstream_id TEXT NOT NULL, generation INTEGER NOT NULL, "
        "applied_sequence INTEGER NOT NULL, diverged INTEGER NOT NULL, "
        "ancestry TEXT NOT NULL)",
    ]
    for statement in statements:
        conn.execute(text(statement))


MDB = [mdb_v1, mdb_v2, mdb_v3]  # the last release before shard leases (v4)
STATE = [state_v1, state_v2]
DEPLOYS = [deploys_v1]
JOURNAL = [journal_v1]  # imageserver/journal.py
