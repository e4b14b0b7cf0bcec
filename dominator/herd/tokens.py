"""Named, scoped bearer tokens of the HTTP API, in the dominator's state file: only
each token's SHA-256 is kept, with its name, scope, who made it and when, when it
was last used (to the minute) and whether it is revoked. A name is never reused,
so the `token:NAME` of an audit entry always means one token."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy import BigInteger, Text
from sqlalchemy.orm import Mapped, Session, mapped_column

from dominator.herd.state import Base, DominatorState
from fleetlib.errors import ExistsError, FleetError, NotFoundError
from fleetlib.wire import dominator_pb2

log = logging.getLogger(__name__)

# Each scope has the rights of those before it; ADMIN (the default token) has all.
SCOPES = ("read", "deploy")
ADMIN = "admin"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VALUE_PREFIX = "fdt_"  # recognisable in a leaked file or log
LAST_USED_PERSIST_SECONDS = 60


class TokenRow(Base):
    """One token (created by migration 2 of the state store)."""

    __tablename__ = "api_tokens"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    scope: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(Text, unique=True)
    created_unix: Mapped[int] = mapped_column(BigInteger)
    created_by: Mapped[str] = mapped_column(Text)
    last_used_unix: Mapped[int | None] = mapped_column(BigInteger)
    revoked_unix: Mapped[int | None] = mapped_column(BigInteger)
    revoked_by: Mapped[str | None] = mapped_column(Text)


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


def _token(row: TokenRow) -> ApiToken:
    return ApiToken(row.name, row.scope, row.created_unix, row.created_by,
                    row.last_used_unix or 0, row.revoked_unix or 0, row.revoked_by or "")


class ApiTokens:
    """The tokens, kept in memory too (a request's check never waits on the disk,
    but for the once-a-minute note of its last use)."""

    def __init__(self, state: DominatorState) -> None:
        self.engine = state.engine
        self._lock = threading.Lock()
        with Session(self.engine) as session:
            rows = list(session.scalars(sa.select(TokenRow)))
        self._tokens = {row.name: _token(row) for row in rows}
        self._by_digest = {row.sha256: row.name for row in rows}
        self._used_stored = {row.name: row.last_used_unix or 0 for row in rows}

    def create(self, name: str, scope: str, by: str) -> tuple[ApiToken, str]:
        """A new token: its record and its value (returned this once, never kept)."""
        if not NAME.fullmatch(name):
            raise FleetError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if name == ADMIN:
            raise FleetError(f"token name {ADMIN!r} is the default token's: choose another")
        if scope not in SCOPES:
            raise FleetError(f"token scope {scope!r}: use one of {', '.join(SCOPES)}")
        value = VALUE_PREFIX + secrets.token_urlsafe(32)
        token = ApiToken(name, scope, int(time.time()), by)
        with self._lock:
            known = self._tokens.get(name)
            if known is not None:
                state = "revoked" if known.revoked_unix else "in force"
                raise ExistsError(f"token {name!r} exists ({state}): names are never reused, "
                                  "choose another")
            with Session(self.engine) as session, session.begin():
                session.add(TokenRow(name=name, scope=scope, sha256=digest(value),
                                     created_unix=token.created_unix, created_by=by))
            self._tokens[name] = token
            self._by_digest[digest(value)] = name
        return token, value

    def list(self) -> list[ApiToken]:
        """Every token, revoked ones too, by name."""
        with self._lock:
            return sorted(self._tokens.values(), key=lambda token: token.name)

    def revoke(self, name: str, by: str) -> ApiToken:
        """Refuse the token from now on (its record stays)."""
        with self._lock:
            token = self._tokens.get(name)
            if token is None:
                raise NotFoundError(f"no token named {name!r}")
            if token.revoked_unix:
                raise FleetError(f"token {name!r} is revoked already")
            token = replace(token, revoked_unix=int(time.time()), revoked_by=by)
            with Session(self.engine) as session, session.begin():
                session.execute(sa.update(TokenRow).where(TokenRow.name == name).values(
                    revoked_unix=token.revoked_unix, revoked_by=by))
            self._tokens[name] = token
        return token

    def check(self, value: str) -> ApiToken | None:
        """The token in force whose value this is (None: unknown or revoked); notes
        its use."""
        with self._lock:
            name = self._by_digest.get(digest(value))
            token = self._tokens.get(name) if name else None
            if token is None or token.revoked_unix:
                return None
            now = int(time.time())
            token = self._tokens[token.name] = replace(token, last_used_unix=now)
            if now - self._used_stored.get(token.name, 0) >= LAST_USED_PERSIST_SECONDS:
                with Session(self.engine) as session, session.begin():
                    session.execute(sa.update(TokenRow).where(TokenRow.name == token.name)
                                    .values(last_used_unix=now))
                self._used_stored[token.name] = now
            return token
