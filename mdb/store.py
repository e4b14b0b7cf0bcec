"""The machine database: machines in SQLite or PostgreSQL, with a revision counter that
moves with every committed change (the dominator reloads when it moves: on SQLite it
polls the integer, on PostgreSQL the change feed of mdb/feed.py wakes it at each commit)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from fleetlib.errors import FleetError, NotFoundError
from fleetlib.sql.engine import database_errors, describe_url, open_engine, writer
from fleetlib.sql.schema import History, open_schema
from mdb.machine import Machine, check_unique_hostnames
from mdb.models import MachineRow, RevisionRow

log = logging.getLogger(__name__)

T = TypeVar("T")
# Machine fields stored as plain columns of the same name (tags are JSON text).
PLAIN_FIELDS = tuple(f.name for f in dataclasses.fields(Machine) if f.name != "tags")
UPDATABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(Machine)) - {"hostname"}
Outcome = Literal["added", "changed", "same"]
HISTORY = History("mdb", Path(__file__).with_name("revisions"), "schema_version",
                  ("sqlite", "postgresql"))


def _machine(row: MachineRow) -> Machine:
    """The machine a row holds; FleetError naming the host when the row is invalid
    (written by another tool, or valid under older rules)."""
    try:
        return Machine(**{name: getattr(row, name) for name in PLAIN_FIELDS},
                       tags=json.loads(row.tags))
    except FleetError as err:
        raise FleetError(f"MDB row {row.hostname!r}: {err}") from None
    except (ValueError, TypeError) as err:  # tags that are not a JSON object
        raise FleetError(f"MDB row {row.hostname!r}: Tags: not a JSON object of "
                         f"strings ({err})") from None


@dataclasses.dataclass(frozen=True)
class InvalidRow:
    """A row of the machines table that is not a valid machine, and why."""

    hostname: str
    reason: str


def _store(session: Session, machine: Machine, row: MachineRow | None) -> Outcome:
    """Make `row` (None: no row yet) hold `machine`; touch nothing if it does."""
    if row is not None and _machine(row) == machine:
        return "same"
    values: dict[str, Any] = {name: getattr(machine, name) for name in PLAIN_FIELDS}
    values.update(tags=json.dumps(dict(machine.tags), sort_keys=True),
                  updated_unix=int(time.time()))
    if row is None:
        session.add(MachineRow(**values))
        return "added"
    for name, value in values.items():
        setattr(row, name, value)
    return "changed"


def _existing(session: Session, hostname: str) -> MachineRow:
    row = session.get(MachineRow, hostname)
    if row is None:
        raise NotFoundError(f"machine {hostname!r} is not in the MDB")
    return row


class Mdb:
    """The MDB at a SQLAlchemy URL (or a SQLite file path), migrated on open (SQLite) or
    checked to be at this program's schema (PostgreSQL, see fleetlib.sql.schema).
    Every call is its own session and transaction, so the methods may be called
    from several threads (e.g. through `asyncio.to_thread`)."""

    def __init__(self, url: str) -> None:
        self._engine = open_engine(url)
        self.url = describe_url(self._engine.url)
        try:
            with database_errors(self._engine.url):
                self.schema_revision = open_schema(self._engine, HISTORY)
        except FleetError:
            self._engine.dispose()
            raise
        self._reader = sessionmaker(self._engine)
        self._writer = sessionmaker(writer(self._engine))
        log.debug("opened MDB %s at schema %s", self.url, self.schema_revision)

    def __enter__(self) -> Mdb:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def engine_url(self) -> sa.URL:
        """The database's URL (password included: for the change feed, mdb/feed.py)."""
        return self._engine.url

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def _read(self, query: Callable[[Session], T]) -> T:
        with database_errors(self._engine.url), self._reader() as session:
            return query(session)

    def _write(self, change: Callable[[Session], tuple[T, bool]]) -> T:
        """Run `change` (returning its result and whether it changed anything) in
        one transaction that commits, moving the revision, only if it did. The
        revision row is updated first: on PostgreSQL its row lock queues writers,
        so each one reads what the previous committed."""
        with database_errors(self._engine.url), self._writer() as session:
            session.execute(sa.update(RevisionRow).values(revision=RevisionRow.revision + 1))
            result, changed = change(session)
            if changed:
                session.commit()
            return result

    def revision(self) -> int:
        """One cheap single-row read; it moves on every committed change, and only then
        (on PostgreSQL also for SQL written straight into machines, revision mdb_0005)."""
        return self._read(lambda session: session.execute(
            sa.select(RevisionRow.revision)).scalar_one())

    def get(self, hostname: str) -> Machine | None:
        """The machine, or None if the MDB does not know it."""
        def query(session: Session) -> Machine | None:
            row = session.get(MachineRow, hostname)
            return None if row is None else _machine(row)
        return self._read(query)

    def hostnames(self) -> list[str]:
        """Every hostname, valid row or not, sorted (one column: cheap on a large MDB)."""
        return sorted(self._read(lambda session: list(session.scalars(
            sa.select(MachineRow.hostname)))))

    def set(self, machine: Machine) -> None:
        """Add the machine, or replace what the MDB says about it."""
        def change(session: Session) -> tuple[None, bool]:
            row = session.get(MachineRow, machine.hostname)
            return None, _store(session, machine, row) != "same"
        self._write(change)

    def update(self, hostname: str, /, **fields: Any) -> Machine:
        """Change some fields of a known machine (`required_image="web/2"`) and
        return the result; unknown hosts are a NotFoundError."""
        unknown = sorted(set(fields) - UPDATABLE_FIELDS)
        if unknown:
            raise FleetError(f"cannot update machine field {unknown[0]!r}: "
                             f"fields are {', '.join(sorted(UPDATABLE_FIELDS))}")

        def change(session: Session) -> tuple[Machine, bool]:
            row = _existing(session, hostname)
            machine = dataclasses.replace(_machine(row), **fields)
            return machine, _store(session, machine, row) != "same"
        return self._write(change)

    def delete(self, hostname: str) -> None:
        """Forget a machine; unknown hosts are a NotFoundError."""
        def change(session: Session) -> tuple[None, bool]:
            session.delete(_existing(session, hostname))
            return None, True
        self._write(change)

    def import_machines(self, machines: Sequence[Machine],
                        replace: bool = False) -> tuple[int, int, int]:
        """Add or change every machine given, in one transaction (all or nothing);
        with `replace`, also remove every machine not given. Returns how many
        machines were (added, changed, removed)."""
        check_unique_hostnames(machines, "import")

        def change(session: Session) -> tuple[tuple[int, int, int], bool]:
            rows = {row.hostname: row for row in session.scalars(sa.select(MachineRow))}
            outcomes = Counter(_store(session, machine, rows.pop(machine.hostname, None))
                               for machine in machines)
            removed = list(rows.values()) if replace else []
            for row in removed:
                session.delete(row)
            counts = (outcomes["added"], outcomes["changed"], len(removed))
            return counts, any(counts)
        counts = self._write(change)
        log.info("MDB import into %s: %d added, %d changed, %d removed", self.url, *counts)
        return counts

    def export_machines(self) -> list[Machine]:
        """Every machine, sorted by hostname (for `mdb export`)."""
        return self.list()

    def load(self) -> tuple[list[Machine], list[InvalidRow]]:
        """Every valid machine (sorted by hostname) and every invalid row: what the
        dominator follows, so that one bad row marks its own host and no other."""
        def query(session: Session) -> tuple[list[Machine], list[InvalidRow]]:
            valid: list[Machine] = []
            invalid: list[InvalidRow] = []
            for row in session.scalars(sa.select(MachineRow)):
                try:
                    valid.append(_machine(row))
                except FleetError as err:
                    invalid.append(InvalidRow(row.hostname, str(err)))
            return valid, invalid
        valid, invalid = self._read(query)
        return (sorted(valid, key=lambda machine: machine.hostname),
                sorted(invalid, key=lambda row: row.hostname))

    # Last, so that the `list[...]` annotations above mean the builtin.
    def list(self, select: Callable[[Machine], bool] | None = None) -> list[Machine]:
        """The machines `select` accepts (all by default), sorted by hostname in
        Python, so the order does not depend on the database's collation."""
        machines = self._read(lambda session: [_machine(row) for row in
                                               session.scalars(sa.select(MachineRow))])
        return sorted((machine for machine in machines if select is None or select(machine)),
                      key=lambda machine: machine.hostname)
