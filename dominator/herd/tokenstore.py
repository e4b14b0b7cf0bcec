"""The store of the HTTP API's named tokens (dominator.herd.tokens), in the table
api_tokens of the state's database: only each token's SHA-256 is kept, with its
name, scope, who made it and when, when it was last used (to the minute) and
whether it is revoked. A name is never reused, so the `token:NAME` of an audit
entry always means one token.

That database is the dominator's state file, or, when the state is shared (a
PostgreSQL MDB, issue 11), the MDB's database, so a token made or revoked through
one dominator holds on every dominator of the MDB. Each keeps the tokens in memory
(a request's check never waits on the database) and, when shared, re-reads them
every `refresh_seconds` (revocations made elsewhere hold here within that), and at
once, at most every MISS_REREAD_SECONDS, when a request brings a digest it does not
know (a token just made elsewhere works at once; a flood of bad tokens costs the
database one read a second). Tokens a dominator made in its state file before its
state was shared are copied to the shared database as it starts."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy import BigInteger, Engine, Text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from dominator.herd.state import REFRESH_SECONDS, Base, DominatorState
from dominator.herd.tokens import ADMIN, NAME, SCOPES, VALUE_PREFIX, ApiToken, digest
from fleetlib.errors import ExistsError, FleetError, NotFoundError
from fleetlib.sql.engine import database_errors, describe_url, error_line, follow

log = logging.getLogger(__name__)

LAST_USED_PERSIST_SECONDS = 60
MISS_REREAD_SECONDS = 1.0  # shared: at most one re-read per this for unknown digests


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


def _token(row: TokenRow) -> ApiToken:
    return ApiToken(row.name, row.scope, row.created_unix, row.created_by,
                    row.last_used_unix or 0, row.revoked_unix or 0, row.revoked_by or "")


class ApiTokens:
    """The tokens, kept in memory too (a request's check never waits on the database,
    but for the once-a-minute note of its last use, and, when shared, the rate-limited
    re-read of an unknown digest). No database call holds the memory's lock."""

    def __init__(self, state: DominatorState,
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.engine = state.database
        self.shared = state.shared
        self._lock = threading.Lock()
        self._tokens: dict[str, ApiToken] = {}
        self._by_digest: dict[str, str] = {}
        self._used_stored: dict[str, int] = {}
        self._writes = 0  # tokens made or revoked by this process (see reload)
        self._missed_at = -MISS_REREAD_SECONDS  # monotonic time of the last miss re-read
        if self.shared:
            self._carry_over(state.engine)
        self.reload()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        if self.shared:
            # A revocation made elsewhere waits for the database to answer again.
            self._follower = threading.Thread(
                target=follow, name="token-refresh", daemon=True,
                args=(self._stop, refresh_seconds, self.reload,
                      f"tokens in {describe_url(self.engine.url)}", "keeping those last read"))
            self._follower.start()

    def _carry_over(self, own: Engine) -> None:
        """Copy the tokens of this dominator's state file (made before its state was
        shared) that the shared database lacks; one whose name is another token's
        there is left out, and logged."""
        with Session(own) as session:
            rows = [{column.key: getattr(row, column.key) for column in TokenRow.__table__.c}
                    for row in session.scalars(sa.select(TokenRow))]
        if not rows:
            return
        with self.engine.begin() as conn:
            there = {name: sha256 for name, sha256
                     in conn.execute(sa.select(TokenRow.name, TokenRow.sha256))}
            new = [row for row in rows if row["name"] not in there]
            if new:
                conn.execute(postgresql.insert(TokenRow).on_conflict_do_nothing(), new)
        if new:
            log.info("copied %d token(s) of the state file to the shared database: %s",
                     len(new), ", ".join(row["name"] for row in new))
        clashes = [row["name"] for row in rows if there.get(row["name"], row["sha256"])
                   != row["sha256"]]
        if clashes:
            log.warning("token(s) %s of the state file not shared: the shared database has "
                        "another token of that name (make a new one)", ", ".join(clashes))

    def close(self) -> None:
        """Stop following the shared database."""
        self._stop.set()
        if self._follower is not None:
            self._follower.join()

    def reload(self) -> None:
        """Read every token from the database into memory (what another dominator made
        or revoked); a last use noted here and not yet stored is kept. Read again when
        this process made or revoked a token meanwhile (the read may predate it)."""
        while True:
            with self._lock:
                writes = self._writes
            with Session(self.engine) as session:
                rows = list(session.scalars(sa.select(TokenRow)))
            if self._swap(rows, writes):
                return

    def _swap(self, rows: list[TokenRow], writes: int) -> bool:
        """Put the tokens read into memory, unless a write of this process came after
        the read began (False)."""
        with self._lock:
            if self._writes != writes:
                return False
            tokens = {}
            for row in rows:
                token = _token(row)
                known = self._tokens.get(token.name)
                if known is not None and known.last_used_unix > token.last_used_unix:
                    token = replace(token, last_used_unix=known.last_used_unix)
                tokens[token.name] = token
                stored = row.last_used_unix or 0
                if stored > self._used_stored.get(token.name, 0):
                    self._used_stored[token.name] = stored
            self._tokens = tokens
            self._by_digest = {row.sha256: row.name for row in rows}
        return True

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
        self._refuse_known(name)
        with database_errors(self.engine.url):
            try:
                with Session(self.engine) as session, session.begin():
                    session.add(TokenRow(name=name, scope=scope, sha256=digest(value),
                                         created_unix=token.created_unix, created_by=by))
            except IntegrityError:  # made meanwhile, here or through another dominator
                self.reload()
                self._refuse_known(name)
                raise ExistsError(f"token {name!r} exists: choose another") from None
        with self._lock:
            self._tokens[name] = token
            self._by_digest[digest(value)] = name
            self._writes += 1
        return token, value

    def _refuse_known(self, name: str) -> None:
        with self._lock:
            known = self._tokens.get(name)
        if known is not None:
            state = "revoked" if known.revoked_unix else "in force"
            raise ExistsError(f"token {name!r} exists ({state}): names are never reused, "
                              "choose another")

    def list(self) -> list[ApiToken]:
        """Every token, revoked ones too, by name (re-read first when shared)."""
        if self.shared:
            with database_errors(self.engine.url):
                self.reload()
        with self._lock:
            return sorted(self._tokens.values(), key=lambda token: token.name)

    def revoke(self, name: str, by: str) -> ApiToken:
        """Refuse the token from now on (its record stays)."""
        with database_errors(self.engine.url):
            if self.shared:
                self.reload()  # it may have been made, or revoked, through another dominator
            with self._lock:
                token = self._tokens.get(name)
            if token is None:
                raise NotFoundError(f"no token named {name!r}")
            if token.revoked_unix:
                raise FleetError(f"token {name!r} is revoked already")
            token = replace(token, revoked_unix=int(time.time()), revoked_by=by)
            with self.engine.begin() as conn:
                done = conn.execute(sa.update(TokenRow).where(
                    TokenRow.name == name, TokenRow.revoked_unix.is_(None)).values(
                    revoked_unix=token.revoked_unix, revoked_by=by)).rowcount
            if not done:  # revoked meanwhile through another dominator
                self.reload()
                raise FleetError(f"token {name!r} is revoked already")
        with self._lock:
            self._tokens[name] = replace(self._tokens.get(name, token),
                                         revoked_unix=token.revoked_unix, revoked_by=by)
            self._writes += 1
        return token

    def check(self, value: str) -> ApiToken | None:
        """The token in force whose value this is (None: unknown or revoked); notes
        its use."""
        key = digest(value)
        with self._lock:
            name = self._by_digest.get(key)
            reread = name is None and self.shared and \
                time.monotonic() - self._missed_at >= MISS_REREAD_SECONDS
            if reread:
                self._missed_at = time.monotonic()
        if reread:
            try:
                self.reload()
            except SQLAlchemyError as err:
                log.warning("tokens in %s unreadable, checking against those last read: %s",
                            describe_url(self.engine.url), error_line(err))
        now = int(time.time())
        with self._lock:
            name = self._by_digest.get(key)
            token = self._tokens.get(name) if name else None
            if token is None or token.revoked_unix:
                return None
            token = self._tokens[token.name] = replace(token, last_used_unix=now)
            persist = now - self._used_stored.get(token.name, 0) >= LAST_USED_PERSIST_SECONDS
            if persist:
                self._used_stored[token.name] = now  # tried once a minute, even if it fails
        if persist:
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.update(TokenRow).where(TokenRow.name == token.name)
                                 .values(last_used_unix=now))
            except SQLAlchemyError as err:
                log.warning("cannot note the use of token %s in %s: %s", token.name,
                            describe_url(self.engine.url), error_line(err))
        return token
