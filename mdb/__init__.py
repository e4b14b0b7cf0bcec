"""The machine database (MDB): which image each machine must run (`required`) and
will run next (`planned`), with its address, owner and tags. Stored with SQLAlchemy
in a SQLite file (the default) or PostgreSQL (large fleets), migrated on open, and
exchanged as Dominator's MDB JSON. The dominator polls `Mdb.revision()`, a single
counter every committed change moves, and reloads the machines when it moves.

Modules: `machine` (the Machine value and its JSON), `store` (Mdb), `models` (ORM
tables); `revisions/` holds the schema history (Alembic revisions mdb_0001, ...). The
migration driver and the engine settings of each backend live in fleetlib/sql/, shared
with the dominator's own state store."""
