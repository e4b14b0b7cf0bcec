"""deploys: the runner lease (frozen history: the columns DeployRow maps).

Which dominator runs each deploy (`runner`), under which fencing token
(`runner_token`, only growing: a PostgreSQL sequence, max + 1 on SQLite) and until
when by the database clock (`runner_expires`; NULL on SQLite, where one dominator
runs everything), and a cancel asked for through a dominator that does not run it
(`cancel_requested`, JSON), for the runner to pick up. On PostgreSQL the times become
DOUBLE PRECISION: its REAL is 4 bytes, 128 s apart at today's Unix times, which put
deploys out of order."""

import sqlalchemy as sa
from alembic import op

revision = "deploys_0002"
down_revision = "deploys_0001"


def upgrade() -> None:
    """Four nullable columns (existing deploys: no runner yet), the token sequence and
    8-byte times (PostgreSQL)."""
    conn = op.get_bind()
    postgres = conn.dialect.name == "postgresql"
    stamp = "TIMESTAMP WITH TIME ZONE" if postgres else "TIMESTAMP"
    for column in ("runner TEXT", "runner_token BIGINT", f"runner_expires {stamp}",
                   "cancel_requested TEXT"):
        conn.execute(sa.text(f"ALTER TABLE deploys ADD COLUMN {column}"))
    if postgres:
        conn.execute(sa.text("CREATE SEQUENCE deploy_runner_token"))
        conn.execute(sa.text("ALTER TABLE deploys ALTER COLUMN created_unix TYPE DOUBLE "
                             "PRECISION, ALTER COLUMN updated_unix TYPE DOUBLE PRECISION"))
