"""Deploys in the dominator's state database: one row per deploy (its request, its
status, its whole state as JSON), on typed SQLAlchemy models over the table the
first migration made, so existing state databases load as they are."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Float, Integer, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dominator.deploy.model import Deploy, DeployStatus
from fleetlib.sql.schema import History, open_schema

HISTORY = History("deploys", Path(__file__).with_name("revisions"), "deploy_schema_version")


class Base(DeclarativeBase):
    """The deploy stage's tables (created by HISTORY's revisions, never by create_all)."""


class DeployRow(Base):
    """One deploy: the request and the state as JSON text."""

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


class DeployStore:
    """Deploys in the state database (thread-safe; callers use asyncio.to_thread)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        open_schema(engine, HISTORY)
        self._lock = threading.Lock()

    def _write(self, statement: sa.Executable) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(statement)

    def insert(self, deploy: Deploy) -> None:
        """Store a new deploy."""
        self._write(sa.insert(DeployRow).values(
            id=deploy.id, idempotency_key=deploy.idempotency_key,
            image=deploy.request["image"], dry_run=int(deploy.dry_run),
            request=json.dumps(deploy.request), status=deploy.status, reason=deploy.reason,
            state=json.dumps(deploy.to_record()), created_unix=deploy.created_unix,
            updated_unix=deploy.updated_unix))

    def save(self, deploy: Deploy) -> None:
        """Store a deploy's new state."""
        self._write(sa.update(DeployRow).where(DeployRow.id == deploy.id).values(
            status=deploy.status, reason=deploy.reason, state=json.dumps(deploy.to_record()),
            updated_unix=deploy.updated_unix))

    def _load(self, query: sa.Select[DeployRow]) -> list[Deploy]:
        with self._lock, self.engine.connect() as conn:
            rows = list(conn.execute(query.with_only_columns(DeployRow.request,
                                                             DeployRow.state)))
        return [Deploy.from_row(json.loads(request), json.loads(state))
                for request, state in rows]

    def get(self, deploy_id: str) -> Deploy | None:
        """The deploy of that id, or None."""
        found = self._load(sa.select(DeployRow).where(DeployRow.id == deploy_id))
        return found[0] if found else None

    def by_key(self, key: str) -> Deploy | None:
        """The deploy made for that idempotency key, or None."""
        found = self._load(sa.select(DeployRow).where(DeployRow.idempotency_key == key))
        return found[0] if found else None

    def running(self) -> list[Deploy]:
        """Every running deploy, oldest first."""
        return self._load(sa.select(DeployRow).where(DeployRow.status == DeployStatus.RUNNING)
                          .order_by(DeployRow.created_unix))

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
        with self._lock, self.engine.connect() as conn:
            rows = conn.execute(sa.select(DeployRow.status, sa.func.count())
                                .group_by(DeployRow.status))
            counts.update({DeployStatus(status): count for status, count in rows})
        return counts
