"""Which hosts this dominator manages: the herd's side of the shard leases (leases.py).

The herd supervises (polls, plans, converges) the hosts of the shards this dominator
holds, and no other: another dominator does. A shard held but no longer trusted (the
renewals fail and the monotonic deadline passed) is still polled, read-only. Every
mutating call to a subd carries a fence, this dominator's name and the shard's token,
asked for right before the call: no token, no call. When a subd refuses a call as
fenced (a newer owner touched the host), the shard is not mutated again until a lease
round that began after the refusal says it is still held.

With SQLite the lease manager owns every shard from its first round: the one dominator
manages every host, its calls fenced by tokens that grow with each start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dominator.herd.leases import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_SHARDS,
    LeaseManager,
    LeaseStatus,
    LiveDominator,
    Renewal,
    shard_of,
)
from fleetlib.errors import FleetError
from fleetlib.fstree.listing import quote
from fleetlib.sql.engine import open_engine
from mdb.models import DominatorRow, ShardLeaseRow
from subd.fence import FenceToken

log = logging.getLogger(__name__)

FENCED = "fenced: "  # how subd's refusal of an older token begins
LEASE_STATES = ("starting", "ok", "failing", "lapsed", "stopped")


def is_fenced(text: str) -> bool:
    """Whether an error text (a refused mutating call) is subd refusing the fence."""
    return text.startswith(FENCED)


@dataclass(frozen=True)
class Layout:
    """Where the shards are, as one lease round and owners read left them: the ones
    this dominator holds, and the holder of each of the others."""

    held: frozenset[int]
    owners: dict[int, str]

    def where(self, shard: int) -> str:
        """Who holds `shard`: "" for this dominator, else the holder's name ("?" when
        none is known)."""
        return "" if shard in self.held else self.owners.get(shard, "?")

    def moved(self, before: Layout | None) -> frozenset[int] | None:
        """The shards whose holder differs from `before` (None: all of them, as when
        there is no `before`)."""
        if before is None:
            return None
        shards = self.held | before.held | self.owners.keys() | before.owners.keys()
        return frozenset(s for s in shards if self.where(s) != before.where(s))


class Ownership:
    """This dominator's shard leases in the MDB's database at `url`, as the herd asks
    about them. `start` makes the lease manager (under the dominator's name, known
    once its port is bound) and takes the first round; `run` renews until stopped,
    then gives every shard back. `changed` is set after each round."""

    def __init__(self, url: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 shards: int = DEFAULT_SHARDS, mutation_delay: float = 0.0) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.shards = shards
        # Testing only (`serve --test-mutation-delay`): a pause between the lease check
        # and each mutating call, as a process stopped there would make.
        self.mutation_delay = mutation_delay
        self.changed = asyncio.Event()
        self.renewals_failed = 0
        self.fenced_refusals = 0
        self._engine: Engine | None = None
        self._leases: LeaseManager | None = None
        self._owners: dict[int, str] = {}  # shard -> name of its live owner, as last read
        self._blocked: dict[int, tuple[int, float]] = {}  # shard -> (token, when refused)
        self._held: frozenset[int] = frozenset()  # the shards held, as of the last round

    @property
    def leases(self) -> LeaseManager:
        """The lease manager (after `start`)."""
        if self._leases is None:
            raise FleetError("shard leases not started")
        return self._leases

    @property
    def name(self) -> str:
        """This dominator's name in leases and fences."""
        return self.leases.name

    async def start(self, name: str, address: str) -> None:
        """Register as `name` (reachable at `address`) and take the first lease round;
        FleetError when the database refuses this dominator's lease settings."""
        self._engine = open_engine(self.url)
        self._leases = LeaseManager(self._engine, name, address=address,
                                    lease_seconds=self.lease_seconds, shards=self.shards)
        self._renewed(await asyncio.to_thread(self._leases.renew))
        await self.read_owners()

    async def run(self, stop: asyncio.Event) -> None:
        """Renew until `stop` is set, then give every shard back and close."""
        try:
            await self.leases.run(stop, on_renewal=self._renewed)
        finally:
            if self._engine is not None:
                self._engine.dispose()

    async def close(self) -> None:
        """Give every shard back and close, when `run` never ran (a failed start)."""
        if self._leases is not None:
            await asyncio.to_thread(self._leases.release_all)
        if self._engine is not None:
            self._engine.dispose()

    def _renewed(self, renewal: Renewal | None) -> None:
        """After a round: count a failure; lift the fenced blocks a good round that
        began after the refusal decided (held still: mutate again; lost: stopped)."""
        self._held = frozenset(self.leases.owned())
        if renewal is None:
            self.renewals_failed += 1
        else:
            for shard, (token, when) in list(self._blocked.items()):
                if renewal.began > when:
                    del self._blocked[shard]
                    if renewal.held.get(shard) == token:
                        log.warning("shard %d is still this dominator's (token %d) though a "
                                    "host refused that token: mutating its hosts again",
                                    shard, token)
        self.changed.set()

    async def read_owners(self) -> None:
        """Read which dominator holds each shard (for `owner` and the status of hosts
        managed elsewhere); a failed read keeps the last view."""
        try:
            self._owners = await asyncio.to_thread(self._select_owners)
        except SQLAlchemyError as err:
            log.debug("could not read the shard owners: %s", err)

    def _select_owners(self) -> dict[int, str]:
        assert self._engine is not None
        with self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(ShardLeaseRow.shard, DominatorRow.name)
                .join(DominatorRow, DominatorRow.id == ShardLeaseRow.owner)
                .where(sa.or_(ShardLeaseRow.expires_at.is_(None),
                              ShardLeaseRow.expires_at > sa.func.now())))
            return {int(shard): name for shard, name in rows}

    # --- what the herd asks ----------------------------------------------------------------

    def layout(self) -> Layout:
        """What placing a host depends on: where each shard is (as of the last round
        and read)."""
        return Layout(self._held, dict(self._owners))

    def shard(self, hostname: str) -> int:
        """The shard of `hostname`."""
        return shard_of(hostname, self.shards)

    def polls(self, hostname: str) -> bool:
        """Whether this dominator supervises the host: it holds the host's shard (if no
        longer trusted to mutate it, it polls read-only)."""
        return self.shard(hostname) in self._held

    def owner(self, hostname: str) -> str:
        """The name of the dominator holding the host's shard ("" when none is known)."""
        if self.polls(hostname):
            return self.name
        return self._owners.get(self.shard(hostname), "")

    def elsewhere(self, hostname: str) -> str:
        """Why this dominator does not supervise the host ("" when it does)."""
        if self.polls(hostname):
            return ""
        shard = self.shard(hostname)
        owner = self._owners.get(shard)
        if owner:
            return f"shard {shard} is managed by dominator {quote(owner)}"
        return f"shard {shard} has no live owner yet: a dominator takes it at its next round"

    def why_not(self, hostname: str) -> str:
        """Why the host may not be mutated now ("" when it may)."""
        shard = self.shard(hostname)
        if shard in self._blocked:
            return (f"shard {shard}: a host refused this dominator's token as fenced; no "
                    "mutation until the next lease round")
        if self.leases.may_mutate(shard) is not None:
            return ""
        status = self.leases.status()
        if shard not in self._held:
            return f"lease lost: {self.elsewhere(hostname)}"
        return f"lease lost: {status.state}" + (f" ({status.reason})" if status.reason else "")

    async def fence(self, hostname: str, what: str) -> FenceToken | None:
        """The fence to send with a mutating call (`what`) to the host right now, or
        None: do not make the call (`why_not` says why)."""
        shard = self.shard(hostname)
        token = None if shard in self._blocked else self.leases.may_mutate(shard)
        if token is None:
            return None
        if self.mutation_delay:
            log.info("test delay: holding %s of %s %.1f s after the lease check", what,
                     hostname, self.mutation_delay)
            await asyncio.sleep(self.mutation_delay)
        return FenceToken(self.name, token)

    def refused(self, hostname: str, fence: FenceToken, text: str) -> None:
        """A subd refused `fence` (`text`, subd's "fenced: ..."): mutate no host of its
        shard until a later lease round says otherwise."""
        shard = self.shard(hostname)
        self.fenced_refusals += 1
        if shard not in self._blocked:
            log.warning("%s refused token %d of shard %d (%s): not mutating that shard's "
                        "hosts until the next lease round", hostname, fence.token, shard, text)
        self._blocked[shard] = (fence.token, time.monotonic())

    def status(self) -> LeaseStatus:
        """The lease manager's state."""
        return self.leases.status()

    def live_dominators(self) -> list[LiveDominator]:
        """The dominators that renewed within one lease (FleetError when the database
        fails)."""
        return self.leases.live_dominators()

    def metrics(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Shards held and mutable, the lease state, failed renewals, fenced refusals."""
        status = self.leases.status() if self._leases is not None else None
        yield GaugeMetricFamily("dominator_shards_owned", "Shards this dominator holds "
                                "(their hosts are polled).",
                                value=status.owned if status else 0)
        yield GaugeMetricFamily("dominator_shards_mutable", "Shards this dominator may "
                                "mutate now (its leases are trusted).",
                                value=status.mutable if status else 0)
        yield GaugeMetricFamily("dominator_shards", "Shards the hosts fall into.",
                                value=self.shards)
        state = GaugeMetricFamily("dominator_lease_state", "The shard leases' state (1: the "
                                  "one they are in).", labels=["state"])
        for name in LEASE_STATES:
            state.add_metric([name], int(status is not None and status.state == name))
        yield state
        yield GaugeMetricFamily("dominator_live_dominators", "Live dominators on the "
                                "database, as the last lease round counted.",
                                value=status.live if status else 0)
        yield CounterMetricFamily("dominator_lease_renewals_failed", "Lease rounds that "
                                  "failed (the database could not be reached or refused).",
                                  value=self.renewals_failed)
        yield CounterMetricFamily("dominator_fenced_refusals", "Mutating calls a subd "
                                  "refused as fenced (a newer owner holds the host).",
                                  value=self.fenced_refusals)
