"""The ORM mapping of the MDB's tables as the latest migration leaves them."""

from __future__ import annotations

from sqlalchemy import BigInteger, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The MDB's tables (created by mdb.migrations, never by create_all)."""


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
