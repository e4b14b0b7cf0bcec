"""The audit log's plain values, free of SQLAlchemy (the CLI imports them at every
command): one entry (AuditEntry, with its wire and JSON forms), the merge of
several servers' entries, the time format, and who a gRPC call comes from. The log
itself is fleetlib.auditlog."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import grpc

from fleetlib.wire import audit_pb2


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

    def line(self, server_width: int = 11) -> str:
        """One line for people (the server's name padded to `server_width`)."""
        return (f"{format_time(self.unix_ns)} {self.server:{server_width}} {self.who:20} "
                f"{self.summary}")

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
