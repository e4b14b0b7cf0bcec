"""The dominator's own durable state: the fleet-wide disable switch (who, why, until
when), per-host pauses, safety clearances and disruption allowances, intrusion reports
until acknowledged, last syncs, and every state the dominator ever asked each host to
hold (the memory behind the intrusion signal).

It lives in a SQLite file of the state directory, or, when the MDB is PostgreSQL, in
that shared database (same tables, same history, its own version table), so every
dominator on it sees one switch and one set of pauses and clearances. The file stays
either way: it holds deploys, API tokens and the audit log."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import BigInteger, Engine, Integer, Text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dominator.herd.records import Disabled, HostRecord
from fleetlib.errors import FleetError
from fleetlib.sql.engine import describe_url, error_line, follow, open_engine, parse_url
from fleetlib.sql.schema import History, open_schema

log = logging.getLogger(__name__)


STATE_FILE = "dominator.sqlite"  # in the state directory: this store, deploys and audit log
HISTORY = History("state", Path(__file__).with_name("state_revisions"), "schema_version")


class Base(DeclarativeBase):
    """The state store's tables (created by HISTORY's revisions, never by create_all)."""


class SettingRow(Base):
    """A named setting (the fleet-wide switch, as JSON)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class HostRow(Base):
    """What the dominator remembers of one host (intrusion paths as JSON text)."""

    __tablename__ = "hosts"

    hostname: Mapped[str] = mapped_column(Text, primary_key=True)
    safety_cleared: Mapped[int] = mapped_column(Integer, default=0)
    intrusion_paths: Mapped[str | None] = mapped_column(Text)
    intrusion_unix: Mapped[int | None] = mapped_column(BigInteger)
    last_sync_unix: Mapped[int | None] = mapped_column(BigInteger)
    current_image: Mapped[str | None] = mapped_column(Text)
    disruption_allowed: Mapped[int] = mapped_column(Integer, default=0)
    paused_by: Mapped[str | None] = mapped_column(Text)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    paused_unix: Mapped[int | None] = mapped_column(BigInteger)
    paused_until_unix: Mapped[int | None] = mapped_column(BigInteger)


class DesiredImageRow(Base):
    """An image a host was asked to hold, and when last."""

    __tablename__ = "desired_images"

    hostname: Mapped[str] = mapped_column(Text, primary_key=True)
    image: Mapped[str] = mapped_column(Text, primary_key=True)
    last_unix: Mapped[int] = mapped_column(BigInteger)


class DesiredComputedRow(Base):
    """A computed file version a host was asked to hold (hash in hex)."""

    __tablename__ = "desired_computed"

    hostname: Mapped[str] = mapped_column(Text, primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    hash: Mapped[str] = mapped_column(Text, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
DISABLED_KEY = "updates_disabled"


SYNC_PERSIST_SECONDS = 60  # how stale the stored last-sync time of a host may get
SYNC_BATCH_SECONDS = 1.0  # last syncs wait this long to share one transaction
REFRESH_SECONDS = 2.0  # shared state: how often another dominator's changes are read
PRELOAD_CHUNK = 500  # hosts whose desired states one preload query reads


def shared_url(mdb_url: str) -> str | None:
    """Where the state of a dominator whose MDB is at `mdb_url` is shared: the MDB's
    database when it is not SQLite (None: the state file, this dominator's alone)."""
    return None if parse_url(mdb_url).get_backend_name() == "sqlite" else mdb_url


class DominatorState:
    """Thread-safe access to the state. Host records and the switch are also kept
    in memory: reads never touch the database (they are cheap enough for every poll
    cycle of every sub), writes go to both. In the state file this process is the
    only writer; in a shared database (`shared_url`) a thread re-reads the switch and
    every host's pause, clearances and intrusion report each `refresh_seconds`, so a
    change made through another dominator is seen here within that."""

    def __init__(self, path: Path, shared_url: str | None = None,
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(f"sqlite:///{path}")  # the file: deploys, tokens, audit
        with self.engine.connect() as conn:
            conn.execute(sa.text("PRAGMA journal_mode=WAL"))
        open_schema(self.engine, HISTORY)
        self._db: Engine = self.engine if shared_url is None else open_engine(shared_url)
        if self._db.dialect.name not in ("sqlite", "postgresql"):
            raise FleetError(f"database {describe_url(self._db.url)}: the dominator's state "
                             f"needs SQLite or PostgreSQL, not {self._db.dialect.name}")
        if shared_url is not None:
            open_schema(self._db, HISTORY)
        self._lock = threading.Lock()
        with Session(self._db) as session:
            self._hosts = {row.hostname: self._record(row)
                           for row in session.scalars(sa.select(HostRow))}
            switch = session.get(SettingRow, DISABLED_KEY)
            self._disabled = Disabled(**json.loads(switch.value)) if switch else None
        # per host: the desired state last stored here (a repeat of it stores nothing)
        self._desired_last: dict[str, tuple[str, frozenset[tuple[str, tuple[bytes, int]]]]] = {}
        self._history: dict[str, Desired] = {}  # desired states of hosts read (see forget)
        self._wanted: list[_Wanted] = []  # desired states waiting to be stored
        self._write_lock = threading.Lock()  # held by the one storing them (not _lock)
        self._sync_stored: dict[str, int] = {}  # when each host's last sync was stored
        self._syncs_due: dict[str, tuple[int, str]] = {}  # last syncs not yet stored
        self._syncs_since = 0.0  # monotonic time of the oldest of them
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if shared_url is not None:
            self._refresher = threading.Thread(
                target=follow, name="state-refresh", daemon=True,
                args=(self._stop, refresh_seconds, self.refresh,
                      f"shared state {describe_url(self._db.url)}", "keeping what was last read"))
            self._refresher.start()

    @property
    def database(self) -> Engine:
        """The database of what every dominator on this MDB shares: the MDB's own when
        it is PostgreSQL, else the state file's (the same as `engine`)."""
        return self._db

    @property
    def shared(self) -> bool:
        """Whether the state lives in a database other dominators share."""
        return self._db is not self.engine

    def close(self) -> None:
        """Store the last syncs still due, stop following the shared database and
        close the engines."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        try:
            self.store_syncs()
        except SQLAlchemyError as err:  # the memory was exact; the stored times only lag
            log.warning("last syncs of %d host(s) not stored: %s", len(self._syncs_due),
                        error_line(err))
        if self.shared:
            self._db.dispose()
        self.engine.dispose()

    def refresh(self) -> None:
        """Read the switch and every host's pause, clearances and intrusion report
        from the database into memory (what another dominator may have changed; last
        syncs are this dominator's own). Holds the lock, so a write of this process
        is either read here or made after."""
        switched = (HostRow.safety_cleared != 0) | (HostRow.disruption_allowed != 0) | \
            HostRow.paused_unix.is_not(None) | HostRow.intrusion_paths.is_not(None)
        with self._lock, Session(self._db) as session:
            switch = session.get(SettingRow, DISABLED_KEY)
            rows = {row.hostname: self._record(row)
                    for row in session.scalars(sa.select(HostRow).where(switched))}
            self._disabled = Disabled(**json.loads(switch.value)) if switch else None
            blank = HostRecord()
            for hostname, known in list(self._hosts.items()):
                if hostname not in rows and self._switches(known) != self._switches(blank):
                    rows[hostname] = blank
            for hostname, read in rows.items():
                known = self.host(hostname)
                if self._switches(known) != self._switches(read):
                    self._hosts[hostname] = replace(
                        known, safety_cleared=read.safety_cleared,
                        disruption_allowed=read.disruption_allowed, paused=read.paused,
                        intrusion_paths=read.intrusion_paths,
                        intrusion_unix=read.intrusion_unix)

    @staticmethod
    def _switches(record: HostRecord) -> tuple[object, ...]:
        """What of a host record other dominators may change."""
        return (record.safety_cleared, record.disruption_allowed, record.paused,
                record.intrusion_paths, record.intrusion_unix)

    @staticmethod
    def _record(row: HostRow) -> HostRecord:
        paths = row.intrusion_paths
        paused = None if row.paused_unix is None else Disabled(
            row.paused_by or "", row.paused_reason or "", row.paused_unix,
            row.paused_until_unix or 0)
        return HostRecord(bool(row.safety_cleared), tuple(json.loads(paths)) if paths else (),
                          row.intrusion_unix or 0, row.last_sync_unix or 0,
                          row.current_image or "", bool(row.disruption_allowed), paused)

    def _insert(self, table: type[Base]) -> sqlite.Insert | postgresql.Insert:
        """An INSERT with the ON CONFLICT clauses of the state's database."""
        return (postgresql.insert if self._db.dialect.name == "postgresql"
                else sqlite.insert)(table)

    def _remember(self, hostname: str, **changes: Any) -> None:
        with self._lock:
            self._hosts[hostname] = replace(self.host(hostname), **changes)

    def _write(self, *statements: sa.Executable) -> None:
        with self._lock, self._db.begin() as conn:
            for statement in statements:
                conn.execute(statement)

    def _update_host(self, hostname: str, ensure: bool = False, **values: object) -> None:
        """Set columns of the host's row (made first when `ensure`)."""
        update = sa.update(HostRow).where(HostRow.hostname == hostname).values(**values)
        if ensure:
            self._write(self._insert(HostRow).values(hostname=hostname).on_conflict_do_nothing(),
                        update)
        else:
            self._write(update)

    # Fleet-wide switch.

    def updates_disabled(self) -> Disabled | None:
        """The switch, when updates are off and it has not run out (from memory)."""
        disabled = self._disabled
        return None if disabled is None or disabled.expired() else disabled

    def disable_updates(self, by: str, reason: str, until_unix: int = 0) -> Disabled:
        """Stop every update (persists across restarts), until switched on again or,
        when `until_unix` is given, until then."""
        disabled = Disabled(by, reason, int(time.time()), until_unix)
        value = json.dumps(disabled.__dict__)
        self._write(self._insert(SettingRow).values(key=DISABLED_KEY, value=value)
                    .on_conflict_do_update(index_elements=[SettingRow.key],
                                           set_={"value": value}))
        self._disabled = disabled
        return disabled

    def enable_updates(self) -> None:
        """Allow updates again."""
        self._write(sa.delete(SettingRow).where(SettingRow.key == DISABLED_KEY))
        self._disabled = None

    # Per host.

    def host(self, hostname: str) -> HostRecord:
        """The host's record (empty when unknown; from memory)."""
        return self._hosts.get(hostname) or HostRecord()

    def safety_cleared(self, hostname: str) -> bool:
        """Whether the next update of the host may delete more than half of it."""
        return self.host(hostname).safety_cleared

    def clear_safety(self, hostname: str) -> None:
        """Let the host's next update through the unsafe-update check, once."""
        self._update_host(hostname, ensure=True, safety_cleared=1)
        self._remember(hostname, safety_cleared=True)

    def consume_safety(self, hostname: str) -> None:
        """The cleared update happened: the check applies again."""
        self._update_host(hostname, safety_cleared=0)
        self._remember(hostname, safety_cleared=False)

    def disruption_allowed(self, hostname: str) -> bool:
        """Whether the next update of the host may run a HighImpact trigger."""
        return self.host(hostname).disruption_allowed

    def allow_disruption(self, hostname: str) -> None:
        """Let the host's next update run HighImpact triggers (reboot, ...), once."""
        self._update_host(hostname, ensure=True, disruption_allowed=1)
        self._remember(hostname, disruption_allowed=True)

    def consume_disruption(self, hostname: str) -> None:
        """The allowed update happened: HighImpact triggers are refused again."""
        self._update_host(hostname, disruption_allowed=0)
        self._remember(hostname, disruption_allowed=False)

    def host_paused(self, hostname: str) -> Disabled | None:
        """The host's own pause, when it has one that has not run out (from memory).
        It lives here, not in the MDB, so that an MDB import never lifts it."""
        paused = self.host(hostname).paused
        return None if paused is None or paused.expired() else paused

    def pause_host(self, hostname: str, by: str, reason: str, until_unix: int = 0) -> Disabled:
        """Stop updates of one host, until resumed or, when given, until `until_unix`."""
        paused = Disabled(by, reason, int(time.time()), until_unix)
        self._update_host(hostname, ensure=True, paused_by=by, paused_reason=reason,
                          paused_unix=paused.unix, paused_until_unix=until_unix or None)
        self._remember(hostname, paused=paused)
        return paused

    def resume_host(self, hostname: str) -> None:
        """Lift the host's pause."""
        self._update_host(hostname, paused_by=None, paused_reason=None, paused_unix=None,
                          paused_until_unix=None)
        self._remember(hostname, paused=None)

    def intrusion(self, hostname: str) -> tuple[str, ...]:
        """Paths of the unacknowledged intrusion report (empty: none)."""
        return self.host(hostname).intrusion_paths

    def report_intrusion(self, hostname: str, paths: list[str]) -> None:
        """Add paths to the host's intrusion report."""
        known = set(self.intrusion(hostname))
        merged = sorted(known | set(paths))
        if merged == sorted(known):
            return
        now = int(time.time())
        self._update_host(hostname, ensure=True, intrusion_paths=json.dumps(merged),
                          intrusion_unix=now)
        self._remember(hostname, intrusion_paths=tuple(merged), intrusion_unix=now)
        log.warning("%s: intrusion: %d path(s) in a state never desired, e.g. %s",
                    hostname, len(merged), merged[0])

    def acknowledge_intrusion(self, hostname: str) -> None:
        """An operator saw the report: drop it."""
        self._update_host(hostname, intrusion_paths=None, intrusion_unix=None)
        self._remember(hostname, intrusion_paths=(), intrusion_unix=0)

    # Desired states.

    def record_desired(self, hostname: str, image: str,
                       computed: dict[str, tuple[bytes, int]]) -> None:
        """Remember that the host was asked to hold `image` with these computed files
        (stored before this returns: the intrusion signal needs it after a restart)."""
        seen = (image, frozenset(computed.items()))
        if self._desired_last.get(hostname) == seen:  # each synced cycle asks again
            return
        with self._lock:
            known = self._history.get(hostname)
            stored = known is not None and known.latest(image, computed)
        if stored:  # as it is: nothing to write
            self._desired_last[hostname] = seen
            return
        wanted = _Wanted(hostname, image, int(time.time()), computed)
        with self._lock:
            self._wanted.append(wanted)
        with self._write_lock:  # one writer: it stores what every waiting caller wants
            if not wanted.done:
                with self._lock:
                    batch, self._wanted = self._wanted, []
                self._store_desired(batch)
        if wanted.error is not None:
            raise wanted.error
        self._desired_last[hostname] = seen

    def _store_desired(self, batch: list[_Wanted]) -> None:
        """Store the desired states of `batch` in one transaction (one commit for
        every caller waiting: at 50 updates in flight the commits were the pace of a
        rollout), then add them to the histories in memory; each caller learns of a
        failure. Holds the write lock."""
        images = self._insert(DesiredImageRow)
        try:
            with self._db.begin() as conn:
                conn.execute(images.on_conflict_do_update(
                    index_elements=[DesiredImageRow.hostname, DesiredImageRow.image],
                    set_={"last_unix": images.excluded.last_unix}),
                    list({(w.hostname, w.image): {"hostname": w.hostname, "image": w.image,
                                                  "last_unix": w.unix}
                          for w in batch}.values()))  # a row once per statement
                computed = [{"hostname": w.hostname, "path": path, "hash": digest.hex(),
                             "size": size}
                            for w in batch for path, (digest, size) in w.computed.items()]
                if computed:
                    conn.execute(self._insert(DesiredComputedRow).on_conflict_do_nothing(),
                                 computed)
                with self._lock:
                    unknown = sorted({w.hostname for w in batch} - self._history.keys())
                read = self._load_many(conn, unknown) if unknown else {}  # no read later
            with self._lock:
                for w in batch:
                    if w.hostname in read:  # read with this batch's rows in it
                        self._history.setdefault(w.hostname, read[w.hostname])
                    elif (known := self._history.get(w.hostname)) is not None:  # else forgot
                        known.add(w.image, w.unix, w.computed)
        except SQLAlchemyError as err:
            for w in batch:
                w.error = err
        finally:
            for w in batch:
                w.done = True

    def record_sync(self, hostname: str, image: str,
                    computed: dict[str, tuple[bytes, int]]) -> None:
        """The host holds `image`: a desired state (stored at once), and its last sync
        (due when the image changes or the stored time is a minute old, then stored
        with the other hosts' due within SYNC_BATCH_SECONDS; memory is always exact)."""
        self.record_desired(hostname, image, computed)
        now = int(time.time())
        stored = self._sync_stored.get(hostname, 0)
        with self._lock:
            if self.host(hostname).current_image != image or \
                    now - stored >= SYNC_PERSIST_SECONDS:
                if not self._syncs_due:
                    self._syncs_since = time.monotonic()
                self._syncs_due[hostname] = (now, image)
                self._sync_stored[hostname] = now
            self._hosts[hostname] = replace(self.host(hostname), last_sync_unix=now,
                                            current_image=image)
        if self._syncs_due and time.monotonic() - self._syncs_since >= SYNC_BATCH_SECONDS:
            self.store_syncs(wait=False)

    def store_syncs(self, wait: bool = True) -> None:
        """Store every last sync due, in one transaction (kept due when it fails);
        reads and records go on meanwhile (the write lock, not the memory's). Without
        `wait`, a write in progress leaves them to the next call: at a takeover of
        2,000 hosts every executor thread queued here, one commit each, and the
        herd's other database work waited behind them."""
        if not self._write_lock.acquire(blocking=wait):
            return
        try:
            with self._lock:
                due = dict(self._syncs_due)
            if not due:
                return
            insert = self._insert(HostRow)
            with self._db.begin() as conn:
                conn.execute(insert.on_conflict_do_update(
                    index_elements=[HostRow.hostname],
                    set_={"last_sync_unix": insert.excluded.last_sync_unix,
                          "current_image": insert.excluded.current_image}),
                    [{"hostname": hostname, "last_sync_unix": unix, "current_image": image}
                     for hostname, (unix, image) in due.items()])
            with self._lock:
                for hostname, stored in due.items():
                    if self._syncs_due.get(hostname) == stored:  # not due again since
                        del self._syncs_due[hostname]
        finally:
            self._write_lock.release()

    def mirror_sync(self, hostname: str, image: str, last_sync_unix: int) -> None:
        """What another dominator reports of a host it supervises (statusrows.py): its
        current image and last sync, in memory only (that dominator stores them)."""
        known = self.host(hostname)
        if (known.current_image, known.last_sync_unix) != (image, last_sync_unix):
            self._remember(hostname, current_image=image, last_sync_unix=last_sync_unix)

    def forget_desired(self, hostname: str) -> None:
        """The host's desired states are read again from the database when next
        asked: called when this dominator starts supervising it, as another
        dominator may have asked it to hold other states meanwhile."""
        with self._lock:
            self._history.pop(hostname, None)
            self._desired_last.pop(hostname, None)

    def preload_desired(self, hostnames: Collection[str]) -> None:
        """Read the desired states of the hosts not in memory yet, a few queries for
        all of them: what a dominator starting on a fleet, or taking over a peer's
        shards, needs for thousands of hosts at once (else a query each)."""
        with self._lock:
            wanted = [hostname for hostname in hostnames if hostname not in self._history]
        for start in range(0, len(wanted), PRELOAD_CHUNK):
            chunk = wanted[start:start + PRELOAD_CHUNK]
            with self._db.connect() as conn:
                read = self._load_many(conn, chunk)
                conn.commit()
            with self._lock:
                for hostname in chunk:
                    self._history.setdefault(hostname, read[hostname])

    def _desired(self, hostname: str) -> Desired:
        """The host's desired states: read once (or with the first record_desired),
        then kept in memory and added to by record_desired."""
        with self._lock:
            known = self._history.get(hostname)
            if known is None:
                with self._db.connect() as conn:
                    known = self._history[hostname] = self._load(conn, hostname)
                    conn.commit()  # it only read: a COMMIT ends it as cheaply as a ROLLBACK
            return known

    @classmethod
    def _load(cls, conn: sa.Connection, hostname: str) -> Desired:
        """The host's desired states as stored (both tables)."""
        return cls._load_many(conn, [hostname])[hostname]

    @staticmethod
    def _load_many(conn: sa.Connection, hostnames: list[str]) -> dict[str, Desired]:
        """The desired states of each of `hostnames` as stored (both tables)."""
        known = {hostname: Desired({}, {}) for hostname in hostnames}
        for hostname, image, unix in conn.execute(
                sa.select(DesiredImageRow.hostname, DesiredImageRow.image,
                          DesiredImageRow.last_unix)
                .where(DesiredImageRow.hostname.in_(hostnames))):
            known[hostname].images[image] = unix
        for hostname, path, digest, size in conn.execute(
                sa.select(DesiredComputedRow.hostname, DesiredComputedRow.path,
                          DesiredComputedRow.hash, DesiredComputedRow.size)
                .where(DesiredComputedRow.hostname.in_(hostnames))):
            known[hostname].computed.setdefault(path, {})[bytes.fromhex(digest)] = size
        return known

    def desired_images(self, hostname: str) -> list[str]:
        """Images the host was ever asked to hold, most recent first."""
        images = self._desired(hostname).images
        return sorted(images, key=lambda image: (-images[image], image))

    def desired_computed(self, hostname: str) -> dict[str, dict[bytes, int]]:
        """Every computed file version the host was asked to hold: path -> {hash: size}."""
        return {path: dict(versions)
                for path, versions in self._desired(hostname).computed.items()}


@dataclass
class _Wanted:
    """A desired state a caller of record_desired waits to see stored."""

    hostname: str
    image: str
    unix: int
    computed: dict[str, tuple[bytes, int]]
    done: bool = False
    error: SQLAlchemyError | None = None


@dataclass
class Desired:
    """What a host was asked to hold: image -> when last, and each computed file's
    versions (path -> {hash: size})."""

    images: dict[str, int]
    computed: dict[str, dict[bytes, int]]

    def latest(self, image: str, computed: dict[str, tuple[bytes, int]]) -> bool:
        """Whether storing this desired state again would change nothing but a time:
        `image` is the most recent one alone, and every computed version is known."""
        unix = self.images.get(image)
        if unix is None or any(when >= unix for other, when in self.images.items()
                               if other != image):
            return False
        return all(self.computed.get(path, {}).get(digest) == size
                   for path, (digest, size) in computed.items())

    def add(self, image: str, unix: int, computed: dict[str, tuple[bytes, int]]) -> None:
        """One more desired state (as record_desired stores it)."""
        self.images[image] = unix
        for path, (digest, size) in computed.items():
            self.computed.setdefault(path, {})[digest] = size
