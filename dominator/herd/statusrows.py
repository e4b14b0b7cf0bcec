"""Status rows: how every dominator on one shared database shows every host.

The dominator supervising a host (holding its shard) writes the host's row of
`host_status` when what operators see of it changes: status, error, times, history,
kept paths, current image. Writes are batched: every BATCH_SECONDS one transaction
holds every host that changed since the last one (an upsert each), and none is made
when nothing changed, save the writer's heartbeat row in `host_status_writers` once a
lease. Times alone (a poll, a scan, a sync) are written at most every TIMES_SECONDS
per host. While the database fails the latest state of each host waits (no queue
grows), the outage is logged once, and the batch is retried.

Every READ_SECONDS each dominator reads the rows updated since its last read (a full
read every FULL_READ_SECONDS) and mirrors them into the herd's subs of hosts it does
not supervise: status (through `Sub.set_status`, so listeners such as a deploy's hear
the owner's verdicts), error, times, history, owner, and the current image into the
state's memory. A mirrored sub is flagged `mirrored` and never polled or mutated here.
A row is shown only while its writer holds the host's shard and its heartbeat is
fresh (STALE_LEASES lease periods); else the host reads `managed elsewhere` saying
who last reported it and when. A row that does not validate (a buggy or hostile
peer) shows the host `managed elsewhere` with the reason, never a traceback.

With SQLite (one dominator owns every host) nothing here runs and nothing is written.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import BigInteger, Connection, Engine, Float, Integer, Text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from dominator.herd.state import Base, DominatorState
from dominator.herd.status import Status
from dominator.herd.watch import SETTLED
from fleetlib.audit import format_time
from fleetlib.fstree.listing import quote
from fleetlib.sql.engine import describe_url, error_line
from mdb.machine import Machine

if TYPE_CHECKING:
    from dominator.herd.ownership import Ownership


class Sub(Protocol):
    """What the rows read and set of the herd's Sub (dominator/herd/herd.py)."""

    machine: Machine
    status: Status
    last_error: str
    last_poll_unix: float
    last_scan_unix: float
    change_window_ns: int
    history: collections.deque[tuple[float, str, str]]
    kept_paths: tuple[str, ...]
    owner: str
    mirrored: bool
    repeats: int
    listeners: list[Callable[[str, str], None]]
    task: asyncio.Task[None] | None

    def set_status(self, status: Status, error: str = "") -> None: ...

log = logging.getLogger(__name__)

BATCH_SECONDS = 0.5     # between write transactions (each holds every host that changed)
TIMES_SECONDS = 30.0    # a host whose times alone moved is written at most this often
READ_SECONDS = 2.0      # between reads of the rows other dominators wrote
FULL_READ_SECONDS = 60.0  # between reads of every row (else: those updated since)
READ_MARGIN = 10.0      # seconds re-read before the last read: a writer's open transaction
WRITE_TIMEOUT_MS = 5000  # a write transaction's statements give up after this (PostgreSQL)
STALE_LEASES = 3        # a writer silent for this many lease periods: its rows are stale
REPEATS = 2             # the most repeats of one verdict a row counts (Sub.repeats), for
#                         the listeners of the mirror (a deploy counts failure verdicts)
MAX_TEXT = 4000         # characters of an error or history message written
MAX_PATHS = 1000        # kept paths written
MAX_HISTORY = 50        # transitions written and read
MAX_NAME = 255          # characters of an owner name read
READ_CHUNK = 1000       # rows read by one query


class HostStatusRow(Base):
    """What the dominator supervising a host shows of it (JSON: kept_paths, history)."""

    __tablename__ = "host_status"

    hostname: Mapped[str] = mapped_column(Text, primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    last_error: Mapped[str] = mapped_column(Text)
    repeats: Mapped[int] = mapped_column(Integer)
    last_poll_unix: Mapped[int] = mapped_column(BigInteger)
    last_scan_unix: Mapped[int] = mapped_column(BigInteger)
    last_sync_unix: Mapped[int] = mapped_column(BigInteger)
    change_window_ns: Mapped[int] = mapped_column(BigInteger)
    current_image: Mapped[str] = mapped_column(Text)
    kept_paths: Mapped[str] = mapped_column(Text)
    history: Mapped[str] = mapped_column(Text)
    updated: Mapped[float] = mapped_column(Float)


class HostStatusWriterRow(Base):
    """A writing dominator's heartbeat (its rows are current while it beats)."""

    __tablename__ = "host_status_writers"

    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    updated: Mapped[float] = mapped_column(Float)


class BadRow(ValueError):
    """A status row that does not validate (`updated`: when it was written)."""

    updated: float = 0.0


Transition = tuple[float, str, str]  # unix, status, error (as Sub.history holds them)


@dataclass(frozen=True)
class HostStatus:
    """One host's status row, as written and as read back (validated)."""

    hostname: str
    owner: str
    status: Status
    last_error: str = ""
    repeats: int = 0  # further verdicts like the last transition (at most REPEATS)
    last_poll_unix: int = 0
    last_scan_unix: int = 0
    last_sync_unix: int = 0
    change_window_ns: int = 0
    current_image: str = ""
    kept_paths: tuple[str, ...] = ()
    history: tuple[Transition, ...] = ()
    updated: float = 0.0  # when written, by the database's clock

    @classmethod
    def of(cls, sub: Sub, owner: str, current_image: str, last_sync_unix: int) -> HostStatus:
        """The row of a sub this dominator supervises (texts bounded)."""
        return cls(sub.machine.hostname, owner, sub.status, sub.last_error[:MAX_TEXT],
                   repeats(sub), int(sub.last_poll_unix), int(sub.last_scan_unix),
                   last_sync_unix, sub.change_window_ns, current_image,
                   sub.kept_paths[:MAX_PATHS],
                   tuple((unix, status, error[:MAX_TEXT])
                         for unix, status, error in list(sub.history)[-MAX_HISTORY:]))

    def values(self) -> dict[str, Any]:
        """The row's columns (but `updated`)."""
        return {"hostname": self.hostname, "owner": self.owner, "status": self.status.value,
                "last_error": self.last_error, "repeats": self.repeats,
                "last_poll_unix": self.last_poll_unix, "last_scan_unix": self.last_scan_unix,
                "last_sync_unix": self.last_sync_unix,
                "change_window_ns": self.change_window_ns,
                "current_image": self.current_image,
                "kept_paths": json.dumps(list(self.kept_paths)),
                "history": json.dumps([list(entry) for entry in self.history])}

    @classmethod
    def parse(cls, row: Mapping[Any, Any]) -> HostStatus:
        """A row read back; BadRow saying what is wrong with it."""
        owner = _text(row, "owner")
        if not owner or len(owner) > MAX_NAME:
            raise BadRow(f"owner {quote(owner[:MAX_NAME])!r} is not a dominator name")
        try:
            kept = json.loads(_text(row, "kept_paths"))
            history = json.loads(_text(row, "history"))
        except ValueError as err:
            raise BadRow(f"not JSON: {err}") from None
        if not isinstance(kept, list) or not all(isinstance(path, str) for path in kept):
            raise BadRow("kept_paths is not a list of paths")
        if not isinstance(history, list):
            raise BadRow("history is not a list")
        transitions = []
        for entry in history[-MAX_HISTORY:]:
            if not (isinstance(entry, list) and len(entry) == 3 and _number(entry[0])
                    and isinstance(entry[1], str) and isinstance(entry[2], str)):
                raise BadRow("a history entry is not [unix, status, error]")
            transitions.append((float(entry[0]), entry[1], entry[2]))
        return cls(row["hostname"], owner, _status(_text(row, "status")),
                   _text(row, "last_error"), _count(row, "repeats", REPEATS),
                   _count(row, "last_poll_unix"), _count(row, "last_scan_unix"),
                   _count(row, "last_sync_unix"), _count(row, "change_window_ns"),
                   _text(row, "current_image"), tuple(kept[:MAX_PATHS]), tuple(transitions),
                   float(row["updated"]) if _number(row["updated"]) else 0.0)


def repeats(sub: Sub) -> int:
    """The repeats of the sub's verdict a row counts: none of a settled status (a synced
    host's every poll would be a write), else up to REPEATS (then no more writes)."""
    return 0 if sub.status in SETTLED else min(sub.repeats, REPEATS)


def _text(row: Mapping[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise BadRow(f"{column} is not text")
    return value


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


def _count(row: Mapping[str, Any], column: str, most: int = 2**63 - 1) -> int:
    value = row[column]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise BadRow(f"{column} {quote(str(value)[:40])} is not a count up to {most}")
    return value


def _status(value: str) -> Status:
    try:
        status = Status(value)
    except ValueError:
        raise BadRow(f"unknown status {quote(value[:80])!r}") from None
    if status in (Status.ELSEWHERE, Status.BAD_MDB_ENTRY):  # never a supervised host's
        raise BadRow(f"status {status.value!r} is no supervised host's")
    return status


def database_now(connection: Connection) -> float:
    """Unix seconds by the database's clock."""
    if connection.dialect.name == "postgresql":
        query = sa.select(sa.func.extract("epoch", sa.func.clock_timestamp()))
    else:
        query = sa.select((sa.func.julianday("now") - 2440587.5) * 86400.0)
    return float(connection.execute(query).scalar_one())


@dataclass(frozen=True)
class Read:
    """One read of the rows: the database's time, the rows updated since and not seen
    (hostname -> row, or why it is bad), each writer's heartbeat (owner -> unix), and
    on a full read every host that has a row."""

    now: float
    rows: dict[str, HostStatus | BadRow]
    writers: dict[str, float]
    hostnames: frozenset[str] | None = None


class StatusTable:
    """The two tables in the shared database (`engine`), read and written whole batches
    at a time; counts what it does."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches = 0        # write transactions committed
        self.rows_written = 0
        self.rows_read = 0

    def _insert(self, table: type[Base]) -> sqlite.Insert | postgresql.Insert:
        return (postgresql.insert if self.engine.dialect.name == "postgresql"
                else sqlite.insert)(table)

    def write(self, owner: str, rows: Iterable[HostStatus], gone: Iterable[str] = ()) -> None:
        """In one transaction: upsert `rows`, delete the rows `owner` wrote of the hosts
        `gone` (no longer in the MDB), and beat `owner`'s heartbeat."""
        values = [row.values() for row in rows]
        gone = list(gone)
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text(f"SET LOCAL statement_timeout = {WRITE_TIMEOUT_MS}"))
            now = database_now(connection)
            if values:
                insert = self._insert(HostStatusRow)
                columns = [name for name in values[0] if name != "hostname"] + ["updated"]
                connection.execute(
                    insert.on_conflict_do_update(
                        index_elements=[HostStatusRow.hostname],
                        set_={name: insert.excluded[name] for name in columns}),
                    [{**row, "updated": now} for row in values])
            if gone:
                connection.execute(sa.delete(HostStatusRow).where(
                    HostStatusRow.owner == owner, HostStatusRow.hostname.in_(gone)))
            beat = self._insert(HostStatusWriterRow).values(owner=owner, updated=now)
            connection.execute(beat.on_conflict_do_update(
                index_elements=[HostStatusWriterRow.owner], set_={"updated": now}))
        self.batches += 1
        self.rows_written += len(values)

    def read(self, since: float | None = None, seen: Mapping[str, float] | None = None
             ) -> Read:
        """The rows updated after `since` (every row when None) and the heartbeats;
        rows whose `updated` is what `seen` says (host -> updated) are not read again."""
        seen = seen or {}
        keys = sa.select(HostStatusRow.hostname, HostStatusRow.updated)
        if since is not None:
            keys = keys.where(HostStatusRow.updated > since)
        with self.engine.connect() as connection:
            now = database_now(connection)
            found = connection.execute(keys).all()
            wanted = [host for host, updated in found if seen.get(host) != updated]
            rows: dict[str, HostStatus | BadRow] = {}
            for first in range(0, len(wanted), READ_CHUNK):
                for row in connection.execute(sa.select(HostStatusRow.__table__).where(
                        HostStatusRow.hostname.in_(wanted[first:first + READ_CHUNK]))
                        ).mappings():
                    try:
                        rows[row["hostname"]] = HostStatus.parse(row)
                    except BadRow as err:
                        err.updated = row["updated"] if _number(row["updated"]) else 0.0
                        rows[row["hostname"]] = err
            writers = {owner: float(updated) for owner, updated in connection.execute(
                sa.select(HostStatusWriterRow.owner, HostStatusWriterRow.updated))}
        self.rows_read += len(rows)
        return Read(now, rows, writers,
                    frozenset(host for host, _ in found) if since is None else None)


Signature = tuple[tuple[Any, ...], tuple[int, int, int]]  # what operators see; its times


class StatusWriter:
    """Which rows of the supervised hosts to write, and writing them in batches."""

    def __init__(self, table: StatusTable, state: DominatorState, heartbeat: float) -> None:
        self.table = table
        self.state = state
        self.heartbeat = heartbeat  # seconds between heartbeats when nothing changes
        self._written: dict[str, tuple[Signature, float]] = {}  # host -> as written, when
        self._pending: dict[str, tuple[Signature, HostStatus]] = {}  # the latest to write
        self._gone: set[str] = set()
        self._dirty: set[str] = set()  # hosts whose status was set since the last stage
        self._watched: dict[str, Sub] = {}  # the subs heard (a new Sub object is heard anew)
        self._swept = -math.inf  # monotonic time of the last sweep of every sub
        self.sweep_seconds = TIMES_SECONDS  # between sweeps
        self._beat = -math.inf  # monotonic time of the last committed write
        self.failing = ""       # why the last write failed ("" when it did not)
        self.failures = 0

    def _signature(self, sub: Sub) -> Signature:
        record = self.state.host(sub.machine.hostname)
        history = sub.history[-1] if sub.history else None
        return ((sub.status, sub.last_error, repeats(sub), sub.change_window_ns,
                 sub.kept_paths, len(sub.history), history, record.current_image),
                (int(sub.last_poll_unix), int(sub.last_scan_unix), record.last_sync_unix))

    def watch(self, sub: Sub) -> None:
        """Hear the sub's status changes (once per sub): a host whose status was set
        is looked at in the next batch; the rest are swept every TIMES_SECONDS."""
        hostname = sub.machine.hostname
        if self._watched.get(hostname) is not sub:
            self._watched[hostname] = sub
            sub.listeners.append(lambda status, error: self._dirty.add(hostname))
        self._dirty.add(hostname)

    def stage(self, owner: str, subs: Mapping[str, Sub]) -> None:
        """Note each supervised sub whose row is out of date (its latest state): those
        whose status was set since the last call, or every one at a sweep."""
        now = time.monotonic()
        sweep = now - self._swept >= self.sweep_seconds
        if sweep:
            self._swept = now
            for hostname in [name for name in self._written if name not in subs]:
                del self._written[hostname]  # gone from the MDB: its row goes
                self._pending.pop(hostname, None)
                self._gone.add(hostname)
            for hostname in [name for name in self._watched if name not in subs]:
                del self._watched[hostname]
        hostnames, self._dirty = (list(subs) if sweep else self._dirty), set()
        for hostname in hostnames:
            sub = subs.get(hostname)
            if sub is None:
                continue
            if sub.task is None:
                self._pending.pop(hostname, None)
                self._written.pop(hostname, None)  # another dominator writes it now
                continue
            signature = self._signature(sub)
            written = self._written.get(hostname)
            if written is not None and written[0][0] == signature[0] and (
                    written[0][1] == signature[1] or now - written[1] < TIMES_SECONDS):
                self._pending.pop(hostname, None)
                continue
            record = self.state.host(hostname)
            self._pending[hostname] = (signature, HostStatus.of(
                sub, owner, record.current_image, record.last_sync_unix))

    def due(self) -> bool:
        """Whether a write is due: rows to write or delete, or the heartbeat."""
        return bool(self._pending or self._gone) or \
            time.monotonic() - self._beat >= self.heartbeat

    def flush(self, owner: str) -> None:
        """Write what is staged in one transaction (a thread's call). On failure it
        stays staged (newer states replace it); the outage is logged once."""
        pending, gone = dict(self._pending), set(self._gone)
        try:
            self.table.write(owner, [row for _, row in pending.values()], gone)
        except SQLAlchemyError as err:
            why = error_line(err)
            self.failures += 1
            if not self.failing:
                log.warning("cannot write host status rows to %s (retrying; other "
                            "dominators show what was last written): %s",
                            describe_url(self.table.engine.url), why)
            self.failing = why
            return
        if self.failing:
            log.warning("host status rows written to %s again",
                        describe_url(self.table.engine.url))
        self.failing = ""
        now = time.monotonic()
        self._beat = now
        for hostname, (signature, _) in pending.items():
            self._written[hostname] = (signature, now)
            if self._pending.get(hostname, (None,))[0] == signature:
                del self._pending[hostname]
        self._gone -= gone

    def forget(self, hostname: str) -> None:
        """Write the host's row again at the next batch (the one stored is not ours)."""
        self._written.pop(hostname, None)


class StatusRows:
    """The herd's status rows: writes the rows of the hosts it supervises, mirrors the
    others' into `subs` (the herd's). Inactive unless the state is shared."""

    def __init__(self, subs: Mapping[str, Sub], state: DominatorState,
                 ownership: Ownership) -> None:
        self.subs = subs
        self.state = state
        self.ownership = ownership
        self.active = state.shared
        self.table = StatusTable(state.database)
        self.writer = StatusWriter(self.table, state, ownership.lease_seconds)
        self._rows: dict[str, HostStatus | BadRow] = {}  # host -> its row as last read
        self._shown: dict[str, HostStatus] = {}  # host -> the row its sub mirrors
        self._fresh: set[str] = set()  # the writers whose heartbeat is fresh
        self._writers: dict[str, float] = {}  # owner -> heartbeat (database clock)
        self._now = 0.0        # the database's clock at the last read
        self._since: float | None = None
        self._full = -math.inf  # monotonic time of the last full read
        self._away: dict[str, str] = {}  # host -> why the herd does not supervise it
        self._read_failing = ""
        self._read_unix = 0.0  # when the rows were last read (this machine's clock)
        self._unread = False   # the rows have not been read for a stale while
        self.bad_rows = 0

    async def run(self) -> None:
        """Write and read until cancelled."""
        await asyncio.gather(self._write_loop(), self._read_loop())

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(BATCH_SECONDS)
            self.writer.stage(self.ownership.name, self.subs)
            if self.writer.due():
                await asyncio.to_thread(self.writer.flush, self.ownership.name)

    async def _read_loop(self) -> None:
        while True:
            await self.read()
            await asyncio.sleep(READ_SECONDS)

    async def read(self) -> None:
        """Read the rows updated since the last read (all of them now and then) and
        show those that changed (every one when a writer's heartbeat went stale or
        fresh); a failing database is logged once, the last rows kept."""
        full = time.monotonic() - self._full >= FULL_READ_SECONDS
        seen = {host: row.updated for host, row in self._rows.items()}
        try:
            read = await asyncio.to_thread(self.table.read, None if full else self._since,
                                           seen)
        except SQLAlchemyError as err:
            why = error_line(err)
            if not self._read_failing:
                log.warning("cannot read host status rows (showing what was last read): %s",
                            why)
            self._read_failing = why
            if not self._unread and time.time() - self._read_unix > self._stale_seconds:
                self._unread = True  # what was read is stale now: say so
                for hostname, why in list(self._away.items()):
                    if (sub := self.subs.get(hostname)) is not None and sub.task is None:
                        self.show(sub, why)
            return
        if self._read_failing:
            log.warning("host status rows readable again")
        self._read_failing, self._read_unix = "", time.time()
        everyone = self._unread
        self._unread = False
        changed = set(read.rows)
        if read.hostnames is not None:  # a full read: forget the rows deleted since
            self._full = time.monotonic()
            changed |= {host for host in self._rows if host not in read.hostnames}
            self._rows = {host: row for host, row in self._rows.items()
                          if host in read.hostnames}
        self._since, self._now, self._writers = read.now - READ_MARGIN, read.now, read.writers
        fresh = {owner for owner, beat in read.writers.items()
                 if read.now - beat <= self._stale_seconds}
        everyone, self._fresh = everyone or fresh != self._fresh, fresh
        me = self.ownership.name
        for hostname, row in read.rows.items():
            sub = self.subs.get(hostname)
            if sub is not None and sub.task is not None:  # ours: rewrite it if another
                # dominator wrote it since
                if not isinstance(row, HostStatus) or row.owner != me:
                    self.writer.forget(hostname)
            elif isinstance(row, BadRow) and not isinstance(self._rows.get(hostname), BadRow):
                self.bad_rows += 1
                log.warning("%s: invalid host status row: %s", hostname, row)
            self._rows[hostname] = row
        for hostname in list(self._away) if everyone else changed & self._away.keys():
            sub = self.subs.get(hostname)
            if sub is None or sub.task is not None:
                del self._away[hostname]
            else:
                self.show(sub, self._away[hostname])

    @property
    def _stale_seconds(self) -> float:
        """How old a heartbeat (or the last read) may get before rows are stale."""
        return STALE_LEASES * self.ownership.lease_seconds

    def metrics(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """What the rows cost and whether they flow (the shared database only)."""
        if not self.active:
            return
        table, writer = self.table, self.writer
        for name, doc, value in (
                ("dominator_status_row_batches", "Transactions that wrote host status rows "
                 "(and this dominator's heartbeat).", table.batches),
                ("dominator_status_rows_written", "Host status rows written.",
                 table.rows_written),
                ("dominator_status_rows_read", "Host status rows read (other dominators').",
                 table.rows_read),
                ("dominator_status_row_write_failures", "Batches of host status rows that "
                 "could not be written (retried).", writer.failures),
                ("dominator_status_rows_invalid", "Host status rows read that did not "
                 "validate (the host shows why).", self.bad_rows)):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("dominator_status_rows_up", "1 while host status rows are "
                                "written and read, 0 while the database refuses.",
                                value=int(not writer.failing and not self._read_failing))
        yield GaugeMetricFamily("dominator_hosts_mirrored", "Hosts shown from the status "
                                "rows of the dominator managing them.",
                                value=sum(1 for sub in self.subs.values() if sub.mirrored))

    def forget(self, sub: Sub) -> None:
        """The herd supervises the sub (or its MDB row is invalid): no mirror of it."""
        self._away.pop(sub.machine.hostname, None)
        self._shown.pop(sub.machine.hostname, None)
        sub.mirrored = False
        if self.active:
            self.writer.watch(sub)

    def show(self, sub: Sub, why: str) -> None:
        """Show a sub the herd does not supervise (`why`: ownership.elsewhere): its
        owner's row when it is current, else `managed elsewhere` saying why not."""
        hostname = sub.machine.hostname
        self._away[hostname] = why
        sub.owner = self.ownership.owner(hostname)
        row = self._rows.get(hostname) if self.active else None
        if row is None:
            self._elsewhere(sub, why)
        elif self._unread:
            self._elsewhere(sub, f"{why}; status rows unreadable since "
                            f"{format_time(int(self._read_unix * 1e9))}: {self._read_failing}")
        elif isinstance(row, BadRow):
            self._elsewhere(sub, f"{why}; its status row is invalid: {row}")
        elif row.owner != sub.owner:
            self._elsewhere(sub, f"{why}; last reported by {quote(row.owner)} at "
                            f"{format_time(int(row.updated * 1e9))}")
        elif self._now - self._writers.get(row.owner, 0.0) > self._stale_seconds:
            since = self._writers.get(row.owner, row.updated)
            self._elsewhere(sub, f"not reported by {quote(row.owner)} since "
                            f"{format_time(int(since * 1e9))}")
        else:
            self._mirror(sub, row)

    def _elsewhere(self, sub: Sub, why: str) -> None:
        self._shown.pop(sub.machine.hostname, None)
        sub.mirrored = False
        sub.set_status(Status.ELSEWHERE, why)

    def _mirror(self, sub: Sub, row: HostStatus) -> None:
        """Take the owner's row: the state's memory first (a listener that hears
        `synced` finds the current image), then each verdict through set_status."""
        if sub.mirrored and self._shown.get(row.hostname) is row:
            return
        self._shown[row.hostname] = row
        same = sub.mirrored and (sub.status, sub.last_error) == (row.status, row.last_error)
        verdicts = max(0, row.repeats - sub.repeats) if same else 1 + row.repeats
        self.state.mirror_sync(row.hostname, row.current_image, row.last_sync_unix)
        sub.mirrored = True
        for _ in range(verdicts):
            sub.set_status(row.status, row.last_error)
        sub.repeats = row.repeats
        sub.history.clear()
        sub.history.extend(row.history)
        sub.last_poll_unix, sub.last_scan_unix = row.last_poll_unix, row.last_scan_unix
        sub.change_window_ns, sub.kept_paths = row.change_window_ns, row.kept_paths
