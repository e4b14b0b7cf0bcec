"""Named, scoped bearer tokens of the HTTP API, as plain values: what a token is
(never its value), its scopes and their rights, and the digest it is kept as. The
store is dominator.herd.tokenstore; this module stays free of SQLAlchemy, as the
CLI (through dominator.client) imports it at every command."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from fleetlib.wire import dominator_pb2

# Each scope has the rights of those before it; ADMIN (the default token) has all.
SCOPES = ("read", "deploy")
ADMIN = "admin"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VALUE_PREFIX = "fdt_"  # recognisable in a leaked file or log


@dataclass(frozen=True)
class ApiToken:
    """What is known of a token (never its value)."""

    name: str
    scope: str
    created_unix: int
    created_by: str
    last_used_unix: int = 0
    revoked_unix: int = 0
    revoked_by: str = ""

    def to_json(self) -> dict[str, Any]:
        """For `tokens list --json`."""
        return {"name": self.name, "scope": self.scope, "created_unix": self.created_unix,
                "created_by": self.created_by, "last_used_unix": self.last_used_unix,
                "revoked": bool(self.revoked_unix), "revoked_unix": self.revoked_unix,
                "revoked_by": self.revoked_by}

    def to_wire(self) -> dominator_pb2.TokenInfo:
        """The wire view (ListTokens and friends)."""
        return dominator_pb2.TokenInfo(
            name=self.name, scope=self.scope, created_unix=self.created_unix,
            created_by=self.created_by, last_used_unix=self.last_used_unix,
            revoked_unix=self.revoked_unix, revoked_by=self.revoked_by)

    @classmethod
    def from_wire(cls, info: dominator_pb2.TokenInfo) -> ApiToken:
        """Back from the wire view."""
        return cls(info.name, info.scope, info.created_unix, info.created_by,
                   info.last_used_unix, info.revoked_unix, info.revoked_by)


def permits(scope: str, needed: str) -> bool:
    """Whether a token of `scope` has the rights of `needed`."""
    if scope == ADMIN:
        return True
    return scope in SCOPES and SCOPES.index(scope) >= SCOPES.index(needed)


def digest(value: str) -> str:
    """The SHA-256 (hex) a token is kept as."""
    return hashlib.sha256(value.encode()).hexdigest()
