"""Shard leases: several dominators on one PostgreSQL MDB split the hosts between
them, with no coordinator but the database.

Hosts fall into a fixed number of shards by a stable hash of the hostname. Every
`renew_interval` (a third of the lease) each dominator, in one transaction, heartbeats
its row in `dominators`, counts the live dominators (renewed within one lease), renews
the shards it holds (same fencing token, new expiry), gives back the highest-numbered
ones beyond its fair share (ceil(shards / live)) when peers joined, and takes free or
expired shards up to that share (a new token each, from one database sequence, so
tokens only grow). Expiry is by the database clock (`now()`); whether this process may
still mutate a host is by its own monotonic clock: until the start of its last good
renewal plus the lease minus a safety margin, which ends before the database lets a
peer take the shard over. Mutating calls carry the shard's token so subd can refuse a
former owner's.

With SQLite (one machine, one dominator) the manager short-circuits: it takes every
shard when it starts, with new tokens (so a restarted dominator fences its previous
process), and keeps them without expiry; later rounds only heartbeat.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fleetlib.errors import FleetError
from fleetlib.sql.engine import database_errors, describe_url, error_line, writer
from mdb.models import DominatorRow, LeaseSettingsRow, ShardLeaseRow

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 256
MAX_SHARDS = 65536
DEFAULT_LEASE_SECONDS = 15.0
# Rows of dominators not heard of for this long are deleted when a dominator registers.
FORGET_DOMINATORS_AFTER = timedelta(hours=1)
# After a failed round the next one comes this fraction of the renew interval later.
RETRY_FRACTION = 0.25
EXPIRY_MARGIN = 0.25  # seconds after a peer's lease expiry to take it (and between rounds)

State = Literal["starting", "ok", "failing", "lapsed", "stopped"]


class LeaseConfigError(FleetError):
    """The database refuses this dominator's lease settings (another shard count)."""


@functools.lru_cache(maxsize=1 << 18)
def shard_of(hostname: str, shards: int = DEFAULT_SHARDS) -> int:
    """The shard of `hostname`: the first 8 bytes of the SHA-256 of its lower-cased
    UTF-8 name, big-endian, modulo `shards`; the same in every process and version
    (remembered: placing hosts asks it several times per host per lease round)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    digest = hashlib.sha256(hostname.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def fair_share(shards: int, live: int) -> int:
    """How many of `shards` one of `live` dominators may hold: ceil(shards / live)."""
    if live < 1:
        raise ValueError(f"live dominators must be at least 1, not {live}")
    return -(-shards // live)


@dataclass(frozen=True)
class Renewal:
    """What one successful round did; shard -> fencing token maps."""

    began: float  # time.monotonic() when the round began
    live: int  # live dominators, this one included
    share: int  # the most shards this one may hold
    held: Mapping[int, int]  # what it holds after the round
    taken: Mapping[int, int]  # new grants (new tokens)
    released: tuple[int, ...]  # given back as surplus
    lost: tuple[int, ...]  # held before, not renewed: expired, or taken by a peer
    mutable_before: Mapping[int, int]  # what may_mutate allowed when the round began
    next_expiry: float | None = None  # seconds until a peer's lease expires first (PostgreSQL)


@dataclass(frozen=True)
class LeaseStatus:
    """The manager's health, for /metrics, logs and the CLI."""

    name: str
    dominator_id: int | None
    state: State
    reason: str  # why not "ok" ("" when ok)
    shards: int
    owned: int  # shards last known held (polled, read-only when not mutable)
    mutable: int  # shards that may be mutated now
    live: int
    share: int
    lease_seconds: float
    last_renewal_age: float | None  # seconds since the last good round began


@dataclass(frozen=True)
class LiveDominator:
    """A dominator that renewed within one lease, as the database sees it."""

    id: int
    name: str
    address: str
    started: datetime
    last_renewal: datetime
    shards: int  # unexpired leases it holds
    lease_age: float | None  # seconds since its oldest unexpired lease was granted
    renewal_age: float  # seconds since its last renewal, by the database clock


@dataclass(frozen=True)
class _Held:
    """The shards held and until when (monotonic) they may be mutated; replaced
    whole, so readers on other threads see one consistent pair."""

    tokens: Mapping[int, int]
    deadline: float


NOTHING = _Held({}, -math.inf)


# PostgreSQL: what bounds a renewal transaction (set first, in its transaction only).
BOUNDS = ("set_config('statement_timeout', :ms, true), set_config('lock_timeout', :ms, true), "
          "set_config('idle_in_transaction_session_timeout', :ms, true)")

# PostgreSQL: the start of a round in one statement, so a starved process waits for
# one reply instead of four: set the bounds, heartbeat this dominator (`:me`; 0 rows
# when the database forgot it), count the live dominators (this one among them: the
# snapshot still holds its last heartbeat), and renew its unexpired leases.
ROUND = sa.text(
    "WITH beat AS (UPDATE dominators SET last_renewal = now() WHERE id = :me RETURNING id), "
    "renewed AS (UPDATE shard_leases SET expires_at = now() + :lease * interval '1 second' "
    "WHERE owner = :me AND expires_at > now() AND EXISTS (SELECT 1 FROM beat) "
    "RETURNING shard, token) "
    f"SELECT {BOUNDS}, "
    "(SELECT count(*) FROM beat) AS beat, "
    "(SELECT count(*) FROM dominators WHERE id <> :me "
    "AND last_renewal > now() - :lease * interval '1 second') "
    "+ (SELECT count(*) FROM beat) AS live, "
    "(SELECT coalesce(array_agg(shard ORDER BY shard), '{}') FROM renewed) AS shards, "
    "(SELECT coalesce(array_agg(token ORDER BY shard), '{}') FROM renewed) AS tokens, "
    "(SELECT extract(epoch FROM min(expires_at) - now()) FROM shard_leases "
    "WHERE owner <> :me AND expires_at > now()) AS next_expiry")


def _utc(moment: datetime) -> datetime:
    """`moment` with a time zone: SQLite returns naive UTC times."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class LeaseManager:
    """One dominator's shard leases in the shared database at `engine` (migrated to
    MDB v4). Thread-safe: `renew` and `release_all` take turns; `may_mutate`,
    `owned` and `status` never touch the database."""

    def __init__(self, engine: Engine, identity: str, *, address: str = "",
                 lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 shards: int = DEFAULT_SHARDS) -> None:
        if not identity:
            raise FleetError("shard leases need the dominator's name")
        if not lease_seconds > 0 or math.isinf(lease_seconds):
            raise FleetError(f"the lease must be a positive number of seconds, not {lease_seconds}")
        if not 1 <= shards <= MAX_SHARDS:
            raise FleetError(f"shards must be between 1 and {MAX_SHARDS}, not {shards}")
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise FleetError(f"shard leases need PostgreSQL (or SQLite for one dominator), "
                             f"not {engine.dialect.name}")
        self.name = identity
        self.address = address
        self.lease_seconds = float(lease_seconds)
        self.shards = shards
        self.renew_interval = self.lease_seconds / 3
        self.safety_margin = self.lease_seconds / 3
        self._reader = engine
        self._engine = writer(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        self._lock = threading.Lock()
        self._id: int | None = None
        self._held = NOTHING
        self._live = 0
        self._share = 0
        self._last_success: float | None = None
        self._failure = ""
        self._lapse_logged = False
        self._released = False

    # --- local answers (no database) ------------------------------------------------------

    def may_mutate(self, shard: int) -> int | None:
        """The fencing token to send with a mutating call to a host of `shard`, or
        None: not held, or the lease can no longer be trusted (poll read-only)."""
        held = self._held
        if time.monotonic() >= held.deadline:
            return None
        return held.tokens.get(shard)

    def owned(self) -> dict[int, int]:
        """The shards last known held, with their tokens: the hosts to poll. Only
        trusted for mutations through `may_mutate`, which also checks the deadline."""
        return dict(self._held.tokens)

    def mutable(self) -> dict[int, int]:
        """The shards that may be mutated now, with their tokens."""
        held = self._held
        return dict(held.tokens) if time.monotonic() < held.deadline else {}

    def status(self) -> LeaseStatus:
        """The state ("starting", "ok", "failing": renewals fail but the leases are
        still trusted, "lapsed": nothing may be mutated, "stopped") and why."""
        now = time.monotonic()
        held = self._held
        reason = self._failure
        state: State
        if self._released:
            state = "stopped"
        elif now < held.deadline:
            state = "failing" if reason else "ok"
        elif self._last_success is None and not reason:
            state = "starting"
        else:
            state = "lapsed"
            if not reason:
                reason = f"no renewal for {now - (self._last_success or now):.1f} s"
        return LeaseStatus(
            name=self.name, dominator_id=self._id, state=state, reason=reason,
            shards=self.shards, owned=len(held.tokens),
            mutable=len(held.tokens) if now < held.deadline else 0, live=self._live,
            share=self._share, lease_seconds=self.lease_seconds,
            last_renewal_age=None if self._last_success is None else now - self._last_success)

    # --- rounds ---------------------------------------------------------------------------

    def renew(self) -> Renewal | None:
        """One round in one transaction (registering this dominator on the first).
        None when the database failed: `status()` says why, and the leases held stay
        trusted until their deadline. Raises LeaseConfigError when the database uses
        another shard count."""
        with self._lock:
            start = time.monotonic()
            before = self._held
            mutable_before = dict(before.tokens) if start < before.deadline else {}
            try:
                with self._engine.begin() as connection:
                    renew = self._renew_sqlite if self._sqlite else self._renew_postgres
                    renewal = renew(connection, start, before, mutable_before)
            except SQLAlchemyError as err:
                self._failed(error_line(err))
                return None
            deadline = math.inf if self._sqlite else \
                start + self.lease_seconds - self.safety_margin
            self._held = _Held(renewal.held, deadline)
            self._succeeded(start, renewal)
            return renewal

    def _renew_postgres(self, connection: Connection, start: float, before: _Held,
                        mutable_before: Mapping[int, int]) -> Renewal:
        """Heartbeat, count and renew (one statement, ROUND), then give back surplus or
        take up to the share: three replies to wait for, with the commit. Row
        locks keep two dominators from holding one shard: taking skips rows another
        transaction has locked and re-checks free-or-expired on the rows it locks;
        renewing matches only this dominator's unexpired rows."""
        params = {"me": self._id or 0, "lease": self.lease_seconds, "ms": self._bound_ms()}
        started = connection.execute(ROUND, params).mappings().one()
        if not started["beat"]:  # the first round, or the database forgot this dominator
            self._heartbeat(connection)  # registers it: the round again counts it in
            params["me"] = self._id
            started = connection.execute(ROUND, params).mappings().one()
        live = int(started["live"])
        renewed = dict(zip(started["shards"], started["tokens"], strict=True))
        share = fair_share(self.shards, live)
        released = tuple(sorted(renewed)[share:])
        taken: dict[int, int] = {}
        if released:
            # Stop mutating them before a peer can have them (right after commit).
            self._held = _Held({shard: token for shard, token in before.tokens.items()
                                if shard not in released}, before.deadline)
            connection.execute(sa.text(
                "UPDATE shard_leases SET owner = NULL, granted = NULL, expires_at = NULL "
                "WHERE owner = :me AND shard = ANY(:shards)"), {**params, "shards": list(released)})
        elif len(renewed) < share:
            taken = _grants(connection.execute(sa.text(
                "UPDATE shard_leases SET owner = :me, token = nextval('shard_lease_token'), "
                "granted = now(), expires_at = now() + :lease * interval '1 second' "
                "WHERE shard IN (SELECT shard FROM shard_leases "
                "WHERE owner IS NULL OR expires_at <= now() "
                "ORDER BY shard LIMIT :wanted FOR UPDATE SKIP LOCKED) RETURNING shard, token"),
                {**params, "wanted": share - len(renewed)}))
        held = {shard: token for shard, token in renewed.items() if shard not in released}
        held.update(taken)
        expiry = started["next_expiry"]
        return Renewal(began=start, live=live, share=share, held=held, taken=taken,
                       released=released, lost=_lost(before, renewed),
                       mutable_before=mutable_before,
                       next_expiry=None if expiry is None else float(expiry))

    def _renew_sqlite(self, connection: Connection, start: float, before: _Held,
                      mutable_before: Mapping[int, int]) -> Renewal:
        """The one dominator: on registering, take every shard from whoever held it
        (new tokens from the counter row); after, heartbeat and read back what it
        holds (a dominator started later on the same file takes them all)."""
        taken: dict[int, int] = {}
        if self._heartbeat(connection):
            last = int(connection.execute(sa.text(
                "UPDATE lease_settings SET last_token = last_token + :count WHERE id = 1 "
                "RETURNING last_token"), {"count": self.shards}).scalar_one())
            taken = {shard: last - self.shards + 1 + shard for shard in range(self.shards)}
            connection.execute(
                sa.update(ShardLeaseRow)
                .where(ShardLeaseRow.shard == sa.bindparam("b_shard"))
                .values(owner=self._id, token=sa.bindparam("b_token"), granted=sa.func.now(),
                        expires_at=None),
                [{"b_shard": shard, "b_token": token} for shard, token in taken.items()])
        held = _grants(connection.execute(
            sa.select(ShardLeaseRow.shard, ShardLeaseRow.token)
            .where(ShardLeaseRow.owner == self._id)))
        return Renewal(began=start, live=1, share=self.shards, held=held, taken=taken,
                       released=(), lost=_lost(before, held), mutable_before=mutable_before)

    def _bound(self, connection: Connection) -> None:
        """PostgreSQL: no statement, lock wait or idle pause (this process stopped
        mid-transaction) may hold this transaction, and its row locks, longer than a
        renew interval: the server ends it, so peers can take expired shards."""
        if not self._sqlite:
            connection.execute(sa.text(f"SELECT {BOUNDS}"), {"ms": self._bound_ms()})

    def _bound_ms(self) -> str:
        """The bound of a renewal transaction's statements and pauses, in ms."""
        return str(max(1, int(self.renew_interval * 1000)))

    def _heartbeat(self, connection: Connection) -> bool:
        """Renew this dominator's row; register it (a new id) on the first round or
        when the database forgot it. True if it registered."""
        if self._id is not None:
            updated = connection.execute(
                sa.update(DominatorRow).where(DominatorRow.id == self._id)
                .values(last_renewal=sa.func.now()))
            if updated.rowcount == 1:
                return False
            log.warning("the database forgot dominator %s (id %d): registering again",
                        self.name, self._id)
        self._check_settings(connection)
        now = _utc(connection.execute(sa.select(sa.func.now())).scalar_one())
        connection.execute(sa.delete(DominatorRow).where(
            DominatorRow.last_renewal < now - FORGET_DOMINATORS_AFTER))
        self._id = int(connection.execute(
            sa.insert(DominatorRow)
            .values(name=self.name, address=self.address, started=sa.func.now(),
                    last_renewal=sa.func.now())
            .returning(DominatorRow.id)).scalar_one())
        log.info("dominator %s registered for shard leases as id %d (%d shards, lease %.1f s)",
                 self.name, self._id, self.shards, self.lease_seconds)
        return True

    def _check_settings(self, connection: Connection) -> None:
        """The first dominator on a database fixes the shard count, makes the shard
        rows and starts SQLite's token counter at the time in milliseconds (as the
        PostgreSQL sequence starts); the others must use the same count (else two would
        map a host to different shards, and both manage it)."""
        inserted = connection.execute(sa.text(
            "INSERT INTO lease_settings (id, shards, last_token) VALUES (1, :shards, :first) "
            "ON CONFLICT (id) DO NOTHING"),
            {"shards": self.shards, "first": int(time.time() * 1000)})  # SQLite's counter
        if inserted.rowcount == 1:
            connection.execute(sa.insert(ShardLeaseRow),
                               [{"shard": shard, "token": 0} for shard in range(self.shards)])
        shards = connection.execute(
            sa.select(LeaseSettingsRow.shards).where(LeaseSettingsRow.id == 1)).scalar_one()
        if shards != self.shards:
            raise LeaseConfigError(
                f"database {describe_url(self._engine.url)} splits the hosts into {shards} "
                f"shards, this dominator into {self.shards}: every dominator on one database "
                "must use the same count")

    def _failed(self, reason: str) -> None:
        """Record a failed round: warn on the first, say so once when the leases lapse."""
        now = time.monotonic()
        held = self._held
        if not self._failure:
            log.warning("shard lease renewal failed (%s); the %d shards held stay trusted "
                        "%.1f s more, retrying", reason, len(held.tokens),
                        max(0.0, held.deadline - now))
        else:
            log.debug("shard lease renewal failed again: %s", reason)
        self._failure = reason
        if now >= held.deadline and held.tokens and not self._lapse_logged:
            self._lapse_logged = True
            log.error("shard leases lapsed (%s): no host is mutated until renewal works again",
                      reason)

    def _succeeded(self, start: float, renewal: Renewal) -> None:
        """Record a good round; log when it ends a failure and when shards move."""
        if self._failure:
            log.info("shard lease renewal works again after %.1f s (%s)",
                     start - (self._last_success or start), self._failure)
        self._failure = ""
        self._lapse_logged = False
        self._released = False
        self._last_success = start
        self._live, self._share = renewal.live, renewal.share
        if self._sqlite and renewal.lost:
            log.warning("a dominator started later on this SQLite database took its %d shards: "
                        "this one mutates no host", len(renewal.lost))
        elif renewal.taken or renewal.released or renewal.lost:
            log.info("shard leases: took %d, gave back %d, lost %d; holding %d of %d "
                     "(share %d, %d live dominators)", len(renewal.taken),
                     len(renewal.released), len(renewal.lost), len(renewal.held), self.shards,
                     renewal.share, renewal.live)

    def release_all(self) -> None:
        """Give back every shard and leave the live dominators (clean shutdown), so
        peers take the shards at their next round instead of after expiry. Mutation
        stops first; a database failure is logged and the leases then expire."""
        with self._lock:
            held, self._held = self._held, NOTHING
            self._released = True
            dominator, self._id = self._id, None
            if dominator is None:
                return
            try:
                with self._engine.begin() as connection:
                    self._bound(connection)
                    connection.execute(
                        sa.update(ShardLeaseRow).where(ShardLeaseRow.owner == dominator)
                        .values(owner=None, granted=None, expires_at=None))
                    connection.execute(sa.delete(DominatorRow).where(DominatorRow.id == dominator))
            except SQLAlchemyError as err:
                log.warning("could not give back %d shard leases (%s): they expire instead",
                            len(held.tokens), error_line(err))
                return
            log.info("dominator %s gave back its %d shards", self.name, len(held.tokens))

    async def run(self, stop: asyncio.Event,
                  on_renewal: Callable[[Renewal | None], None] | None = None) -> None:
        """Renew every `renew_interval` (sooner after a failure, and right after a
        peer's lease expires: a dead peer's shards are taken then, not up to a renew
        interval later) until `stop` is set, then give every shard back. `on_renewal`, if
        given, is called in the event loop after each round with its Renewal (None: it
        failed). LeaseConfigError ends it.
        Rounds, and the waits between them, run on a thread of their own: paced by the
        event loop, a round came as late as the loop was busy (at 10,000 hosts, more
        than a lease), and queued behind the herd's calls in the default executor too."""
        loop = asyncio.get_running_loop()
        halt = threading.Event()
        ended: asyncio.Future[Any] = loop.create_future()

        def deliver(renewal: Renewal | None) -> None:
            if on_renewal is not None and not halt.is_set():
                on_renewal(renewal)

        def rounds() -> None:
            try:
                self._rounds(halt, lambda renewal: loop.call_soon_threadsafe(deliver, renewal))
            except BaseException as err:  # noqa: BLE001 - LeaseConfigError, or a bug: run raises it
                loop.call_soon_threadsafe(ended.set_exception, err)
            else:
                loop.call_soon_threadsafe(ended.set_result, None)

        thread = threading.Thread(target=rounds, name="shard-leases", daemon=True)
        thread.start()
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({stopping, ended}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done():
                ended.result()  # raises what ended the rounds
        finally:
            stopping.cancel()
            halt.set()
            await asyncio.to_thread(thread.join)
            await asyncio.to_thread(self.release_all)

    def _rounds(self, halt: threading.Event,
                deliver: Callable[[Renewal | None], object]) -> None:
        """Renew until `halt` is set, handing each round's outcome to `deliver`."""
        while not halt.is_set():
            began = time.monotonic()
            renewal = self.renew()
            deliver(renewal)
            interval = self.renew_interval * (1 if renewal is not None else RETRY_FRACTION)
            due = began + interval
            if renewal is not None and renewal.next_expiry is not None:  # counted from now:
                due = min(due, time.monotonic() + max(  # the statement ran before it
                    EXPIRY_MARGIN, renewal.next_expiry + EXPIRY_MARGIN))
            halt.wait(max(0.0, due - time.monotonic()))

    # --- the fleet's view -----------------------------------------------------------------

    def live_dominators(self) -> list[LiveDominator]:
        """Every dominator that renewed within one lease, by name, with the unexpired
        leases it holds; ages by the database clock. FleetError when the database
        fails."""
        with database_errors(self._reader.url), self._reader.connect() as connection:
            now = _utc(connection.execute(sa.select(sa.func.now())).scalar_one())
            dominators = connection.execute(sa.select(
                DominatorRow.id, DominatorRow.name, DominatorRow.address, DominatorRow.started,
                DominatorRow.last_renewal)).all()
            leases = connection.execute(sa.select(
                ShardLeaseRow.owner, ShardLeaseRow.granted, ShardLeaseRow.expires_at)
                .where(ShardLeaseRow.owner.is_not(None))).all()
        granted: dict[int, list[datetime]] = {}
        for owner, when, expires in leases:
            if owner is not None and (expires is None or _utc(expires) > now):
                granted.setdefault(owner, []).append(_utc(when) if when is not None else now)
        cutoff = now - timedelta(seconds=self.lease_seconds)
        live = []
        for row in dominators:
            last = _utc(row.last_renewal)
            if last <= cutoff:
                continue
            grants = granted.get(row.id, [])
            live.append(LiveDominator(
                id=row.id, name=row.name, address=row.address, started=_utc(row.started),
                last_renewal=last, shards=len(grants),
                lease_age=(now - min(grants)).total_seconds() if grants else None,
                renewal_age=(now - last).total_seconds()))
        return sorted(live, key=lambda dominator: (dominator.name, dominator.id))


def _grants(rows: Iterable[Any]) -> dict[int, int]:
    """shard -> token from rows of (shard, token)."""
    return {int(shard): int(token) for shard, token in rows}


def _lost(before: _Held, now_held: Mapping[int, int]) -> tuple[int, ...]:
    """Shards whose grant (token) held before this round is no longer held."""
    return tuple(sorted(shard for shard, token in before.tokens.items()
                        if now_held.get(shard) != token))
