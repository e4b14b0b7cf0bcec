"""The ORM mapping of the MDB's tables as the latest migration leaves them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The MDB's tables (created by the revisions in mdb/revisions, never by create_all)."""


class MachineRow(Base):
    """One machine; the columns mirror mdb.machine.Machine (tags as JSON text)."""

    __tablename__ = "machines"

    hostname: Mapped[str] = mapped_column(String(253), primary_key=True)
    address: Mapped[str] = mapped_column(String)
    required_image: Mapped[str] = mapped_column(String, index=True)
    planned_image: Mapped[str] = mapped_column(String)
    disable_updates: Mapped[bool]
    owner_group: Mapped[str] = mapped_column(String)
    tags: Mapped[str] = mapped_column(Text)
    updated_unix: Mapped[int] = mapped_column(BigInteger)
    location: Mapped[str] = mapped_column(String)


class RevisionRow(Base):
    """The single row (id 1) whose counter moves with every committed change."""

    __tablename__ = "mdb_revision"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    revision: Mapped[int] = mapped_column(BigInteger)


class DominatorRow(Base):
    """One running dominator process (a new id each start), heartbeating by the
    database clock."""

    __tablename__ = "dominators"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    name: Mapped[str] = mapped_column(String)
    address: Mapped[str] = mapped_column(String)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_renewal: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ShardLeaseRow(Base):
    """One shard of the hosts: its owner (a DominatorRow.id; None: free), the fencing
    token of the current grant and when the lease expires (None on SQLite: never)."""

    __tablename__ = "shard_leases"

    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    owner: Mapped[int | None] = mapped_column(BigInteger)
    token: Mapped[int] = mapped_column(BigInteger)
    granted: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LeaseSettingsRow(Base):
    """The single row (id 1) fixing the shard count, and SQLite's token counter."""

    __tablename__ = "lease_settings"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shards: Mapped[int]
    last_token: Mapped[int] = mapped_column(BigInteger)
