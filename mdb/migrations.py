"""The MDB's schema history. Each step is frozen once released: it defines the
tables as they were then (not from mdb.models, which follows the latest)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
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


MIGRATIONS: list[Migration] = [
    Migration(1, "machines and the revision counter", create_machines),
    Migration(2, "machines.updated_unix and an index on required_image",
              add_update_time_and_image_index),
    Migration(3, "machines.location", add_location),
]
