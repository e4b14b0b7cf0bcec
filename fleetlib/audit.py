"""The append-only audit log both daemons keep (the dominator in its state file, the
image server in audit.sqlite of its state directory): every change an operator or
a pipeline makes, with who (a certificate's CN, or `token:NAME` over HTTP), when,
and what (a one-line summary plus structured details).

Append-only: AuditLog offers `record` and `entries` and nothing else, and SQLite
triggers refuse any UPDATE or DELETE of the table, so no code path (nor a stray
`sqlite3` session) can rewrite history. Ids come from AUTOINCREMENT: they only
grow, and are never reused. Details never hold secrets (token values, health-check
credentials): `record` refuses keys that name one."""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.engine import Engine

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
                 sa.Column("details", sa.Text, nullable=False))


def caller(context: grpc.aio.ServicerContext) -> str:
    """The calling identity of a gRPC call: its certificate's CN (or a note that
    TLS is off)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else "unauthenticated (insecure)"


def format_time(unix_ns: int) -> str:
    """UTC, to the second, ISO 8601 (for people and JSON alike)."""
    moment = datetime.datetime.fromtimestamp(unix_ns / 1e9, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class AuditEntry:
    """One recorded change. `server` says which daemon recorded it."""

    id: int
    unix_ns: int
    server: str
    who: str
    action: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """For --json and /audit.json."""
        return {"id": self.id, "time": format_time(self.unix_ns), "unix": self.unix_ns / 1e9,
                "server": self.server, "who": self.who, "action": self.action,
                "summary": self.summary, "details": self.details}

    def line(self) -> str:
        """One line for people."""
        return f"{format_time(self.unix_ns)} {self.server:11} {self.who:20} {self.summary}"

    def to_wire(self) -> audit_pb2.AuditEntry:
        """The wire form (ListAudit)."""
        return audit_pb2.AuditEntry(id=self.id, unix_ns=self.unix_ns, server=self.server,
                                    who=self.who, action=self.action, summary=self.summary,
                                    details_json=json.dumps(self.details, sort_keys=True))

    @classmethod
    def from_wire(cls, entry: audit_pb2.AuditEntry) -> AuditEntry:
        """Back from the wire form."""
        details = json.loads(entry.details_json) if entry.details_json else {}
        return cls(entry.id, entry.unix_ns, entry.server, entry.who, entry.action,
                   entry.summary, details if isinstance(details, dict) else {})


def merged(*logs: list[AuditEntry], limit: int = 0) -> list[AuditEntry]:
    """Entries of several servers in time order (newest last), the newest `limit`."""
    entries = sorted((e for entries in logs for e in entries),
                     key=lambda e: (e.unix_ns, e.server, e.id))
    return entries[-limit:] if limit else entries


class AuditLog:
    """The audit log in one SQLite database (made on first use, with its own
    migrations). Thread-safe: each call is one short transaction."""

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
                unix_ns=unix_ns, who=who, action=action, summary=summary, details=text)
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
        return [AuditEntry(row.id, row.unix_ns, self.server, row.who, row.action, row.summary,
                           json.loads(row.details)) for row in reversed(rows)]

    def list_response(self, request: audit_pb2.ListAuditRequest) -> audit_pb2.ListAuditResponse:
        """The answer to a ListAudit call (either daemon's)."""
        entries = self.entries(request.limit, request.since_unix_ns)
        return audit_pb2.ListAuditResponse(entries=[e.to_wire() for e in entries])
