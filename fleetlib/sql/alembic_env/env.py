"""Alembic runs this for every command fleetlib.sql.schema gives it: migrate the connection
the Config carries, inside the transaction its caller holds (with its migration turn),
recording the revision in that history's own version table."""

from alembic import context

config = context.config
context.configure(connection=config.attributes["connection"],
                  version_table=config.attributes["version_table"])
with context.begin_transaction():
    context.run_migrations()
