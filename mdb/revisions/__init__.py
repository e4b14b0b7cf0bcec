"""The MDB's schema history (Alembic revisions, fleetlib.sql.schema). Each revision is
frozen once released: it defines the tables as they were then (not from mdb.models, which
follows the latest); a new need gets a new revision, never an edit."""
