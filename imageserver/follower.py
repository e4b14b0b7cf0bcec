"""Replication, the follower's side: a replica follows its upstream (`Follower`, started
by `imageserver --replicate-from`) over the stream imageserver/feed.py serves.

The follower applies each event, persists its position after it, and reports its
progress on the same stream. It fetches only the objects it lacks, verified by SHA-256
before they are visible, and commits an image only once all its objects are in. Its
fetches and pull-through's share one in-flight table (imageserver/pullthrough.py): an
object on its way by either leaves upstream once.

A name is bound to one content forever: a replica's copy whose digest differs from
upstream's is quarantined (moved aside, an alarm) and upstream's copy fetched. A
replica that finds its upstream replaced (another id) or older (an older generation, a
sequence behind the one it applied) is diverged: it keeps everything and applies no
deletes, only adds, until an operator looks and restarts it with --accept-upstream: it
then asks for upstream's snapshot, follows upstream as it is now and applies deletes
again (a DELETED event or a tombstone of the same digest; never an image merely missing
upstream), logged and audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from fleetlib.auditlog import AuditLog
from fleetlib.errors import FleetError, PreconditionError, UnavailableError
from fleetlib.fstree.hashing import HASH_SIZE
from fleetlib.rpc.chunks import join_chunks_async
from fleetlib.rpc.objects import ObjectReceiver
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.wire import imageserver_pb2, objectserver_pb2
from imageserver.feed import ALARM, DIVERGED, IN_SYNC, SYNCING, Request, Response, cycle_error
from imageserver.journal import DELETED, EXPIRY_CHANGED, Position
from imageserver.pullthrough import PullThrough, Waiting
from imageserver.store import ImageStore, check_replicated, short
from imageserver.upstream import Upstream

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0  # a follower reports at least this often
HELLO_TIMEOUT = 15.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 5.0
FETCH_GROUP_BYTES = 64 << 20  # objects asked for in one GetObjects call
FETCH_GROUP_OBJECTS = 4096
MANIFEST_BUDGET = 256 << 20  # manifest bytes a snapshot reads ahead to announce what is pending

# Who changes the upstream followed, and how, in the audit log.
REPLICATION, DIVERGED_ACTION = "imageserver (replication)", "replication.diverged"
ACCEPTED_BY, ACCEPTED_ACTION = "imageserver --accept-upstream", "replication.accept-upstream"



@dataclass
class Manifest:
    """An image as upstream serialized it and as a message (not validated yet), with
    its objects in the order to fetch them."""

    data: bytes
    message: imageserver_pb2.Image
    sizes: dict[bytes, int]


def fetch_order(message: imageserver_pb2.Image) -> dict[bytes, int]:
    """The objects of an image MESSAGE (hash to size) by inode number: the order its
    tree was scanned in, a folder's files together, so that they compress together on
    the wire. Malformed ones are left out (validating the message refuses them)."""
    sizes: dict[bytes, int] = {}
    for inode in sorted(message.tree.inodes, key=lambda inode: inode.number):
        if inode.size and len(inode.hash) == HASH_SIZE:
            sizes.setdefault(inode.hash, inode.size)
    return sizes


def is_this_server(address: str, port: int) -> bool:
    """Whether HOST:PORT names this machine on the port this server listens on."""
    host, _, port_text = address.rpartition(":")
    if not port or int(port_text) != port:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                return True  # an address of this machine
            except OSError as err:
                if err.errno != errno.EADDRNOTAVAIL:
                    return True
    return False


@dataclass
class Session:
    """One open Replicate stream and what the upstream's hello said."""

    call: grpc.aio.StreamStreamCall[Request, Response]
    hello: imageserver_pb2.UpstreamHello


async def open_session(upstream: Upstream, hello: imageserver_pb2.ReplicaHello) -> Session:
    """Open the Replicate stream and exchange hellos; FleetError (one line) when the
    upstream cannot be reached, refuses us, or would close a cycle."""
    me = hello.identity.id
    call = upstream.images.Replicate()
    try:
        async with asyncio.timeout(HELLO_TIMEOUT):
            await call.write(Request(hello=hello))
            answer = await call.read()
    except TimeoutError:
        call.cancel()
        raise UnavailableError(f"upstream {upstream.address} did not answer the replication "
                               f"hello within {HELLO_TIMEOUT:.0f} s") from None
    except grpc.RpcError as err:
        call.cancel()
        what = describe_rpc_error(err)
        if isinstance(err, grpc.aio.AioRpcError) \
                and err.code() == grpc.StatusCode.FAILED_PRECONDITION:
            raise PreconditionError(f"upstream {upstream.address} refused to be followed: "
                                    f"{what}") from None
        raise UnavailableError(f"cannot replicate from {upstream.address}: {what}") from None
    if answer is grpc.aio.EOF or answer.WhichOneof("message") != "hello":
        call.cancel()
        raise UnavailableError(f"upstream {upstream.address} ended the replication stream "
                               "without a hello")
    theirs = answer.hello
    if theirs.identity.id == me:
        call.cancel()
        raise PreconditionError(f"--replicate-from {upstream.address} is this server itself")
    refused = cycle_error(me, theirs.identity.id, list(theirs.ancestry))
    if refused is not None:
        call.cancel()
        raise refused
    return Session(call, theirs)


@dataclass
class Follower:
    """A replica following its upstream: applies its journal, reports its progress."""

    store: ImageStore
    upstream: Upstream
    pull: PullThrough  # pull-through's fetches: one in-flight table for both
    port: int = 0
    location: str = ""
    address: str = ""  # how hosts reach this server; "": the upstream sees our IP
    bytes_replicated: int = 0  # object bytes moved from upstream since start
    bytes_pending: int = 0  # object bytes still lacking for images upstream announced
    upstream_sequence: int = 0  # upstream's latest sequence as last heard
    snapshots: int = 0  # snapshots received since start
    quarantines: int = 0  # images quarantined since start
    connected: bool = False
    busy: bool = False  # applying a snapshot or an event
    position: Position | None = None
    accept_upstream: bool = False  # --accept-upstream: follow the upstream as it is now
    audit: AuditLog | None = None  # where an acceptance is recorded
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.position = self.store.journal.position()

    @property
    def diverged(self) -> bool:
        """Whether this replica found its upstream replaced or older."""
        return self.position is not None and self.position.diverged

    @property
    def applied(self) -> int:
        """The last upstream sequence applied."""
        return self.position.applied_sequence if self.position is not None else 0

    def state(self) -> str:
        """syncing, in sync, diverged or alarm (a quarantined image)."""
        if self.diverged:
            return DIVERGED
        if self.store.quarantined:
            return ALARM
        if self.busy or not self.connected or self.applied < self.upstream_sequence:
            return SYNCING
        return IN_SYNC

    def lag(self) -> int:
        """Upstream events not applied yet, as far as known."""
        return max(self.upstream_sequence - self.applied, 0)

    def progress(self) -> imageserver_pb2.ReplicaProgress:
        """What the follower reports upstream."""
        return imageserver_pb2.ReplicaProgress(
            applied_sequence=self.applied, bytes_replicated=self.bytes_replicated,
            bytes_pending=self.bytes_pending, state=self.state(),
            quarantined=len(self.store.quarantined))

    async def connect(self) -> Session:
        """Open the stream and exchange hellos (see `open_session`); persists what the
        upstream's hello says."""
        position = self.position
        session = await open_session(self.upstream, imageserver_pb2.ReplicaHello(
            identity=self.store.journal.identity, address=self.address, port=self.port,
            location=self.location,
            following_id=position.upstream_id if position else "",
            following_generation=position.generation if position else 0,
            # Accepting the upstream as it is: its snapshot, tombstones included.
            from_sequence=position.applied_sequence if position and not self.accept_upstream
            else 0,
            ancestry=position.ancestry if position else []))
        self.adopt(session.hello)
        return session

    def adopt(self, hello: imageserver_pb2.UpstreamHello) -> None:
        """Take in the upstream's hello: divergence, the position to persist."""
        upstream = hello.identity
        self.upstream.master_address = hello.master_address or self.upstream.address
        self.upstream_sequence = hello.sequence
        position = self.position
        chain = [upstream.id, *hello.ancestry]
        if position is None or not position.upstream_id:
            self.position = Position(upstream.id, upstream.generation, 0, False, chain)
        else:
            why = ""
            if upstream.id != position.upstream_id:
                why = (f"its identity changed from {position.upstream_id[:12]} to "
                       f"{upstream.id[:12]} (a new or wiped master?)")
            elif upstream.generation < position.generation:
                why = (f"its generation went back from {position.generation} to "
                       f"{upstream.generation} (restored from an old copy?)")
            elif hello.sequence < position.applied_sequence:
                why = (f"its journal ends at sequence {hello.sequence}, before the "
                       f"{position.applied_sequence} this replica applied")
            if self.accept_upstream and (why or position.diverged):
                self._accept(position, upstream, why)
                position = Position(upstream.id, upstream.generation, 0, False, chain)
            elif why:
                log.error("DIVERGED from upstream %s: %s; keeping every image, applying no "
                          "deletes", self.upstream.address, why)
                self._record(REPLICATION, DIVERGED_ACTION,
                             f"diverged from upstream {self.upstream.address}: {why}; keeping "
                             "every image, applying no deletes", position, upstream, why)
                position = Position(upstream.id, upstream.generation, 0, True, chain)
            else:
                if self.accept_upstream:
                    log.info("--accept-upstream: nothing to accept, upstream %s is the server "
                             "this replica follows", self.upstream.address)
                position.generation = upstream.generation
                position.ancestry = chain
            self.position = position
        self.accept_upstream = False  # this start's first hello only: later ones are judged
        self.store.journal.save_position(self.position)
        self._changed.set()

    def _accept(self, old: Position, upstream: imageserver_pb2.ServerIdentity, why: str
                ) -> None:
        """--accept-upstream: log and audit that this replica follows UPSTREAM from now
        on instead of what OLD says it followed (or, when OLD is a divergence found
        earlier, the server it diverged from)."""
        if not why and old.diverged:
            old = self._diverged_from() or old
        summary = (f"accepted upstream {self.upstream.address} as it is now: server "
                   f"{old.upstream_id[:12]} generation {old.generation} -> server "
                   f"{upstream.id[:12]} generation {upstream.generation}; deletes apply again")
        log.warning("--accept-upstream: %s%s", summary, f" ({why})" if why else "")
        self._record(ACCEPTED_BY, ACCEPTED_ACTION, summary, old, upstream, why)

    def _record(self, who: str, action: str, summary: str, old: Position,
                upstream: imageserver_pb2.ServerIdentity, why: str) -> None:
        """An audit entry of a change of the upstream followed, from OLD to UPSTREAM."""
        if self.audit is not None:
            self.audit.record(who, action, summary, upstream=self.upstream.address,
                              old_id=old.upstream_id, old_generation=old.generation,
                              was_diverged=old.diverged, new_id=upstream.id,
                              new_generation=upstream.generation, reason=why)

    def _diverged_from(self) -> Position | None:
        """The upstream followed before the latest divergence, as the audit log says."""
        entries = self.audit.entries() if self.audit is not None else []
        for entry in reversed(entries):
            if entry.action == DIVERGED_ACTION:
                details = entry.details
                return Position(str(details.get("old_id", "")),
                                int(details.get("old_generation", 0)), 0, True)
        return None

    async def run(self, first: Session | None = None) -> None:
        """Follow the upstream for the server's lifetime, reconnecting with backoff."""
        delay = BACKOFF_FIRST
        while True:
            session = first
            first = None
            applied_before = self.applied
            try:
                if session is None:
                    session = await self.connect()
                await self._follow(session)
                log.warning("upstream %s ended the replication stream", self.upstream.address)
            except FleetError as err:
                log.warning("%s; retrying in %.1f s", err, delay)
            except (grpc.RpcError, OSError) as err:
                what = describe_rpc_error(err) if isinstance(err, grpc.RpcError) else str(err)
                log.warning("replication from %s: %s; retrying in %.1f s",
                            self.upstream.address, what, delay)
            finally:
                self.connected = self.busy = False
                self.bytes_pending = 0  # announced again by the snapshot or event resent
                if session is not None:
                    session.call.cancel()
            if self.applied != applied_before:
                delay = BACKOFF_FIRST
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow(self, session: Session) -> None:
        self.connected = True
        log.info("replicating from %s (server %s, generation %d, sequence %d)%s",
                 self.upstream.address, session.hello.identity.id[:12],
                 session.hello.identity.generation, session.hello.sequence,
                 ": snapshot follows" if session.hello.snapshot_follows else
                 f": resuming after sequence {self.applied}")
        reporter = asyncio.create_task(self._report(session.call))
        try:
            snapshot: list[imageserver_pb2.JournalEntry] = []
            while True:
                response = await session.call.read()
                if response is grpc.aio.EOF:
                    return
                kind = response.WhichOneof("message")
                if kind == "snapshot":
                    snapshot.extend(response.snapshot.entries)
                    if response.snapshot.last:
                        await self._apply_snapshot(snapshot, response.snapshot.sequence)
                        snapshot = []
                elif kind == "event":
                    await self._apply_event(response.event)
        finally:
            reporter.cancel()

    async def _report(self, call: grpc.aio.StreamStreamCall[Request, Response]) -> None:
        """Send our progress every second, or soon after it changed."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_INTERVAL):
                    await self._changed.wait()
            self._changed.clear()
            try:
                await call.write(Request(progress=self.progress()))
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the stream ended: the reading side reconnects
            await asyncio.sleep(0.05)  # coalesce a burst of changes into one report

    def _advance(self, sequence: int) -> None:
        assert self.position is not None  # set by the hello
        self.position.applied_sequence = sequence
        self.upstream_sequence = max(self.upstream_sequence, sequence)
        self.store.journal.save_position(self.position)
        self._changed.set()

    async def _apply_snapshot(self, entries: list[imageserver_pb2.JournalEntry],
                              sequence: int) -> None:
        self.snapshots += 1
        self.busy = True
        log.info("applying upstream's snapshot: %d entries as of sequence %d", len(entries),
                 sequence)
        self.upstream_sequence = max(self.upstream_sequence, sequence)
        # Read upstream's manifests first (as many as MANIFEST_BUDGET holds), so what this
        # replica lacks is announced as pending before the objects move.
        prepared: list[tuple[imageserver_pb2.JournalEntry, Manifest | None]] = []
        held = 0
        missing: dict[bytes, int] = {}
        for entry in entries:
            if entry.deleted:
                continue
            manifest = await self._manifest(entry) if held < MANIFEST_BUDGET else None
            if manifest is not None:
                held += len(manifest.data)
                missing.update(self.store.missing_objects(manifest.sizes))
            if manifest is not None or held >= MANIFEST_BUDGET:
                prepared.append((entry, manifest))
        self.bytes_pending = sum(missing.values())
        self._changed.set()
        for entry, manifest in prepared:
            manifest = manifest or await self._manifest(entry, announce=True)
            if manifest is not None:
                await self._complete(entry, manifest)
        for entry in entries:
            if entry.deleted:
                self._delete(entry)
        self.busy = False
        self._advance(sequence)

    async def _apply_event(self, event: imageserver_pb2.JournalEvent) -> None:
        self.upstream_sequence = max(self.upstream_sequence, event.sequence)
        if event.sequence <= self.applied:
            return  # seen already
        self.busy = True
        entry = event.entry
        if event.kind == DELETED:
            self._delete(entry)
        elif event.kind == EXPIRY_CHANGED:
            info = self.store.images.get(entry.name)
            if info is not None and info.digest == entry.digest \
                    and info.expires_unix != entry.expires_unix:
                self.store.set_expiry(entry.name, entry.expires_unix)
        else:
            manifest = await self._manifest(entry, announce=True)
            if manifest is not None:
                await self._complete(entry, manifest)
        self.busy = False
        self._advance(event.sequence)

    def _delete(self, entry: imageserver_pb2.JournalEntry) -> None:
        info = self.store.images.get(entry.name)
        if info is None:
            return
        if info.digest != entry.digest:
            log.warning("upstream deleted image %s (digest %s); this server's copy has digest "
                        "%s: kept", entry.name, short(entry.digest), short(info.digest))
        elif self.diverged:
            log.error("not deleting image %s as upstream did: this replica diverged from it",
                      entry.name)
        else:
            self.store.delete(entry.name)

    async def _manifest(self, entry: imageserver_pb2.JournalEntry, announce: bool = False
                        ) -> Manifest | None:
        """Upstream's image ENTRY, when this server must fetch it (None when it holds it:
        its expiry is fixed; or when upstream has deleted it since). A copy with other
        content is quarantined first. ANNOUNCE: count its missing objects as pending."""
        info = self.store.images.get(entry.name)
        if info is not None and info.digest == entry.digest:
            if info.expires_unix != entry.expires_unix:
                self.store.set_expiry(entry.name, entry.expires_unix)
            return None
        if info is not None:
            if self.diverged:
                log.error("image %s: upstream binds it to digest %s, this server holds %s; "
                          "diverged from upstream, so kept", entry.name, short(entry.digest),
                          short(info.digest))
                return None
            self.store.quarantine(entry.name, entry.digest)
            self.quarantines += 1
            self._changed.set()
        try:
            data = await join_chunks_async(self.upstream.images.GetImage(
                imageserver_pb2.GetImageRequest(name=entry.name)))
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                log.info("image %s is gone from upstream already", entry.name)
                return None
            raise
        message = imageserver_pb2.Image.FromString(data)
        manifest = Manifest(data, message, fetch_order(message))
        if announce:
            self.bytes_pending += sum(self.store.missing_objects(manifest.sizes).values())
            self._changed.set()
        return manifest

    async def _complete(self, entry: imageserver_pb2.JournalEntry, manifest: Manifest) -> None:
        """Fetch the objects of upstream's image that this server lacks, then commit it.
        The manifest is validated and its digest checked on a thread meanwhile."""
        checked = asyncio.ensure_future(
            asyncio.to_thread(check_replicated, manifest.message, entry.digest))
        try:
            missing = self.store.missing_objects(manifest.sizes)
            await self._fetch(missing)
            image = await checked
        finally:
            checked.cancel()  # a failed fetch: its result (or error) is not wanted
        held = self.store.images.get(entry.name)
        if held is not None and held.digest == entry.digest:
            return  # written through this server meanwhile (imageserver/writethrough.py)
        self.store.add_replicated(manifest.data, entry.digest, image)

    async def _fetch(self, missing: dict[bytes, int]) -> None:
        """Move the MISSING objects from upstream, verified, into the store. Those that
        pull-through has on their way already are not fetched again: waited for, and
        fetched here only if that fetch failed."""
        while missing:
            waiting: Waiting = {}
            for group in _groups(list(missing), missing):
                # Claimed group by group: callers pull what lies further on through
                # meanwhile, and this follower waits for it when it gets there.
                claimed, joined = self.pull.claim(group)
                waiting.update(joined)
                fetching = set(claimed).union(joined)
                self._held(sum(missing[digest] for digest in group if digest not in fetching))
                if claimed:
                    await self._fetch_group(claimed, missing)
            if waiting:
                await asyncio.wait(waiting.values())
            failed = {digest: missing[digest] for digest, future in waiting.items()
                      if future.cancelled() or future.exception() is not None}
            self._held(sum(missing[digest] for digest in waiting if digest not in failed))
            missing = failed

    async def _fetch_group(self, group: list[bytes], sizes: dict[bytes, int]) -> None:
        """One GetObjects call for GROUP (claimed by this follower): each object made
        durable and visible, and its waiters settled, as it arrives."""
        receiver = ObjectReceiver(self.store.objects)
        publisher = self.pull.publisher(receiver)
        counted = 0
        # Each message verified and written on a thread while the next one arrives; the
        # receiver is used by one thread at a time (commits start between two messages).
        feeding: asyncio.Future[list[bytes]] | None = None
        try:
            call = self.upstream.objects.GetObjects(
                objectserver_pb2.GetObjectsRequest(hashes=group, compress=True, pack=True))
            async for message in call:
                if feeding is not None:
                    publisher.add(await feeding)  # durable soon: a restart never refetches
                feeding = asyncio.ensure_future(asyncio.to_thread(receiver.feed_message,
                                                                  message))
                if receiver.stats.bytes_added != counted:
                    self._count(receiver.stats.bytes_added - counted)
                    counted = receiver.stats.bytes_added
            if feeding is not None:
                publisher.add(await feeding)
        finally:
            try:
                if feeding is not None:  # its error, if any, is the stream's
                    await asyncio.wait([feeding])
                    if not feeding.cancelled():
                        feeding.exception()
                await publisher.close()  # keep every object that arrived whole
            finally:  # what it did not bring, its waiters pull through themselves
                self.pull.settle(group, UnavailableError(
                    f"replication from {self.upstream.address} did not bring the object"))
        self._count(receiver.stats.bytes_added - counted)
        self._held(sum(sizes[d] for d in group) - receiver.stats.bytes_added)

    def _count(self, moved: int) -> None:
        if moved:
            self.bytes_replicated += moved
            self._held(moved)

    def _held(self, size: int) -> None:
        """SIZE more of the pending bytes are held now (moved, or held meanwhile)."""
        if size:
            self.bytes_pending = max(self.bytes_pending - size, 0)
            self._changed.set()


def _groups(hashes: list[bytes], sizes: dict[bytes, int]) -> Iterator[list[bytes]]:
    """HASHES in runs of at most FETCH_GROUP_BYTES and FETCH_GROUP_OBJECTS (one
    GetObjects call each)."""
    group: list[bytes] = []
    size = 0
    for digest in hashes:
        if group and (size >= FETCH_GROUP_BYTES or len(group) >= FETCH_GROUP_OBJECTS):
            yield group
            group, size = [], 0
        group.append(digest)
        size += sizes[digest]
    if group:
        yield group
