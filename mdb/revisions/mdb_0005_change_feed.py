"""The MDB change feed on PostgreSQL: every committed change of mdb_revision or of the
machines table sends NOTIFY fleet_mdb with the revision as payload (read in the writing
transaction), so followers LISTENing learn of it at commit instead of at their next poll.
A store write bumps the revision and changes rows in one transaction: both triggers send
the same payload, which PostgreSQL delivers once. SQL written straight into machines
without bumping the revision is notified too. Nothing on SQLite (followers poll)."""

from alembic import op
from sqlalchemy import text

revision = "mdb_0005"
down_revision = "mdb_0004"

CHANNEL = "fleet_mdb"  # mdb.feed.CHANNEL: frozen here, as this revision is


def upgrade() -> None:
    """The notifying function and its two statement triggers (PostgreSQL only)."""
    connection = op.get_bind()
    if connection.dialect.name != "postgresql":
        return
    connection.execute(text(f"""
        CREATE FUNCTION fleet_mdb_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}',
                              COALESCE((SELECT revision FROM mdb_revision WHERE id = 1), 0)::text);
            RETURN NULL;
        END $$"""))
    connection.execute(text(
        "CREATE TRIGGER mdb_revision_notify AFTER UPDATE ON mdb_revision "
        "FOR EACH STATEMENT EXECUTE FUNCTION fleet_mdb_notify()"))
    connection.execute(text(
        "CREATE TRIGGER machines_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
        "ON machines FOR EACH STATEMENT EXECUTE FUNCTION fleet_mdb_notify()"))
