"""An image server's journal (journal.sqlite in its state directory): who the server is,
what changed in the images it serves, in order, and how far it followed its upstream.

- identity: a random id made once per state directory, and a generation one higher at
  every start (a follower that finds an older generation, or another id, knows its
  upstream was replaced or restored);
- events: ADDED / DELETED / EXPIRY_CHANGED of the images the server serves, numbered by
  an ever-growing sequence; followers stream them (ImageService.Replicate);
- live: the images the journal believes are served (name -> digest, expiry), changed in
  the same transaction as the event that changes them, so the image files and the journal
  can be compared at load (`ImageStore.load` reconciles them: an image file and its
  journal row are two writes, and a crash may fall between them);
- tombstones: deleted names and the digest they were bound to, forever;
- follower: a replica's position in its upstream's journal (upstream id, generation,
  last applied sequence, diverged) and the upstream's ancestry.

Every write is one short SQLite transaction, durable when the method returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fleetlib.sql.engine import writer
from fleetlib.sql.schema import History, open_schema
from fleetlib.wire import imageserver_pb2

log = logging.getLogger(__name__)

KEEP_EVENTS = 100_000  # events kept for followers to resume from; older ones: a snapshot
ADDED = imageserver_pb2.JournalEvent.ADDED
DELETED = imageserver_pb2.JournalEvent.DELETED
EXPIRY_CHANGED = imageserver_pb2.JournalEvent.EXPIRY_CHANGED


HISTORY = History("journal", Path(__file__).with_name("journal_revisions"),
                  "journal_schema_version")

_meta = sa.MetaData()
IDENTITY = sa.Table("identity", _meta, sa.Column("singleton", sa.Integer, primary_key=True),
                    sa.Column("id", sa.Text), sa.Column("generation", sa.Integer))
EVENTS = sa.Table("events", _meta, sa.Column("sequence", sa.Integer, primary_key=True),
                  sa.Column("kind", sa.Integer), sa.Column("name", sa.Text),
                  sa.Column("digest", sa.LargeBinary), sa.Column("expires_unix", sa.BigInteger),
                  sa.Column("unix", sa.BigInteger))
LIVE = sa.Table("live", _meta, sa.Column("name", sa.Text, primary_key=True),
                sa.Column("digest", sa.LargeBinary), sa.Column("expires_unix", sa.BigInteger))
TOMBSTONES = sa.Table("tombstones", _meta, sa.Column("name", sa.Text, primary_key=True),
                      sa.Column("digest", sa.LargeBinary),
                      sa.Column("deleted_unix", sa.BigInteger))
FOLLOWER = sa.Table("follower", _meta, sa.Column("singleton", sa.Integer, primary_key=True),
                    sa.Column("upstream_id", sa.Text), sa.Column("generation", sa.Integer),
                    sa.Column("applied_sequence", sa.Integer), sa.Column("diverged", sa.Integer),
                    sa.Column("ancestry", sa.Text))


@dataclass
class Position:
    """How far a follower applied its upstream's journal."""

    upstream_id: str
    generation: int
    applied_sequence: int
    diverged: bool = False
    ancestry: list[str] = field(default_factory=list)  # upstream ids, nearest first


@dataclass(frozen=True)
class LiveEntry:
    """An image the journal believes is served."""

    name: str
    digest: bytes
    expires_unix: int


def _event(row: sa.Row[tuple[int, int, str, bytes, int, int]]) -> imageserver_pb2.JournalEvent:
    return imageserver_pb2.JournalEvent(
        sequence=row.sequence, kind=row.kind,
        entry=imageserver_pb2.JournalEntry(name=row.name, digest=row.digest,
                                           expires_unix=row.expires_unix,
                                           deleted=row.kind == DELETED))


def new_id() -> str:
    """A fresh server identity."""
    return secrets.token_hex(16)


def peek(path: Path) -> tuple[imageserver_pb2.ServerIdentity | None, bool]:
    """Read the journal at PATH without changing anything (a replica checks its upstream
    before it touches its state directory): (the identity the next start will have, or
    None if none was made; whether a follower's position is persisted)."""
    if not path.is_file():
        return None, False
    # A journal closed cleanly has no -wal file: read it as immutable, or SQLite would
    # make a -shm file beside it. After a crash the -wal holds what it says.
    mode = "mode=ro" if path.with_name(path.name + "-wal").exists() else "immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?{mode}", uri=True)) as conn:
            row = conn.execute("SELECT id, generation FROM identity").fetchone()
            followed = conn.execute("SELECT COUNT(*) FROM follower").fetchone()[0] > 0
    except sqlite3.Error as err:
        log.debug("cannot read journal %s: %s", path, err)
        return None, False
    if row is None:
        return None, followed
    return imageserver_pb2.ServerIdentity(id=row[0], generation=row[1] + 1), followed


class Journal:
    """One server's journal. Opening it starts a new generation; a new journal takes
    the id IDENT (made at random when empty)."""

    def __init__(self, engine: Engine, ident: str = "") -> None:
        open_schema(engine, HISTORY, "imageserver")
        self._engine = writer(engine)
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(IDENTITY)).first()
            if row is None:
                ident, generation = ident or new_id(), 1
                conn.execute(IDENTITY.insert().values(singleton=1, id=ident,
                                                      generation=generation))
                log.info("new image server identity %s", ident)
            else:
                ident, generation = row.id, row.generation + 1
                conn.execute(IDENTITY.update().values(generation=generation))
            self.sequence: int = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(EVENTS.c.sequence), 0))).scalar_one()
        self.identity = imageserver_pb2.ServerIdentity(id=ident, generation=generation)
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def oldest_sequence(self) -> int:
        """The first event still held (sequence + 1 when none is)."""
        with self._engine.connect() as conn:
            oldest = conn.execute(sa.select(sa.func.min(EVENTS.c.sequence))).scalar_one()
        return int(oldest) if oldest is not None else self.sequence + 1

    def append(self, kind: int, name: str, digest: bytes, expires_unix: int = 0) -> int:
        """Record one change (and the live/tombstone rows it implies); its sequence."""
        now = int(time.time())
        with self._engine.begin() as conn:
            key = conn.execute(EVENTS.insert().values(
                kind=kind, name=name, digest=digest, expires_unix=expires_unix, unix=now)
            ).inserted_primary_key
            assert key is not None  # an INSERT always has one
            conn.execute(LIVE.delete().where(LIVE.c.name == name))
            if kind == DELETED:
                conn.execute(TOMBSTONES.delete().where(TOMBSTONES.c.name == name))
                conn.execute(TOMBSTONES.insert().values(name=name, digest=digest,
                                                        deleted_unix=now))
            else:
                conn.execute(TOMBSTONES.delete().where(TOMBSTONES.c.name == name))
                conn.execute(LIVE.insert().values(name=name, digest=digest,
                                                  expires_unix=expires_unix))
        self.sequence = int(key[0])
        for loop, event in list(self._listeners):
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(event.set)
        return self.sequence

    def prune(self, keep: int = KEEP_EVENTS) -> None:
        """Forget events older than the newest `keep` (followers behind get a snapshot)."""
        with self._engine.begin() as conn:
            conn.execute(EVENTS.delete().where(EVENTS.c.sequence <= self.sequence - keep))

    def events_after(self, sequence: int, limit: int = 1000
                     ) -> list[imageserver_pb2.JournalEvent]:
        """Up to `limit` events after `sequence`, in order."""
        query = sa.select(EVENTS).where(EVENTS.c.sequence > sequence) \
            .order_by(EVENTS.c.sequence).limit(limit)
        with self._engine.connect() as conn:
            return [_event(row) for row in conn.execute(query)]

    def live(self) -> dict[str, LiveEntry]:
        """The images the journal believes are served, by name."""
        with self._engine.connect() as conn:
            return {row.name: LiveEntry(row.name, row.digest, row.expires_unix)
                    for row in conn.execute(sa.select(LIVE))}

    def tombstones(self) -> dict[str, bytes]:
        """Deleted names and the digest each was bound to."""
        with self._engine.connect() as conn:
            return {row.name: row.digest for row in conn.execute(sa.select(TOMBSTONES))}

    def tombstone(self, name: str) -> bytes | None:
        """The digest a deleted NAME was bound to, None if it never was deleted."""
        with self._engine.connect() as conn:
            digest = conn.execute(sa.select(TOMBSTONES.c.digest)
                                  .where(TOMBSTONES.c.name == name)).scalar_one_or_none()
        return bytes(digest) if digest is not None else None

    def position(self) -> Position | None:
        """A follower's persisted position; None before its first hello."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(FOLLOWER)).first()
        if row is None:
            return None
        return Position(row.upstream_id, row.generation, row.applied_sequence,
                        bool(row.diverged), list(json.loads(row.ancestry)))

    def save_position(self, position: Position) -> None:
        """Persist a follower's position (after each applied event)."""
        values = {"upstream_id": position.upstream_id, "generation": position.generation,
                  "applied_sequence": position.applied_sequence,
                  "diverged": int(position.diverged), "ancestry": json.dumps(position.ancestry)}
        with self._engine.begin() as conn:
            if conn.execute(FOLLOWER.update().values(**values)).rowcount == 0:
                conn.execute(FOLLOWER.insert().values(singleton=1, **values))

    def listen(self) -> asyncio.Event:
        """An event set (on the calling loop) whenever an event is appended."""
        changed = asyncio.Event()
        self._listeners.add((asyncio.get_running_loop(), changed))
        return changed

    def unlisten(self, changed: asyncio.Event) -> None:
        """Stop setting `changed`."""
        self._listeners = {pair for pair in self._listeners if pair[1] is not changed}

    def snapshot(self, live: list[LiveEntry], batch: int = 1000
                 ) -> list[imageserver_pb2.JournalSnapshot]:
        """The snapshot of LIVE images (as served now) and every tombstone in batches,
        the last one carrying the current sequence."""
        sequence = self.sequence
        entries = [imageserver_pb2.JournalEntry(name=e.name, digest=e.digest,
                                                expires_unix=e.expires_unix) for e in live]
        entries += [imageserver_pb2.JournalEntry(name=name, digest=digest, deleted=True)
                    for name, digest in sorted(self.tombstones().items())]
        starts = range(0, max(len(entries), 1), batch)
        return [imageserver_pb2.JournalSnapshot(
            entries=entries[start:start + batch], last=start + batch >= len(entries),
            sequence=sequence if start + batch >= len(entries) else 0) for start in starts]
