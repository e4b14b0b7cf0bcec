"""The herd: one asyncio scheduler that keeps every sub of the MDB on its image.

Each sub has a task that polls it (short polls while its generation holds),
plans the update that would make it hold its required image (a plan is
computed once per distinct image, sub fingerprint and computed files, and no
sub's tree is kept once its plan is made), checks safety, has the sub fetch
what it lacks, updates it, and waits for its next scan before judging it.
Bounded slots keep polls, fetches and updates from swamping anyone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import grpc
from sqlalchemy.exc import SQLAlchemyError

from dominator.herd.computed import (
    ComputedFileError,
    Renderer,
    content_key,
    render_image_files,
)
from dominator.herd.convergence import PlanSummary, objects_to_fetch, plan_update, summarize
from dominator.herd.fetchslots import DEFAULT_BYTES, DEFAULT_FETCHES, ServerSlots
from dominator.herd.images import ImageCache
from dominator.herd.instruments import HerdMetrics
from dominator.herd.intrusion import classify, history
from dominator.herd.ownership import Ownership, is_fenced
from dominator.herd.ranking import ImageServers
from dominator.herd.records import Disabled
from dominator.herd.state import DominatorState
from dominator.herd.status import Status, disruption_denied
from dominator.herd.statusrows import StatusRows
from dominator.herd.watch import WatchConfig, Watches
from fleetlib.audit import format_time
from fleetlib.errors import FleetError, NotFoundError
from fleetlib.fstree.diff import too_many_deletes
from fleetlib.fstree.hashing import hash_bytes
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import Tree
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security
from fleetlib.signing import TrustedKeys, verify_trusted
from fleetlib.sql.engine import error_line
from fleetlib.wire import subd_pb2
from mdb.feed import open_feed
from mdb.machine import Machine
from mdb.store import InvalidRow, Mdb
from subd.changes import UpdatePlan
from subd.client import DEFAULT_MAX_TREE_BYTES, AsyncSubClient, TreeTooLarge
from subd.fence import FenceToken
from subd.trigger_runner import plan_actions
from subd.trust import is_trust_refusal

log = logging.getLogger(__name__)

# Hosts starting together (a start, an MDB import, shards taken over from a dead peer)
# have their first cycles spread over their count divided by this, at most one poll
# interval: a dead peer's thousand hosts are polled within a second, not five.
FIRST_CYCLES_PER_SECOND = 1000.0


@dataclass
class HerdConfig:
    """Pace and concurrency of the herd."""

    imageserver: str               # the master
    poll_interval: float = 5.0     # between cycles of one sub
    poll_slots: int = 200
    fetch_slots: int = 400  # in all (each server's own caps: fetchslots.py)
    update_slots: int = 200
    diff_cache_size: int = 20_000
    history_images: int = 10      # earlier images consulted for the intrusion signal
    mdb_check_interval: float = 1.0  # between reads of the MDB's revision (SQLite)
    mdb_backstop_interval: float = 30.0  # with the change feed (PostgreSQL): between reads
    mdb_retry_first: float = 1.0  # after a failed MDB read; doubles while it keeps failing
    mdb_retry_max: float = 30.0
    max_tree_bytes: int = DEFAULT_MAX_TREE_BYTES  # the most tree taken from one sub per poll
    extra_imageservers: tuple[str, ...] = ()  # more servers, ranked per host (ranking.py)
    trusted_keys: TrustedKeys | None = None  # set: only images signed by one converge
    fetches_per_imageserver: int = DEFAULT_FETCHES  # per first-ranked server (0: no cap)
    fetch_bytes_per_imageserver: int = DEFAULT_BYTES  # their bytes per server (0: no cap)
    watch: WatchConfig = field(default_factory=WatchConfig)  # watch streams, backstop polls


@dataclass
class Sub:
    """The herd's memory of one sub (its tree is not part of it)."""

    machine: Machine
    status: Status = Status.POLLING
    last_error: str = ""
    generation: int = 0
    fingerprint: bytes = b""
    last_poll_unix: float = 0.0
    last_scan_unix: float = 0.0
    change_window_ns: int = 0
    history: collections.deque[tuple[float, str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=50))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[Callable[[str, str], None]] = field(default_factory=list)
    prefetched: tuple[str, bytes] | None = None
    kept_paths: tuple[str, ...] = ()  # directories the image lacks, kept (filtered content)
    task: asyncio.Task[None] | None = None
    client: AsyncSubClient | None = None
    owner: str = ""  # the dominator holding its shard ("" when none is known)
    repeats: int = 0  # set_status calls repeating the last transition since it
    mirrored: bool = False  # status, times, history: its owner's report (statusrows.py)

    def set_status(self, status: Status, error: str = "") -> None:
        """Move to `status`, remembering the transition and telling listeners."""
        if status != self.status or error != self.last_error:
            self.history.append((time.time(), status.value, error))
            self.repeats = 0
        else:
            self.repeats += 1
        self.status = status
        self.last_error = error
        for listener in list(self.listeners):
            listener(status.value, error)


class PollFailed(Exception):
    """A full poll that brought no usable tree: the status it leaves the sub in, and why."""

    def __init__(self, status: Status, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail

    def describe(self) -> str:
        """One line naming the status (once)."""
        prefix = f"{self.status.value}: "
        return self.detail if self.detail.startswith(prefix) else prefix + self.detail


@dataclass
class Planned:
    """A cached plan: what to change on subs of one fingerprint, and its size."""

    plan: UpdatePlan
    sub_inodes: int


PlanKey = tuple[str, bytes, bytes]  # image name, sub fingerprint, content_key(computed)


class DiffCache:
    """Plans by (image, sub fingerprint, computed files): computed once, not per host."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._plans: collections.OrderedDict[PlanKey, Planned] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: PlanKey) -> Planned | None:
        """The cached plan, counting the hit or miss."""
        planned = self._plans.get(key)
        if planned is None:
            self.misses += 1
            return None
        self.hits += 1
        self._plans.move_to_end(key)
        return planned

    def put(self, key: PlanKey, planned: Planned) -> None:
        """Remember a plan, forgetting the least recently used beyond capacity."""
        self._plans[key] = planned
        while len(self._plans) > self.capacity:
            self._plans.popitem(last=False)


def high_impact(plan: UpdatePlan) -> list[str]:
    """The HighImpact services the plan would fire, decided as subd decides it (the
    old and new image's triggers); subd refuses them unless disruption is permitted."""
    return plan_actions(plan.old_triggers, plan.triggers,
                        [entry.path for entry in plan.diff.entries]).high_impact


def describe_pause(held: Disabled) -> str:
    """'by WHO: WHY (until WHEN)' of a switch that holds updates (fleet-wide or one host)."""
    until = f" (until {format_time(held.until_unix * 10**9)})" if held.until_unix else ""
    return f"by {held.by}: {held.reason or 'no reason given'}{until}"


def rendered_versions(computed: dict[str, bytes]) -> dict[str, tuple[bytes, int]]:
    """path -> (hash, size) of rendered computed files, as the state store keeps them."""
    return {path: (hash_bytes(data), len(data)) for path, data in computed.items()}


class Herd:
    """Every sub's convergence loop, driven by the MDB."""

    def __init__(self, mdb: Mdb, state: DominatorState, images: ImageCache, renderer: Renderer,
                 security: Security, config: HerdConfig, ownership: Ownership) -> None:
        self.mdb = mdb
        self.ownership = ownership  # which hosts are this dominator's (shard leases)
        self.state = state
        self.images = images
        self.renderer = renderer
        self.security = security
        self.config = config
        self.servers = ImageServers(config.imageserver, config.extra_imageservers, security)
        self.subs: dict[str, Sub] = {}
        self.cache = DiffCache(config.diff_cache_size)
        self.metrics = HerdMetrics()
        self.watches = Watches(config.watch, self.metrics)
        self.rows = StatusRows(self.subs, state, ownership)  # shared state: whole-fleet view
        self._planning: dict[PlanKey, asyncio.Future[Planned | None]] = {}
        self._poll_slots = asyncio.Semaphore(config.poll_slots)
        self._first_spread: float | None = None  # see _place_all
        self._fetch_slots = asyncio.Semaphore(config.fetch_slots)
        self.server_slots = ServerSlots(config.fetches_per_imageserver,
                                        config.fetch_bytes_per_imageserver)
        self._update_slots = asyncio.Semaphore(config.update_slots)
        self._revision = -1
        self.feed = open_feed(mdb.engine_url, on_notify=self.metrics.mdb_notifications.inc,
                              on_reconnect=self.metrics.mdb_feed_reconnects.inc)
        self._stopping = False
        self.mdb_error = ""  # why the MDB cannot be read now ("" while it can)
        # Verdicts of --trusted-keys by image: "" trusted, else why not. Images are
        # immutable; the signature is part of the key so a re-added name is checked anew.
        self._trust: dict[tuple[str, bytes], str] = {}

    async def distrust(self, image: Image) -> str:
        """Why the herd must not converge a host onto `image` ("" when it may): with
        `trusted_keys` set, an image unsigned or not verifiably signed by one of them.
        Checked once per image."""
        trusted = self.config.trusted_keys
        if trusted is None:
            return ""
        key = (image.name, image.signature.signature if image.signature else b"")
        verdict = self._trust.get(key)
        if verdict is None:
            try:
                signer = await asyncio.to_thread(verify_trusted, image, trusted)
                log.info("image %s is signed by trusted key %s", image.name, signer)
                verdict = ""
            except FleetError as err:
                log.warning("not converging hosts onto image %s: %s", image.name, err)
                verdict = str(err)
            self._trust[key] = verdict
        return verdict

    async def run(self) -> None:
        """Follow the MDB and run every sub's loop until cancelled. While the MDB
        cannot be read the subs go on with the last view read, and reads are retried
        with a backoff (1 s doubling to 30 s by default). On PostgreSQL the MDB's change
        feed (mdb/feed.py) wakes the reads, with backstop reads in between."""
        failures = 0
        if self.feed is not None:
            self.feed.start()
        stop_leases = asyncio.Event()
        leases = asyncio.create_task(self.ownership.run(stop_leases), name="shard leases")
        following = asyncio.create_task(self._follow_ownership(), name="shard ownership")
        tasks = [leases, following]
        if self.rows.active:
            tasks.append(asyncio.create_task(self.rows.run(), name="host status rows"))
        try:
            while True:
                for task in tasks:  # none may end while the herd runs
                    if task.done():
                        task.result()
                        raise FleetError(f"task {task.get_name()!r} ended")
                try:
                    await self._follow_mdb()
                except (FleetError, SQLAlchemyError) as err:
                    failures += 1
                    self._mdb_failed(err)
                    delay = min(self.config.mdb_retry_max,
                                self.config.mdb_retry_first * 2 ** (failures - 1))
                else:
                    if self.mdb_error:
                        log.warning("MDB %s readable again", self.mdb.url)
                    failures, self.mdb_error = 0, ""
                    delay = self.config.mdb_check_interval if self.feed is None \
                        else self.config.mdb_backstop_interval
                await self._next_mdb_read(delay)
        finally:
            self._stopping = True
            if self.feed is not None:
                self.feed.stop()
            for sub in self.subs.values():
                if sub.task is not None:
                    sub.task.cancel()
            await asyncio.gather(*(s.task for s in self.subs.values() if s.task),
                                 return_exceptions=True)
            for sub in self.subs.values():
                if sub.client is not None:
                    await sub.client.close()
            for task in tasks[1:]:
                task.cancel()
            stop_leases.set()  # no call is in flight: give the shards back
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _next_mdb_read(self, delay: float) -> None:
        """Wait `delay` before the next read of the MDB, or on PostgreSQL until its
        change feed reports a change (a burst of them is one wake) or reopened (a
        backstop read, as are reads after `delay`)."""
        if self.feed is None:
            await asyncio.sleep(delay)
        elif await self.feed.wait(delay) != "notified":
            self.metrics.mdb_backstop_reads.inc()

    async def _follow_mdb(self) -> None:
        """Reload the machines when the MDB's revision moved (the revision counts as
        seen only once its machines were read)."""
        revision = await asyncio.to_thread(self.mdb.revision)
        if revision != self._revision:
            machines, invalid = await asyncio.to_thread(self.mdb.load)
            await self._reconcile(machines, invalid)
            self._revision = revision

    def _mdb_failed(self, err: Exception) -> None:
        """Count a failed MDB read; log it when it is news (not on every retry)."""
        self.metrics.mdb_read_errors.inc()
        text = error_line(err)
        if text != self.mdb_error:
            log.error("cannot read the MDB (retrying; hosts keep the last view read): %s",
                      text)
        self.mdb_error = text

    async def _stop(self, sub: Sub) -> None:
        """End the sub's loop and close its connection."""
        if sub.task is not None:
            sub.task.cancel()
            await asyncio.gather(sub.task, return_exceptions=True)
            sub.task = None
        if sub.client is not None:
            await sub.client.close()
            sub.client = None

    async def _reconcile(self, machines: list[Machine], invalid: list[InvalidRow]) -> None:
        """Start loops for new hosts, update changed ones, stop removed ones; a host
        whose row is invalid is not converged, its status says why."""
        wanted = {m.hostname: m for m in machines}
        bad = {row.hostname: row.reason for row in invalid}
        for hostname in list(self.subs):
            if hostname not in wanted and hostname not in bad:
                await self._stop(self.subs.pop(hostname))
        for hostname, reason in bad.items():
            sub = self.subs.get(hostname)
            if sub is None:
                try:
                    sub = self.subs[hostname] = Sub(Machine(hostname))
                except FleetError:  # not even its hostname is valid: no host to show
                    log.error("ignoring an invalid MDB row: %s", reason)
                    continue
            await self._stop(sub)
            self.rows.forget(sub)
            sub.kept_paths = ()
            sub.set_status(Status.BAD_MDB_ENTRY, reason)
        placing = []
        for hostname, machine in wanted.items():
            sub = self.subs.get(hostname)
            if sub is None:
                sub = self.subs[hostname] = Sub(machine)
                placing.append(sub)
            elif sub.task is None:  # its row was invalid and is valid again, or not ours
                sub.machine = machine
                placing.append(sub)
            elif sub.machine != machine:
                if sub.machine.address != machine.address and sub.client is not None:
                    await sub.client.close()
                    sub.client = None
                sub.machine = machine
                sub.wake.set()
        await self._place_all(placing)

    async def _place(self, sub: Sub) -> bool:
        """Supervise the (valid) host if this dominator holds its shard, else stop
        its loop and say who does; a host moving in starts afresh from its polls.
        True when its loop started here."""
        hostname = sub.machine.hostname
        sub.owner = self.ownership.owner(hostname)
        elsewhere = self.ownership.elsewhere(hostname)
        if elsewhere:
            if sub.task is not None:
                log.info("%s: %s: no longer supervised here", hostname, elsewhere)
                await self._stop(sub)
            self.rows.show(sub, elsewhere)  # its owner's status row, if current
        elif sub.task is None:
            self.rows.forget(sub)
            self.state.forget_desired(hostname)  # another dominator may have added some
            sub.set_status(Status.POLLING)
            sub.prefetched = None
            sub.task = asyncio.create_task(self._loop(sub), name=f"sub {hostname}")
            return True
        return False

    async def _place_all(self, subs: Iterable[Sub]) -> None:
        """Place each of `subs`, then read the desired states of those that started
        here in a few queries (a thousand hosts moving in would else each make one)."""
        subs = list(subs)
        # The first cycles of the hosts starting here (not of all those placed: most
        # of an MDB import's stay with peers) are spread at the pace first polls take.
        starting = sum(1 for sub in subs
                       if sub.task is None and self.ownership.polls(sub.machine.hostname))
        self._first_spread = starting / FIRST_CYCLES_PER_SECOND
        started = []
        for sub in subs:
            if self._stopping:
                return
            if await self._place(sub):
                started.append(sub.machine.hostname)
        if started:
            try:
                await asyncio.to_thread(self.state.preload_desired, started)
            except SQLAlchemyError as err:  # each host reads its own when it needs them
                log.warning("could not read the desired states of %d host(s): %s",
                            len(started), error_line(err))

    async def _follow_ownership(self) -> None:
        """After each lease round: start the hosts of shards gained, stop those of
        shards lost, and note each host's owner. Only the hosts of shards that moved
        are placed: at 10,000 hosts placing every one after every renewal kept the
        event loop busy (new hosts are placed as the MDB brings them)."""
        placed = None
        while True:
            await self.ownership.changed.wait()
            self.ownership.changed.clear()
            await self.ownership.read_owners()
            layout = self.ownership.layout()
            moved = layout.moved(placed)
            placed = layout
            if moved is not None and not moved:
                continue
            await self._place_all([
                sub for sub in list(self.subs.values())
                if sub.status != Status.BAD_MDB_ENTRY and (
                    moved is None or self.ownership.shard(sub.machine.hostname) in moved)])

    async def _fence(self, sub: Sub, what: str) -> FenceToken | None:
        """The fence of a mutating call (`what`) to the sub right now; None when this
        dominator may not mutate it (the sub's status then says why)."""
        fence = await self.ownership.fence(sub.machine.hostname, what)
        if fence is None:
            sub.set_status(Status.LEASE_LOST, self.ownership.why_not(sub.machine.hostname))
        return fence

    def _refused(self, sub: Sub, fence: FenceToken, text: str) -> bool:
        """Whether `text` (a failed mutating call) is subd refusing the fence, which
        the ownership then learns."""
        if not is_fenced(text):
            return False
        self.ownership.refused(sub.machine.hostname, fence, text)
        return True

    async def _loop(self, sub: Sub) -> None:
        watch = self.watches.open(sub, self._client)  # when to cycle: see herd/watch.py
        try:
            while not self._stopping:
                await watch.next_cycle(self.config.poll_interval, self._first_spread)
                try:
                    await self.cycle(sub)
                except asyncio.CancelledError:
                    raise
                except SQLAlchemyError as err:  # the shared state's database is down
                    why = f"dominator state unreadable: {error_line(err)}"
                    if (sub.status, sub.last_error) != (Status.FAILED, why):
                        log.warning("%s: cycle failed: %s", sub.machine.hostname, why)
                    sub.set_status(Status.FAILED, why)
                except Exception as err:  # noqa: BLE001 - one sub must never stop the herd
                    log.exception("%s: cycle failed", sub.machine.hostname)
                    sub.set_status(Status.FAILED, f"internal error: {err}")
        finally:
            await watch.stop()

    def _client(self, sub: Sub) -> AsyncSubClient:
        if sub.client is None:
            sub.client = AsyncSubClient(sub.machine.address or sub.machine.hostname,
                                        self.security)
        return sub.client

    async def cycle(self, sub: Sub) -> None:
        """One convergence step for one sub."""
        machine = sub.machine
        client = self._client(sub)
        try:
            async with self._poll_slots, self.metrics.timed("poll"):
                status, _ = await client.poll(short=True, timeout=30)
        except grpc.RpcError as err:
            sub.set_status(Status.UNREACHABLE, describe_rpc_error(err))
            return
        sub.last_poll_unix = time.time()
        sub.generation, sub.fingerprint = status.generation, status.fingerprint
        sub.last_scan_unix = status.last_scan_unix
        if status.scan_error:  # its tree is stale: neither synced nor safe to plan on
            sub.set_status(Status.SCAN_FAILED, status.scan_error)
            return
        if not status.scan_count:
            sub.set_status(Status.POLLING, "waiting for the sub's first scan")
            return
        if not machine.required_image:
            sub.set_status(Status.NO_IMAGE)
            return
        image = await self.images.get(machine.required_image)
        if image is None:
            sub.set_status(Status.IMAGE_NOT_READY, f"image {machine.required_image} not found")
            return
        distrust = await self.distrust(image)
        if distrust:
            sub.set_status(Status.IMAGE_NOT_TRUSTED, distrust)
            return
        try:
            computed = await asyncio.to_thread(render_image_files, image, machine,
                                               self.renderer) if image.computed_files else {}
        except ComputedFileError as err:
            sub.set_status(Status.MISSING_COMPUTED, str(err))
            return
        planned = await self._plan(sub, client, image, computed, status)
        if planned is None:
            return
        sub.kept_paths = tuple(planned.plan.diff.kept)
        if not planned.plan.diff:
            await self._synced(sub, client, image, computed, status)
            return
        await self._converge(sub, client, image, computed, planned, status)

    async def _plan(self, sub: Sub, client: AsyncSubClient, image: Image,
                    computed: dict[str, bytes], status: subd_pb2.SubStatus) -> Planned | None:
        key = (image.name, status.fingerprint, content_key(computed))
        pending = self._planning.get(key)
        if pending is not None:  # another sub of this fingerprint is planning it now: a hit
            self.cache.hits += 1
            return await asyncio.shield(pending)
        planned = self.cache.get(key)
        if planned is not None:
            return planned
        self._planning[key] = asyncio.get_running_loop().create_future()
        try:
            planned = await self._plan_now(sub, client, image, computed, key)
        finally:
            self._planning.pop(key).set_result(planned)
        return planned

    async def _full_poll(self, client: AsyncSubClient
                         ) -> tuple[subd_pb2.SubStatus, Tree | None]:
        """A poll with the sub's tree (when its generation moved), at most
        `max_tree_bytes` of it; PollFailed when it brings nothing usable."""
        try:
            async with self._poll_slots, self.metrics.timed("poll"):
                return await client.poll(timeout=120,
                                         max_tree_bytes=self.config.max_tree_bytes)
        except grpc.RpcError as err:
            raise PollFailed(Status.UNREACHABLE, describe_rpc_error(err)) from None
        except TreeTooLarge as err:
            raise PollFailed(Status.TREE_TOO_LARGE, str(err)) from None
        except FleetError as err:  # a malformed tree, or no status at all
            raise PollFailed(Status.FAILED, f"poll: {err}") from None

    async def _plan_now(self, sub: Sub, client: AsyncSubClient, image: Image,
                        computed: dict[str, bytes], key: PlanKey) -> Planned | None:
        """The plan for the sub's tree now, without old-image triggers: it is shared
        by every sub of the fingerprint, and each has its own previous image."""
        try:
            status, tree = await self._full_poll(client)
        except PollFailed as err:
            sub.set_status(err.status, err.detail)
            return None
        if tree is None:
            return None
        plan = await asyncio.to_thread(plan_update, tree, image, list(status.scan_exclusions),
                                       None, False, False, computed)
        planned = Planned(plan, len(tree.inodes))
        if status.fingerprint == key[1]:  # else it changed meanwhile: plan again next cycle
            self.cache.put(key, planned)
        return planned

    async def _previous_image(self, sub: Sub, image: Image) -> Image | None:
        names = await asyncio.to_thread(self.state.desired_images, sub.machine.hostname)
        for name in names:
            if name != image.name:
                return await self.images.get(name)
        return None

    async def _synced(self, sub: Sub, client: AsyncSubClient, image: Image,
                      computed: dict[str, bytes], status: subd_pb2.SubStatus) -> None:
        hostname = sub.machine.hostname
        await asyncio.to_thread(self.state.record_sync, hostname, image.name,
                                rendered_versions(computed))
        sub.set_status(Status.INTRUSION if self.state.intrusion(hostname) else Status.SYNCED)
        await self._prefetch(sub, client, status)

    async def _prefetch(self, sub: Sub, client: AsyncSubClient,
                        status: subd_pb2.SubStatus) -> None:
        """Once synced: fetch the planned image ahead of need, else drop cached objects."""
        planned_name = sub.machine.planned_image
        if planned_name and planned_name != sub.machine.required_image:
            if sub.prefetched == (planned_name, status.fingerprint):
                return
            image = await self.images.get(planned_name)
            if image is None or await self.distrust(image):
                return
            try:
                status, tree = await self._full_poll(client)
            except PollFailed as err:
                sub.set_status(err.status, err.detail)
                return
            if tree is None:
                return
            plan = await asyncio.to_thread(plan_update, tree, image,
                                           list(status.scan_exclusions))
            needed = list(objects_to_fetch(plan))
            if needed:
                self.metrics.prefetches.inc()
                async with self._fetch_slots:
                    if (fence := await self._fence(sub, "prefetch")) is None:
                        return
                    try:
                        await client.fetch(await self._servers_for(sub), needed, planned_name,
                                           fence=fence)
                    except grpc.RpcError as err:  # e.g. subd --trusted-keys refuses the image
                        text = describe_rpc_error(err)
                        log.warning("%s: prefetch of %s refused: %s", sub.machine.hostname,
                                    planned_name, text)
                        if self._refused(sub, fence, text):
                            sub.set_status(Status.LEASE_LOST, text)
                            return
            sub.prefetched = (planned_name, status.fingerprint)
        elif status.cached_objects > status.pinned_objects:  # subd keeps what a recent
            if (fence := await self._fence(sub, "cleanup")) is None:  # fetch pinned (`sub
                return  # fetch` then `sub update`)
            try:
                await client.cleanup_all_but([], fence=fence)
            except grpc.RpcError as err:
                text = describe_rpc_error(err)
                if not self._refused(sub, fence, text):
                    raise
                sub.set_status(Status.LEASE_LOST, text)

    async def _converge(self, sub: Sub, client: AsyncSubClient, image: Image,
                        computed: dict[str, bytes], planned: Planned,
                        status: subd_pb2.SubStatus) -> None:
        machine = sub.machine
        hostname = machine.hostname
        why = self.ownership.why_not(hostname)
        if why:  # say so at once (its lease lapsed, say): no state read for a call not made
            sub.set_status(Status.LEASE_LOST, why)
            return
        plan = planned.plan
        names = await asyncio.to_thread(self.state.desired_images, hostname)
        if names:  # a host once synced: is what differs an intrusion or just outdated?
            trees = [img.tree for img in
                     [await self.images.get(n) for n in names[:self.config.history_images]]
                     if img is not None]
            computed_history = await asyncio.to_thread(self.state.desired_computed, hostname)
            verdict = classify(plan.diff.entries, history(trees, computed_history))
            if verdict.intrusion:
                await asyncio.to_thread(self.state.report_intrusion, hostname,
                                        verdict.intrusion)
        held = self.held(machine)
        if held:
            sub.set_status(Status.UPDATES_DISABLED, held)
            return
        cleared = await asyncio.to_thread(self.state.safety_cleared, hostname)
        if too_many_deletes(plan.diff, planned.sub_inodes) and not cleared:
            sub.set_status(Status.UNSAFE, "the update would delete more than half the host's "
                           "inodes; `dominator fleet clear-safety` allows it once")
            return
        old = await self._previous_image(sub, image)  # cached plans are shared: set per sub
        plan = replace(plan, disable_safety_check=cleared,
                       old_triggers=list(old.triggers) if old is not None else [])
        disruptive = high_impact(plan)
        if disruptive:
            if not await asyncio.to_thread(self.state.disruption_allowed, hostname):
                sub.set_status(Status.DISRUPTION_DENIED, disruption_denied(hostname, disruptive))
                return
            plan = replace(plan, disruption_permitted=True)  # consumed once it ran
        needed = objects_to_fetch(plan)
        if plan.diff.bytes_to_write() > status.free_bytes:
            sub.set_status(Status.NO_SPACE, f"needs {plan.diff.bytes_to_write()} bytes, "
                           f"{status.free_bytes} free")
            return
        if needed and not await self._fetch(sub, client, needed, image.name):
            return
        await self._update(sub, client, image, computed, plan)

    async def _servers_for(self, sub: Sub) -> list[str]:
        """The image servers `sub` fetches from, nearest first, the master last."""
        return await self.servers.ranked(sub.machine.hostname, sub.machine.location)

    async def _fetch(self, sub: Sub, client: AsyncSubClient, needed: dict[bytes, int],
                     image_name: str) -> bool:
        sub.set_status(Status.FETCHING)
        fence: FenceToken | None = None
        try:
            servers = await self._servers_for(sub)  # the first one's slot waits for no other
            async with self.server_slots.hold(servers[0], sum(needed.values())), \
                    self._fetch_slots:
                if (fence := await self._fence(sub, "fetch")) is None:
                    return False
                async with self.metrics.timed("fetch"):
                    await client.fetch(servers, list(needed), image_name, fence=fence)
                    pause = 0.01  # small fetches end at once: do not hold the slot for long
                    while True:
                        await asyncio.sleep(pause)
                        status, _ = await client.poll(short=True, timeout=30)
                        if not status.fetch.in_progress:
                            break
                        pause = min(pause * 2, 0.2)
        except grpc.RpcError as err:
            text = describe_rpc_error(err)  # subd --trusted-keys refuses an untrusted image
            if fence is not None and self._refused(sub, fence, text):
                sub.set_status(Status.LEASE_LOST, text)
            else:
                sub.set_status(Status.IMAGE_NOT_TRUSTED if is_trust_refusal(text)
                               else Status.UNREACHABLE, text)
            return False
        self.metrics.fetched_bytes.inc(
            max(0, status.fetch.bytes_done - status.fetch.bytes_copied_locally))
        if status.fetch.error:
            self.metrics.fetch_failures.inc()
            kind = Status.NO_SPACE if "insufficient space" in status.fetch.error \
                else Status.FAILED
            sub.set_status(kind, f"fetch: {status.fetch.error}")
            return False
        return True

    async def _update(self, sub: Sub, client: AsyncSubClient, image: Image,
                      computed: dict[str, bytes], plan: UpdatePlan) -> None:
        """Apply `plan` (with this sub's old triggers, its safety clearance and
        disruption allowance set); each allowance it used is spent once it ran."""
        hostname = sub.machine.hostname
        sub.set_status(Status.UPDATING)
        fence: FenceToken | None = None
        try:
            async with self._update_slots:
                if (fence := await self._fence(sub, "update")) is None:
                    return
                async with self.metrics.timed("update"):
                    # servers: where a subd with --trusted-keys reads the signed manifest
                    await client.update(replace(plan, servers=await self._servers_for(sub)),
                                        fence=fence)
                    after, _ = await client.poll(short=True, timeout=30)
        except grpc.RpcError as err:
            text = describe_rpc_error(err)
            kind = Status.LEASE_LOST if fence is not None and self._refused(sub, fence, text) \
                else Status.UNSAFE if "more than half" in text else \
                Status.IMAGE_NOT_TRUSTED if is_trust_refusal(text) else Status.FAILED
            sub.set_status(kind, text)
            return
        sub.change_window_ns = after.last_update.change_window_ns
        if plan.disable_safety_check:
            await asyncio.to_thread(self.state.consume_safety, hostname)
        if plan.disruption_permitted:
            await asyncio.to_thread(self.state.consume_disruption, hostname)
        await asyncio.to_thread(self.state.record_desired, hostname, image.name,
                                rendered_versions(computed))
        sub.set_status(Status.POLLING, "waiting for the scan after the update")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # judge only what a later scan sees
            status, _ = await client.poll(short=True, timeout=30)
            if status.scan_count > after.scan_count:
                break
            await asyncio.sleep(0.2)
        sub.wake.set()

    async def plan_for(self, hostname: str, image_name: str
                       ) -> tuple[UpdatePlan, PlanSummary, str]:
        """A dry run: what converging the host to that image would change, planned
        as a cycle plans it (the sub's tree now, its computed files rendered for
        that image, the previous image's triggers), and why the herd would stop
        the update ("" when it would go ahead). Changes nothing; FleetError when
        the host cannot be planned (unknown, unreachable, no scan, bad computed file)."""
        sub = self.find(hostname)
        image = await self.images.get(image_name)
        if image is None:
            raise FleetError(f"{Status.IMAGE_NOT_READY.value}: image {image_name} not found")
        distrust = await self.distrust(image)
        if distrust:
            raise FleetError(f"{Status.IMAGE_NOT_TRUSTED.value}: {distrust}")
        machine = replace(sub.machine, required_image=image_name)
        try:
            computed = await asyncio.to_thread(render_image_files, image, machine, self.renderer)
        except ComputedFileError as err:
            raise FleetError(f"{Status.MISSING_COMPUTED.value}: {err}") from None
        try:
            status, tree = await self._full_poll(self._client(sub))
        except PollFailed as err:
            raise FleetError(err.describe()) from None
        if status.scan_error:
            raise FleetError(f"{Status.SCAN_FAILED.value}: {status.scan_error}")
        if tree is None or not status.scan_count:
            raise FleetError("waiting for the sub's first scan")
        old = await self._previous_image(sub, image)
        plan = await asyncio.to_thread(plan_update, tree, image, list(status.scan_exclusions),
                                       old, False, False, computed)
        summary = summarize(plan, tree)
        stop = ""
        held = self.held(machine)
        if not plan.diff:
            pass
        elif held:
            stop = f"{Status.UPDATES_DISABLED.value}: {held}"
        elif summary.unsafe and not await asyncio.to_thread(self.state.safety_cleared,
                                                            hostname):
            stop = (f"{Status.UNSAFE.value}: it would delete more than half the host's "
                    "inodes; `dominator fleet clear-safety` allows it once")
        elif (disruptive := high_impact(plan)) and not await asyncio.to_thread(
                self.state.disruption_allowed, hostname):
            stop = f"{Status.DISRUPTION_DENIED.value}: {disruption_denied(hostname, disruptive)}"
        elif summary.bytes_to_write > status.free_bytes:
            stop = (f"{Status.NO_SPACE.value}: needs {summary.bytes_to_write} bytes, "
                    f"{status.free_bytes} free")
        return plan, summary, stop

    def held(self, machine: Machine) -> str:
        """Why updates of the host are held ("" when they are not): the fleet-wide
        switch, the host's own pause (the dominator's state: an MDB import never lifts
        it) or the MDB's DisableUpdates. From memory: no I/O."""
        disabled = self.state.updates_disabled()
        if disabled is not None:
            return f"fleet-wide, {describe_pause(disabled)}"
        return self.host_held(machine)

    def host_held(self, machine: Machine) -> str:
        """Why updates of this one host are held ("" when they are not): its own pause,
        or the MDB's DisableUpdates (the fleet-wide switch aside). From memory."""
        paused = self.state.host_paused(machine.hostname)
        if paused is not None:
            return (f"paused for this host {describe_pause(paused)}; `dominator mdb set "
                    f"{machine.hostname} --enable-updates` resumes it")
        if machine.disable_updates:
            return "disabled for this host in the MDB"
        return ""

    def find(self, hostname: str) -> Sub:
        """The sub of that name; NotFoundError when the MDB has no such host."""
        sub = self.subs.get(hostname)
        if sub is None:
            raise NotFoundError(f"unknown host {hostname}")
        return sub

    def allow_disruption(self, hostname: str) -> None:
        """Let the host's next update that fires HighImpact triggers (reboot, ...) run
        them, once (the update that does spends it); NotFoundError for a host the
        dominator does not know. A state write: call it in a thread from async code;
        the host's loop sees it at its next cycle."""
        self.find(hostname)
        self.state.allow_disruption(hostname)
