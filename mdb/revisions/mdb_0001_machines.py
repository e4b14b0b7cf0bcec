"""machines and the revision counter: one row per machine (tags as JSON object text) and
the single-row revision counter every write bumps, which the dominator polls."""

from alembic import op
from sqlalchemy import BigInteger, Boolean, Column, Integer, MetaData, String, Table, Text, false

revision = "mdb_0001"
down_revision = None


def upgrade() -> None:
    """The machines and mdb_revision tables."""
    connection = op.get_bind()
    metadata = MetaData()
    Table("machines", metadata,
          Column("hostname", String(253), primary_key=True),
          Column("address", String, nullable=False, server_default=""),
          Column("required_image", String, nullable=False, server_default=""),
          Column("planned_image", String, nullable=False, server_default=""),
          Column("disable_updates", Boolean, nullable=False, server_default=false()),
          Column("owner_group", String, nullable=False, server_default=""),
          Column("tags", Text, nullable=False, server_default="{}"))
    revision_table = Table("mdb_revision", metadata,
                           Column("id", Integer, primary_key=True, autoincrement=False),
                           Column("revision", BigInteger, nullable=False))
    metadata.create_all(connection)
    connection.execute(revision_table.insert().values(id=1, revision=0))
