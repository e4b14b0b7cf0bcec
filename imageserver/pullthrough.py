"""Pull-through: a replica asked for objects it does not hold fetches them from its
upstream, once per object however many callers wait for it (single-flight by hash),
verifies each against its SHA-256 before it is visible, stores it and serves every
waiter. Objects pulled this way are orphans until an image references them: the
orphan collector removes them after its grace period, as it does abandoned uploads.

Replication shares the same in-flight table (`claim`, `settle`): an object on its way
by either is not fetched again by the other. A caller waiting for an object the
follower is replicating gets it when it lands, or pulls it through itself if that
fetch failed (a cut stream); the follower likewise fetches what a failed pull-through
did not bring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any

import grpc

from fleetlib.errors import FleetError, NoSpaceError, NotFoundError, UnavailableError
from fleetlib.fstree.hashing import format_hash
from fleetlib.rpc.objects import ObjectReceiver
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import call_timeout
from fleetlib.wire import objectserver_pb2
from imageserver.store import ImageStore
from imageserver.upstream import Upstream

log = logging.getLogger(__name__)

CHECK_BATCH = 16384  # hashes per CheckObjects call to the upstream
# Arrived objects are committed (each commit syncs the filesystem twice) once this many
# bytes or seconds have gathered since the last, and never two commits at once.
PUBLISH_BYTES, PUBLISH_SECONDS = 8 << 20, 0.25
# Transport failures: the upstream could not be asked (its refusals pass through as such).
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)

Waiting = dict[bytes, "asyncio.Future[None]"]


def unreachable(upstream: Upstream, doing: str, err: grpc.RpcError) -> UnavailableError:
    """The one-line error for an upstream that could not be reached while DOING."""
    return UnavailableError(f"upstream image server {upstream.address} could not be reached "
                            f"to {doing}: {describe_rpc_error(err)}")


async def upstream_sizes(upstream: Upstream, hashes: Sequence[bytes], timeout: float,
                         ) -> dict[bytes, int]:
    """The sizes of the objects among HASHES the upstream holds (it restarts their orphan
    grace period); UnavailableError when it cannot say."""
    sizes: dict[bytes, int] = {}
    for start in range(0, len(hashes), CHECK_BATCH):
        batch = hashes[start:start + CHECK_BATCH]
        try:
            reply = await upstream.objects.CheckObjects(
                objectserver_pb2.CheckObjectsRequest(hashes=batch), timeout=timeout)
        except grpc.RpcError as err:
            raise unreachable(upstream, "check objects", err) from None
        sizes.update((digest, size) for digest, present, size
                     in zip(batch, reply.present, reply.sizes, strict=True) if present)
    return sizes


async def arrivals(waiting: Waiting) -> AsyncIterator[list[bytes]]:
    """The hashes of WAITING in groups as they are stored; once all are settled, the
    first failure (a FleetError of its kind) if some could not be."""
    pending = {future: digest for digest, future in waiting.items()}
    failure: BaseException | None = None
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        group = []
        for future in done:
            digest = pending.pop(future)
            err = future.exception()
            if err is None:
                group.append(digest)
            elif failure is None:
                failure = err
        if group:
            yield group
    if failure is not None:  # a copy: other waiters raise the same failure
        raise type(failure)(str(failure))


class Publisher:
    """Makes the objects a receiver verified durable and visible while its stream goes
    on, then settles their waiters: every PUBLISH_BYTES or PUBLISH_SECONDS, one commit at
    a time (each syncs the filesystem), what arrives meanwhile waiting for the next, so
    the disk sets the pace and a slow sync costs one wait, not one per message. Commits
    begin only in `add`, so its caller decides when the receiver may be touched."""

    def __init__(self, receiver: ObjectReceiver, settle: Callable[[list[bytes]], None]
                 ) -> None:
        self.receiver = receiver
        self.settle = settle
        self.verified: list[bytes] = []  # arrived whole, not committed yet
        self.committing: asyncio.Future[int] | None = None
        self.closed = False
        self._since = time.monotonic()  # when the last commit began
        self._bytes = receiver.stats.bytes_added  # verified when it began

    def add(self, arrived: list[bytes]) -> None:
        """ARRIVED (hashes) were verified: commit them when it is time."""
        self.verified += arrived
        if self.verified and self.committing is None and not self.closed and (
                self.receiver.stats.bytes_added - self._bytes >= PUBLISH_BYTES
                or time.monotonic() - self._since >= PUBLISH_SECONDS):
            self._commit()

    def _commit(self) -> None:
        batch, self.verified = self.verified, []
        self._since, self._bytes = time.monotonic(), self.receiver.stats.bytes_added
        self.committing = landed = asyncio.wrap_future(self.receiver.commit())

        def committed(done: asyncio.Future[int]) -> None:
            self.committing = None
            if not done.cancelled():
                done.exception()  # the receiver's close reports it
            self.settle(batch)

        landed.add_done_callback(committed)

    async def close(self, strict: bool = False) -> None:
        """Commit what arrived whole (dropping a partial object) off the event loop, and
        settle its waiters; the store's error if a commit failed, and when STRICT, a
        FleetError if the stream stopped mid-object."""
        self.closed = True
        try:
            await asyncio.to_thread(self.receiver.close, strict)
        finally:
            self.settle(self.verified)


class PullThrough:
    """A replica's fetches from its upstream of the objects callers want and it lacks."""

    def __init__(self, store: ImageStore, upstream: Upstream) -> None:
        self.store = store
        self.upstream = upstream
        self.inflight: Waiting = {}  # hash -> settles once stored (or not)
        self.replicating: set[bytes] = set()  # of those, the ones the follower fetches
        self._joined: Waiting = {}  # hash -> callers' wait for the follower's fetch of it
        self._queued: list[bytes] = []  # claimed in this turn of the loop, fetched as one
        self._tasks: set[asyncio.Task[None]] = set()
        # Totals since start, for metrics.
        self.pulled_objects = 0  # objects stored by pull-through
        self.pulled_bytes = 0
        self.shared_objects = 0  # waits of one (replication, a caller) for the other's fetch

    def pull(self, hashes: Iterable[bytes]) -> Waiting:
        """Begin fetching those of HASHES neither stored nor already on their way: a
        future per hash not stored, that settles once it is (or with a FleetError)."""
        waiting: Waiting = {}
        new = []
        for digest in hashes:
            if digest in waiting:
                continue
            future = self.inflight.get(digest)
            if future is None:
                if self.store.objects.has(digest):
                    continue
                future = self._claim(digest)
                new.append(digest)
            elif digest in self.replicating:
                self.shared_objects += 1
                future = self._join(digest, future)
            waiting[digest] = future
        if new:  # one fetch for what this turn of the loop claims (e.g. retries after a
            if not self._queued:  # failed replication fetch), not the caller's: others wait
                asyncio.get_running_loop().call_soon(self._fetch_queued)
            self._queued += new
        return waiting

    def _fetch_queued(self) -> None:
        queued, self._queued = self._queued, []
        self._start(self._fetch(queued))

    def claim(self, hashes: Iterable[bytes]) -> tuple[list[bytes], Waiting]:
        """Replication's share of HASHES: (those neither stored nor on their way, now
        claimed: the follower fetches them and `settle`s each; the futures of those
        pull-through is fetching already)."""
        claimed: list[bytes] = []
        waiting: Waiting = {}
        for digest in hashes:
            future = self.inflight.get(digest)
            if future is not None:
                if digest not in self.replicating:
                    self.shared_objects += 1
                waiting[digest] = future
            elif not self.store.objects.has(digest):
                self._claim(digest)
                self.replicating.add(digest)
                claimed.append(digest)
        return claimed, waiting

    def _claim(self, digest: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inflight[digest] = future
        return future

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run WORK apart from the caller (others may wait for it too), keeping it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _join(self, digest: bytes, first: asyncio.Future[None]) -> asyncio.Future[None]:
        """What callers wait for while the follower fetches DIGEST (FIRST): one for all."""
        joined = self._joined.get(digest)
        if joined is None:
            joined = self._joined[digest] = self._start(self._after_replication(digest, first))

            def forget(done: asyncio.Future[None]) -> None:
                if self._joined.get(digest) is done:
                    del self._joined[digest]

            joined.add_done_callback(forget)
        return joined

    async def _after_replication(self, digest: bytes, first: asyncio.Future[None]) -> None:
        """Settles once FIRST (the follower fetching DIGEST) lands; if that fetch failed,
        once DIGEST is pulled through here."""
        try:
            await asyncio.shield(first)
        except FleetError:
            del self._joined[digest]  # callers from now on wait for what comes next
            again = self.pull([digest]).get(digest)
            if again is not None:
                await again

    async def ensure(self, hashes: Iterable[bytes]) -> None:
        """Wait until every one of HASHES is stored; the first failure if one cannot be."""
        async for _ in arrivals(self.pull(hashes)):
            pass

    async def _fetch(self, hashes: list[bytes]) -> None:
        """Fetch HASHES from the upstream, settling each one's future."""
        failure: FleetError | None = None
        try:
            sizes = await upstream_sizes(self.upstream, hashes, call_timeout())
            for digest in hashes:
                if digest not in sizes:
                    self.settle([digest], NotFoundError(
                        f"object {format_hash(digest)} is stored neither here nor on upstream "
                        f"image server {self.upstream.address}"))
            if sizes:
                await self._download(sizes)
        except FleetError as err:
            failure = err
        except OSError as err:
            failure = FleetError(f"storing objects pulled from {self.upstream.address} failed: "
                                 f"{err.strerror or err}")
        except Exception as err:  # noqa: BLE001 - every waiter must hear of it
            log.exception("pull-through from %s failed", self.upstream.address)
            failure = FleetError(f"internal error pulling objects through: {err}")
        finally:  # also when cancelled (shutdown): no waiter waits forever
            self.settle(hashes, failure or UnavailableError(
                f"upstream image server {self.upstream.address} did not send the object"))
        if isinstance(failure, UnavailableError):
            log.warning("%s", failure)

    def publisher(self, receiver: ObjectReceiver) -> Publisher:
        """What makes RECEIVER's objects visible as they arrive and settles their waiters."""
        return Publisher(receiver, self.settle)

    async def _download(self, sizes: dict[bytes, int]) -> None:
        """One GetObjects call for SIZES' objects, each verified, stored and its waiters
        settled in groups as they arrive."""
        receiver = ObjectReceiver(self.store.objects)
        publisher = self.publisher(receiver)
        call = self.upstream.objects.GetObjects(
            objectserver_pb2.GetObjectsRequest(hashes=list(sizes), compress=True, pack=True))
        idle = call_timeout()
        try:
            try:
                while True:
                    try:
                        message = await asyncio.wait_for(call.read(), idle)
                    except TimeoutError:
                        raise UnavailableError(f"upstream image server {self.upstream.address} "
                                               f"sent nothing for {idle:g} s") from None
                    if message is grpc.aio.EOF:
                        break
                    publisher.add(receiver.feed_message(message))
                await publisher.close(strict=True)
            finally:
                call.cancel()  # a no-op once the stream ended
                await publisher.close()  # keep what arrived whole
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # deleted upstream meanwhile
                raise NotFoundError(f"upstream image server {self.upstream.address}: "
                                    f"{err.details()}") from None
            raise unreachable(self.upstream, "pull objects through", err) from None
        except NoSpaceError:
            raise
        except FleetError as err:  # a corrupt or malformed object: none of it is kept
            raise UnavailableError(f"upstream image server {self.upstream.address} sent a bad "
                                   f"object: {err}") from None
        finally:
            self.pulled_objects += receiver.stats.added
            self.pulled_bytes += receiver.stats.bytes_added
            if receiver.stats.added:
                log.info("pulled %d object(s), %d bytes through from %s",
                         receiver.stats.added, receiver.stats.bytes_added,
                         self.upstream.address)

    def settle(self, hashes: Iterable[bytes], failure: FleetError | None = None) -> None:
        """Settle the futures of HASHES still in flight: done if stored, else FAILURE."""
        for digest in hashes:
            future = self.inflight.get(digest)
            if future is None or future.done():
                continue
            del self.inflight[digest]
            self.replicating.discard(digest)
            if self.store.objects.has(digest):
                future.set_result(None)
            else:
                future.set_exception(failure or FleetError(
                    f"object {format_hash(digest)} was not stored"))
                future.exception()  # retrieved: nobody may be waiting any more
