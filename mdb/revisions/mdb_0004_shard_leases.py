"""dominators, shard leases and their fencing tokens: several dominators on one database.
Each running dominator registers a row in `dominators` (a new id per process) and
heartbeats `last_renewal`; `shard_leases` holds one row per shard (made by the first
dominator, which also fixes the shard count in the single `lease_settings` row) with its
owner (a dominators.id, NULL: free), fencing token and expiry, all times by the database
clock. Tokens come from the sequence shard_lease_token on PostgreSQL, from
lease_settings.last_token on SQLite (one dominator); both start at the creation time in
milliseconds."""

from alembic import op
from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, text

revision = "mdb_0004"
down_revision = "mdb_0003"


def upgrade() -> None:
    """The three tables, and the token sequence on PostgreSQL."""
    connection = op.get_bind()
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
