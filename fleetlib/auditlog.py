"""The append-only audit log both daemons keep (the dominator in its state file, or
in the PostgreSQL MDB's database that dominators share; the image server in
audit.sqlite of its state directory): every change an operator or a pipeline makes,
with who (a certificate's CN, or `token:NAME` over HTTP), when, what (a one-line
summary plus structured details) and which server recorded it.

Append-only: AuditLog offers `record` and `entries` and nothing else, and triggers
(SQLite and PostgreSQL alike) refuse any UPDATE or DELETE of the table, so no code
path (nor a stray SQL session) can rewrite history. Ids only grow, and are never
reused (SQLite AUTOINCREMENT, a PostgreSQL sequence). Details never hold secrets
(token values, health-check credentials): `record` refuses keys that name one."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fleetlib.audit import AuditEntry
from fleetlib.sql.engine import writer
from fleetlib.sql.schema import History, open_schema
from fleetlib.wire import audit_pb2

log = logging.getLogger(__name__)

# Detail keys that would carry a secret: refused, whatever the caller meant.
SECRET_KEYS = frozenset({"token", "value", "password", "secret", "credentials", "headers"})
MAX_LIMIT = 100_000


HISTORY = History("audit", Path(__file__).with_name("audit_revisions"), "audit_schema_version")

AUDIT = sa.Table("audit_log", sa.MetaData(),
                 sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("unix_ns", sa.BigInteger, nullable=False),
                 sa.Column("who", sa.Text, nullable=False),
                 sa.Column("action", sa.Text, nullable=False),
                 sa.Column("summary", sa.Text, nullable=False),
                 sa.Column("details", sa.Text, nullable=False),
                 sa.Column("server", sa.Text))  # audit_0002 (NULL before: this log's own)


class AuditLog:
    """The audit log in one database (SQLite: made on first use; PostgreSQL: made
    when empty, else upgraded by `dominator db upgrade`), with its own migrations.
    Entries it records name `server`, the daemon that recorded them (in a log several
    dominators share, each names itself). Thread-safe: each call is one short
    transaction."""

    def __init__(self, engine: Engine, server: str) -> None:
        open_schema(engine, HISTORY, server)
        self._engine = writer(engine)
        self.server = server

    def record(self, who: str, action: str, summary: str, **details: Any) -> AuditEntry:
        """Append one entry (durable when this returns) and log it."""
        secret = SECRET_KEYS.intersection(details)
        if secret:
            raise ValueError(f"audit details must not hold secrets: {sorted(secret)}")
        unix_ns = time.time_ns()
        text = json.dumps(details, sort_keys=True, default=str)
        with self._engine.begin() as conn:
            key = conn.execute(AUDIT.insert().values(
                unix_ns=unix_ns, who=who, action=action, summary=summary, details=text,
                server=self.server)
            ).inserted_primary_key
        assert key is not None  # an INSERT always has one
        entry_id = int(key[0])
        log.info("audit #%d: %s: %s", entry_id, who, summary)
        return AuditEntry(entry_id, unix_ns, self.server, who, action, summary,
                          json.loads(text))

    def entries(self, limit: int = 0, since_unix_ns: int = 0) -> list[AuditEntry]:
        """Entries newest last: the newest `limit` (0: all) recorded at or after
        `since_unix_ns`."""
        query = sa.select(AUDIT).where(AUDIT.c.unix_ns >= since_unix_ns)
        query = query.order_by(AUDIT.c.id.desc()).limit(min(limit or MAX_LIMIT, MAX_LIMIT))
        with self._engine.connect() as conn:
            rows = list(conn.execute(query))
        return [AuditEntry(row.id, row.unix_ns, row.server or self.server, row.who, row.action,
                           row.summary, json.loads(row.details)) for row in reversed(rows)]

    def list_response(self, request: audit_pb2.ListAuditRequest) -> audit_pb2.ListAuditResponse:
        """The answer to a ListAudit call (either daemon's)."""
        entries = self.entries(request.limit, request.since_unix_ns)
        return audit_pb2.ListAuditResponse(entries=[e.to_wire() for e in entries])
