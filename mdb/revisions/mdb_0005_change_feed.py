"""The MDB change feed on PostgreSQL: every committed move of mdb_revision sends NOTIFY
fleet_mdb with the new revision as payload, so followers LISTENing learn of a change at
its commit instead of at their next poll. SQL written straight into machines moves the
revision too (once per transaction, before the statement touches a row, so it takes the
revision's row lock first, as the store's writes do): the revision then counts every
committed change of machines, whoever made it. Nothing on SQLite (followers poll)."""

from alembic import op
from sqlalchemy import text

revision = "mdb_0005"
down_revision = "mdb_0004"

CHANNEL = "fleet_mdb"  # mdb.feed.CHANNEL, frozen here as this revision is
MOVED = "fleet.mdb_revision_moved"  # set for the rest of a transaction that moved it


def upgrade() -> None:
    """The two functions and their triggers (PostgreSQL only)."""
    connection = op.get_bind()
    if connection.dialect.name != "postgresql":
        return
    connection.execute(text(f"""
        CREATE FUNCTION fleet_mdb_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM set_config('{MOVED}', 'yes', true);
            PERFORM pg_notify('{CHANNEL}', NEW.revision::text);
            RETURN NULL;
        END $$"""))
    connection.execute(text(f"""
        CREATE FUNCTION fleet_mdb_move() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('{MOVED}', true) IS DISTINCT FROM 'yes' THEN
                UPDATE mdb_revision SET revision = revision + 1 WHERE id = 1;
            END IF;
            RETURN NULL;
        END $$"""))
    connection.execute(text(
        "CREATE TRIGGER mdb_revision_notify AFTER UPDATE ON mdb_revision "
        "FOR EACH ROW EXECUTE FUNCTION fleet_mdb_notify()"))
    connection.execute(text(
        "CREATE TRIGGER machines_move_revision BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE "
        "ON machines FOR EACH STATEMENT EXECUTE FUNCTION fleet_mdb_move()"))
