"""The MDB's schema history. Each step is frozen once released: it defines the
tables as they were then (not from mdb.models, which follows the latest)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)

from fleetlib.sql.migrate import Migration


def create_machines(connection: Connection) -> None:
    """v1: one row per machine (tags as JSON object text) and the single-row
    revision counter every write bumps, which the dominator polls."""
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


def add_update_time_and_image_index(connection: Connection) -> None:
    """v2: when each row last changed (0: before v2), for `mdb list` and audits;
    and an index for the dominator's "which machines require image X"."""
    connection.execute(text(
        "ALTER TABLE machines ADD COLUMN updated_unix BIGINT NOT NULL DEFAULT 0"))
    connection.execute(text(
        "CREATE INDEX ix_machines_required_image ON machines (required_image)"))


def add_location(connection: Connection) -> None:
    """v3: where each host stands, REGION/DC[/RACK] ('' : unknown), which ranks the
    image servers a host fetches from (Dominator's MDB field `Location`)."""
    connection.execute(text(
        "ALTER TABLE machines ADD COLUMN location VARCHAR NOT NULL DEFAULT ''"))


def add_shard_leases(connection: Connection) -> None:
    """v4: several dominators on one database. Each running dominator registers a row
    in `dominators` (a new id per process) and heartbeats `last_renewal`; `shard_leases`
    holds one row per shard (made by the first dominator, which also fixes the shard
    count in the single `lease_settings` row) with its owner (a dominators.id, NULL:
    free), fencing token and expiry, all times by the database clock. Tokens come from
    the sequence shard_lease_token on PostgreSQL, from lease_settings.last_token on
    SQLite (one dominator); both start at the creation time in milliseconds."""
    metadata = MetaData()
    Table("dominators", metadata,
          Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
          Column("name", String, nullable=False),
          Column("address", String, nullable=False, server_default=""),
          Column("started", DateTime(timezone=True), nullable=False),
          Column("last_renewal", DateTime(timezone=True), nullable=False))
    Table("shard_leases", metadata,
          Column("shard", Integer, primary_key=True, autoincrement=False),
          Column("owner", BigInteger, nullable=True),
          Column("token", BigInteger, nullable=False, server_default="0"),
          Column("granted", DateTime(timezone=True), nullable=True),
          Column("expires_at", DateTime(timezone=True), nullable=True))
    Table("lease_settings", metadata,
          Column("id", Integer, primary_key=True, autoincrement=False),
          Column("shards", Integer, nullable=False),
          Column("last_token", BigInteger, nullable=False, server_default="0"))
    metadata.create_all(connection)
    if connection.dialect.name == "postgresql":
        # Starting at the creation time in milliseconds puts a new database's tokens
        # above those of the one it replaces, which subds remember.
        connection.execute(text("CREATE SEQUENCE shard_lease_token"))
        connection.execute(text("SELECT setval('shard_lease_token', "
                                "(extract(epoch FROM now()) * 1000)::bigint)"))


MIGRATIONS: list[Migration] = [
    Migration(1, "machines and the revision counter", create_machines),
    Migration(2, "machines.updated_unix and an index on required_image",
              add_update_time_and_image_index),
    Migration(3, "machines.location", add_location),
    Migration(4, "dominators, shard leases and their fencing tokens", add_shard_leases),
]
