"""Deploys in the database the dominators share (the PostgreSQL MDB's, else the state
file): one row per deploy (its request, its status, its whole state as JSON), on typed
SQLAlchemy models over the table the migrations made, so existing state files load as
they are.

Each running deploy has a runner lease in its row: the dominator running it (`runner`),
a fencing token (`runner_token`: from a sequence on PostgreSQL, max + 1 on SQLite, so
it only grows) and an expiry by the database clock (`runner_expires`; none on SQLite,
where one dominator runs everything). Every save by a runner is fenced by its token:
`UPDATE ... WHERE id = ? AND runner_token = ?`, so a runner whose deploy another
dominator took over writes nothing. A cancel asked through a dominator that does not
run the deploy is recorded in the row (`cancel_requested`) for the runner to pick up."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import BigInteger, Connection, DateTime, Float, Integer, Text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dominator.deploy.errors import Conflict
from dominator.deploy.model import Deploy, DeployStatus, Phase
from dominator.herd.leases import DEFAULT_LEASE_SECONDS
from fleetlib.sql.schema import History, open_schema

HISTORY = History("deploys", Path(__file__).with_name("revisions"), "deploy_schema_version")


class Base(DeclarativeBase):
    """The deploy stage's tables (created by HISTORY's revisions, never by create_all)."""


class DeployRow(Base):
    """One deploy: the request and the state as JSON text, and its runner lease."""

    __tablename__ = "deploys"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    image: Mapped[str] = mapped_column(Text)
    dry_run: Mapped[int] = mapped_column(Integer)
    request: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(Text)
    created_unix: Mapped[float] = mapped_column(Float, index=True)
    updated_unix: Mapped[float] = mapped_column(Float)
    runner: Mapped[str | None] = mapped_column(Text)
    runner_token: Mapped[int | None] = mapped_column(BigInteger)
    runner_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[str | None] = mapped_column(Text)


class KeyUsed(Conflict):
    """Another dominator inserted a deploy for this idempotency key first."""


@dataclass(frozen=True)
class Held:
    """A deploy this dominator runs, as a lease round saw it."""

    token: int
    cancel: dict[str, Any] | None  # a cancel asked through another dominator


@dataclass(frozen=True)
class Claimed:
    """A deploy a lease round claimed: as saved, its new token, who ran it before."""

    deploy: Deploy
    token: int
    previous: str  # the runner before ("": none, or it was given back)


@dataclass(frozen=True)
class Round:
    """One lease round: the deploys renewed (id -> Held) and the ones claimed."""

    renewed: Mapping[str, Held]
    claimed: list[Claimed]


LOADED = (DeployRow.request, DeployRow.state, DeployRow.runner, DeployRow.cancel_requested)
FREE = "(runner IS NULL OR runner_expires IS NULL OR runner_expires <= now())"


def _loaded(request: str, state: str, runner: str | None, cancel: str | None) -> Deploy:
    """A deploy from its row: the runner named, a cancel asked of its runner and not
    yet picked up shown (and honoured by whoever resumes it)."""
    deploy = Deploy.from_row(json.loads(request), json.loads(state))
    deploy.runner = runner or ""
    if cancel and deploy.status == DeployStatus.RUNNING and deploy.phase != Phase.DONE:
        asked = json.loads(cancel)
        if deploy.cancel is None or (asked["rollback"] and not deploy.cancel["rollback"]):
            deploy.cancel = asked
    return deploy


class DeployStore:
    """Deploys in the shared database (thread-safe; callers use asyncio.to_thread).
    `runner` names this dominator in the leases it takes, for `lease_seconds`."""

    def __init__(self, engine: sa.Engine, runner: str = "",
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.engine = engine
        self.runner = runner
        self.lease_seconds = lease_seconds
        self.postgres = engine.dialect.name == "postgresql"
        open_schema(engine, HISTORY)
        self._lock = threading.Lock()

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A write transaction (the lock keeps this process's writers in turn)."""
        with self._lock, self.engine.begin() as conn:
            yield conn

    def _bound(self, conn: Connection) -> None:
        """PostgreSQL: no statement, lock wait or idle pause holds a lease transaction
        (and its row locks) longer than a third of the lease, as the shard leases do."""
        if self.postgres:
            conn.execute(sa.text(
                "SELECT set_config('statement_timeout', :ms, true), "
                "set_config('lock_timeout', :ms, true), "
                "set_config('idle_in_transaction_session_timeout', :ms, true)"),
                {"ms": str(max(1, int(self.lease_seconds * 1000 / 3)))})

    def _tokens(self, conn: Connection, count: int) -> list[int]:
        """`count` new fencing tokens, each greater than any given before."""
        if self.postgres:
            return [int(token) for token in conn.execute(sa.text(
                "SELECT nextval('deploy_runner_token') FROM generate_series(1, :n)"),
                {"n": count}).scalars()]
        last = int(conn.execute(sa.text(
            "SELECT COALESCE(MAX(runner_token), 0) FROM deploys")).scalar_one())
        return list(range(last + 1, last + 1 + count))

    def _lease(self, conn: Connection, ids: list[str]) -> list[tuple[str, int]]:
        """Make this dominator the runner of `ids` with new tokens (and an expiry)."""
        granted = list(zip(ids, self._tokens(conn, len(ids)), strict=True))
        expires = sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, self.lease_seconds) \
            if self.postgres else None
        for deploy_id, token in granted:
            conn.execute(sa.update(DeployRow).where(DeployRow.id == deploy_id).values(
                runner=self.runner, runner_token=token, runner_expires=expires))
        return granted

    def insert(self, deploy: Deploy, claim: bool = True) -> int | None:
        """Store a new deploy, this dominator its runner when `claim` (its token).
        Conflict when a running deploy holds one of its hosts (dry runs hold none),
        KeyUsed when its idempotency key was used meanwhile."""
        try:
            with self._begin() as conn:
                if self.postgres:  # submitters on every dominator check in turn
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                                 {"key": "fleet-deploy-submit"})
                if not deploy.dry_run:
                    self._check_hosts(conn, deploy)
                conn.execute(sa.insert(DeployRow).values(
                    id=deploy.id, idempotency_key=deploy.idempotency_key,
                    image=deploy.request["image"], dry_run=int(deploy.dry_run),
                    request=json.dumps(deploy.request), status=deploy.status,
                    reason=deploy.reason, state=json.dumps(deploy.to_record()),
                    created_unix=deploy.created_unix, updated_unix=deploy.updated_unix))
                if not claim:
                    return None
                [(_, token)] = self._lease(conn, [deploy.id])
        except IntegrityError:
            if deploy.idempotency_key and self.by_key(deploy.idempotency_key) is not None:
                raise KeyUsed(f"Idempotency-Key {deploy.idempotency_key!r} was just used "
                              "through another dominator") from None
            raise
        deploy.runner = self.runner
        return token

    def _check_hosts(self, conn: Connection, deploy: Deploy) -> None:
        wanted = set(deploy.hosts)
        for other in self._load_with(conn, sa.select(DeployRow).where(
                DeployRow.status == DeployStatus.RUNNING, DeployRow.dry_run == 0)
                .order_by(DeployRow.created_unix)):
            if other.phase == Phase.DONE:
                continue
            shared = sorted(wanted & set(other.hosts))
            if shared:
                raise Conflict(f"host {shared[0]} is in running deploy {other.id} "
                               f"({other.request['image']}); cancel it or wait for it to end")

    def save(self, deploy: Deploy, token: int) -> bool:
        """Store a deploy's new state if this runner's token still holds it; False:
        the lease is lost (another dominator claimed it), nothing was written."""
        with self._begin() as conn:
            self._bound(conn)
            done = conn.execute(sa.update(DeployRow).where(
                DeployRow.id == deploy.id, DeployRow.runner_token == token)
                .values(status=deploy.status, reason=deploy.reason,
                        state=json.dumps(deploy.to_record()), updated_unix=deploy.updated_unix))
        return bool(done.rowcount)

    def round(self, held: Mapping[str, int], wanted: int, mine: bool = False) -> Round:
        """One lease round in one transaction: renew the deploys `held` (id -> token)
        that this dominator still runs, then claim up to `wanted` running deploys with
        no runner or an expired one, and with `mine` every one its name runs and it does
        not hold (as a restarted dominator takes its previous process's at once; on
        SQLite, every running one: there is one dominator)."""
        with self._begin() as conn:
            self._bound(conn)
            renewed = self._renew(conn, held)
            previous = dict(self._claimable(conn, wanted, False)) if wanted > 0 else {}
            if mine:
                previous.update((deploy_id, runner) for deploy_id, runner
                                in self._claimable(conn, None, True) if deploy_id not in held)
            claimed = []
            for deploy_id, token in self._lease(conn, list(previous)):
                [found] = self._load_with(conn, sa.select(DeployRow)
                                          .where(DeployRow.id == deploy_id))
                claimed.append(Claimed(found, token, previous[deploy_id] or ""))
        return Round(renewed, claimed)

    def _renew(self, conn: Connection, held: Mapping[str, int]) -> dict[str, Held]:
        if not held:
            return {}
        tokens = list(held.values())
        if self.postgres:
            rows = conn.execute(sa.text(
                "UPDATE deploys SET runner_expires = now() + make_interval(secs => :lease) "
                "WHERE runner = :me AND runner_token = ANY(:tokens) AND runner_expires > now() "
                "RETURNING id, runner_token, cancel_requested"),
                {"lease": self.lease_seconds, "me": self.runner, "tokens": tokens}).all()
        else:
            rows = conn.execute(sa.select(DeployRow.id, DeployRow.runner_token,
                                          DeployRow.cancel_requested)
                                .where(DeployRow.runner == self.runner,
                                       DeployRow.runner_token.in_(tokens))).all()
        return {row[0]: Held(int(row[1]), json.loads(row[2]) if row[2] else None)
                for row in rows if held.get(row[0]) == row[1]}

    def _claimable(self, conn: Connection, wanted: int | None,
                   mine: bool) -> list[tuple[str, str | None]]:
        """Running deploys to claim (id, runner), oldest first, at most `wanted` (None:
        all), locked (PostgreSQL): free or expired ones, or (`mine`) this runner's."""
        if self.postgres:
            return [(row[0], row[1]) for row in conn.execute(sa.text(
                "SELECT id, runner FROM deploys WHERE status = 'RUNNING' AND "
                f"{'runner = :me' if mine else FREE} ORDER BY created_unix LIMIT :wanted "
                "FOR UPDATE SKIP LOCKED"), {"me": self.runner, "wanted": wanted})]
        query = sa.select(DeployRow.id, DeployRow.runner).where(
            DeployRow.status == DeployStatus.RUNNING)
        if not mine:
            query = query.where(DeployRow.runner.is_(None))
        return [(row[0], row[1]) for row in conn.execute(
            query.order_by(DeployRow.created_unix).limit(wanted))]

    def release(self, held: Mapping[str, int]) -> None:
        """Give back the deploys `held` (a clean stop), so another dominator takes them
        at its next round instead of after expiry. The token stays: a late save of
        this process is still refused once another one claims the deploy."""
        if held:
            with self._begin() as conn:
                self._bound(conn)
                conn.execute(sa.update(DeployRow).where(
                    DeployRow.runner == self.runner,
                    DeployRow.runner_token.in_(list(held.values())))
                    .values(runner=None, runner_expires=None))

    def request_cancel(self, deploy_id: str, rollback: bool, unix: float) -> Deploy | None:
        """Record a cancel for the deploy's runner to pick up (a rollback one replaces
        one without); the deploy as it now reads, or None when there is none."""
        with self._begin() as conn:
            row = conn.execute(sa.select(DeployRow.status, DeployRow.cancel_requested)
                               .where(DeployRow.id == deploy_id)).first()
            if row is None:
                return None
            asked = json.loads(row.cancel_requested) if row.cancel_requested else None
            if row.status == DeployStatus.RUNNING and (
                    asked is None or (rollback and not asked["rollback"])):
                conn.execute(sa.update(DeployRow).where(DeployRow.id == deploy_id).values(
                    cancel_requested=json.dumps({"rollback": rollback,
                                                 "requestedUnix": unix})))
            [deploy] = self._load_with(conn, sa.select(DeployRow)
                                       .where(DeployRow.id == deploy_id))
        return deploy

    @staticmethod
    def _load_with(conn: Connection, query: sa.Select[Any]) -> list[Deploy]:
        return [_loaded(*row) for row in conn.execute(query.with_only_columns(*LOADED))]

    def _load(self, query: sa.Select[Any]) -> list[Deploy]:
        with self.engine.connect() as conn:
            return self._load_with(conn, query)

    def get(self, deploy_id: str) -> Deploy | None:
        """The deploy of that id, or None."""
        found = self._load(sa.select(DeployRow).where(DeployRow.id == deploy_id))
        return found[0] if found else None

    def by_key(self, key: str) -> Deploy | None:
        """The deploy made for that idempotency key, or None."""
        found = self._load(sa.select(DeployRow).where(DeployRow.idempotency_key == key))
        return found[0] if found else None

    def newest(self, limit: int, status: str | None = None,
               dry_run: bool | None = None) -> list[Deploy]:
        """Deploys, newest first (optionally of one status, only dry runs or none)."""
        query = sa.select(DeployRow)
        if status:
            query = query.where(DeployRow.status == status)
        if dry_run is not None:
            query = query.where(DeployRow.dry_run == int(dry_run))
        return self._load(query.order_by(DeployRow.created_unix.desc(), DeployRow.id.desc())
                          .limit(limit))

    def counts(self) -> dict[DeployStatus, int]:
        """Deploys by status, every status present (for /metrics)."""
        counts = dict.fromkeys(DeployStatus, 0)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(DeployRow.status, sa.func.count())
                                .group_by(DeployRow.status))
            counts.update({DeployStatus(status): count for status, count in rows})
        return counts

