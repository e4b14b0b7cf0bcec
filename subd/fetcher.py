"""Fetch: bring the objects an update needs into subd's cache (ROOT/.subd/objects).

Objects the host already holds in some file are copied locally instead of
downloaded; the rest come from image servers, zstd-compressed on the wire,
each verified against its SHA-256 before it is kept. The servers are tried in the
order given (the dominator ranks them nearest first): what one lacks, or fails to
send (unreachable, an error, a corrupt object), comes from the next; what each one
served is counted in the fetch status (`bytes_by_server`) and logged. Nothing outside `.subd`
changes. A fetch interrupted at any point resumes: objects already cached are
skipped. Free space is checked before anything is written. No call to the image
server waits forever: CheckObjects has a deadline and the download gives up when no
message arrives for as long (`fleetlib.rpc.tls.call_timeout`), and the channel's
keepalive fails a connection gone silent, so a fetch always ends, with an error in its
status when it did not complete.

Every object a fetch asks for is pinned for PIN_SECONDS: Cleanup leaves it in the cache,
so `sub fetch` then `sub update` works on a host whose dominator cleans the caches of
synced hosts each cycle. Pins live in memory: a restart of subd drops them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fleetlib.errors import FleetError, PreconditionError
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.listing import quote
from fleetlib.fstree.objectstore import ObjectStore, check_free_space
from fleetlib.fstree.objectstore import free_bytes as free_bytes  # subd.service uses it
from fleetlib.fstree.safeopen import open_under
from fleetlib.fstree.tree import Kind, Tree
from fleetlib.rpc.objects import ObjectReceiver
from fleetlib.rpc.ports import IMAGESERVER_PORT
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security, call_timeout, open_channel, parse_address
from fleetlib.wire import objectserver_pb2, objectserver_pb2_grpc, subd_pb2

log = logging.getLogger(__name__)

PIN_SECONDS = 15 * 60


@dataclass
class FetchProgress:
    """What Poll reports about the current or last fetch."""

    in_progress: bool = False
    objects_total: int = 0
    objects_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_copied_locally: int = 0
    error: str = ""
    bytes_by_server: dict[str, int] = field(default_factory=dict)

    def to_proto(self) -> subd_pb2.FetchStatus:
        """The wire form."""
        return subd_pb2.FetchStatus(**{**self.__dict__, "error": quote(self.error)})


class Pins:
    """Objects a recent fetch asked for, each until its pin expires (time.monotonic())."""

    def __init__(self, seconds: float = PIN_SECONDS) -> None:
        self.seconds = seconds
        self._until: dict[bytes, float] = {}

    def pin(self, hashes: list[bytes]) -> None:
        """Keep these objects for the next `seconds` (renewing older pins)."""
        until = time.monotonic() + self.seconds
        self._until.update(dict.fromkeys(hashes, until))

    def live(self) -> set[bytes]:
        """The objects pinned now (expired pins are forgotten)."""
        now = time.monotonic()
        self._until = {h: until for h, until in self._until.items() if until > now}
        return set(self._until)


class RateLimiter:
    """Keeps a transfer's long-run rate under `bytes_per_second` (0: unlimited)."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self.started = time.monotonic()
        self.count = 0

    async def account(self, size: int) -> None:
        """Record `size` bytes moved and sleep if ahead of the allowed rate."""
        if self.rate <= 0:
            return
        self.count += size
        ahead = self.count / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            await asyncio.sleep(ahead)


def interface_speed(address: str) -> float:
    """Bytes/s of the fastest real network interface, or 0 (unknown: unlimited).
    Loopback traffic is never limited."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "::1") or host.startswith("127."):
        return 0.0
    speeds = []
    for speed_file in Path("/sys/class/net").glob("*/speed"):
        try:
            mbits = int(speed_file.read_text())
        except (OSError, ValueError):
            continue
        if mbits > 0 and speed_file.parent.name != "lo":
            speeds.append(mbits * 1_000_000 / 8)
    return max(speeds, default=0.0)


class Fetcher:
    """Runs one fetch at a time in the background; `progress` is what Poll shows."""

    def __init__(self, root: Path, cache: ObjectStore, security: Security,
                 network_speed_percent: float, current_tree: Callable[[], Tree | None],
                 on_cache_change: Callable[[], None]) -> None:
        self.root = root
        self.cache = cache
        self.security = security
        self.network_speed_percent = network_speed_percent
        self.current_tree = current_tree
        self.on_cache_change = on_cache_change
        self.progress = FetchProgress()
        self.pins = Pins()
        self._task: asyncio.Task[None] | None = None

    def start(self, servers: list[str], hashes: list[bytes]) -> None:
        """Begin fetching in the background from `servers` (tried in order, per object),
        pinning what is asked for (see Pins); PreconditionError if one is running."""
        if self._task is not None and not self._task.done():
            raise PreconditionError("a fetch is already in progress")
        if not servers:
            raise FleetError("no image server to fetch from")
        addresses = list(dict.fromkeys(parse_address(server, IMAGESERVER_PORT)
                                       for server in servers))
        self.pins.pin(hashes)
        self.progress = FetchProgress(in_progress=True)
        self._task = asyncio.get_running_loop().create_task(self._run(addresses, hashes))

    async def wait(self) -> None:
        """Until the current fetch (if any) ends."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self, addresses: list[str], hashes: list[bytes]) -> None:
        try:
            await self._fetch(addresses, list(dict.fromkeys(hashes)))
        except FleetError as err:
            self.progress.error = str(err)
        except grpc.RpcError as err:
            self.progress.error = describe_rpc_error(err)
        except OSError as err:
            self.progress.error = f"{err.strerror or err}"
        except Exception as err:  # noqa: BLE001 - report, never kill the daemon
            log.exception("fetch failed")
            self.progress.error = f"internal error: {err}"
        finally:
            self.progress.in_progress = False
            if self.progress.error:
                log.warning("fetch from %s failed: %s", ", ".join(addresses),
                            self.progress.error)
            else:
                log.info("fetched %d objects (%d bytes, %d copied locally, by server: %s)",
                         self.progress.objects_done, self.progress.bytes_done,
                         self.progress.bytes_copied_locally,
                         ", ".join(f"{address} {count}" for address, count
                                   in self.progress.bytes_by_server.items()) or "none")
            self.on_cache_change()

    async def _fetch(self, addresses: list[str], hashes: list[bytes]) -> None:
        """Each object from the first server of `addresses` that has it and sends it
        whole and true; FleetError naming every server's failure if some never came."""
        missing = [h for h in hashes if not self.cache.has(h)]
        self.progress.objects_total = len(missing)
        sized: set[bytes] = set()  # objects whose size is in bytes_total (and space checked)
        failures: list[str] = []
        for address in addresses:
            if not missing:
                break
            failure = ""
            try:
                await self._fetch_from(address, missing, sized)
            except FleetError as err:
                failure = str(err)
            except grpc.RpcError as err:
                failure = describe_rpc_error(err)
            if failure:
                failures.append(failure)
                log.info("fetch from %s incomplete (next server if any): %s", address, failure)
            missing = [h for h in missing if not self.cache.has(h)]
        if missing:
            raise FleetError("; ".join(failures) or "no image server holds the objects")

    async def _fetch_from(self, address: str, missing: list[bytes], sized: set[bytes]) -> None:
        """What `address` holds of `missing`: copied from the host's files if there,
        else downloaded; FleetError (or RpcError) if it lacks some or fails."""
        channel = open_channel(address, self.security, "imageserver", aio=True)
        try:
            stub = objectserver_pb2_grpc.ObjectServerStub(channel)
            sizes, absent = await self._sizes(stub, missing)
            new = {h: size for h, size in sizes.items() if h not in sized}
            check_free_space(self.root, sum(new.values()))
            self.progress.bytes_total += sum(new.values())
            sized.update(new)
            remote = await asyncio.to_thread(self._copy_local, sizes)
            if remote:
                await self._download(stub, remote, address)
        finally:
            await channel.close()
        if absent:
            raise PreconditionError(f"image server {address} lacks {len(absent)} object(s), "
                                    f"e.g. {format_hash(absent[0])}")

    @staticmethod
    async def _sizes(stub: objectserver_pb2_grpc.ObjectServerStub, hashes: list[bytes]
                     ) -> tuple[dict[bytes, int], list[bytes]]:
        """The sizes of the objects the server holds, and those it lacks."""
        reply = await stub.CheckObjects(objectserver_pb2.CheckObjectsRequest(hashes=hashes),
                                        timeout=call_timeout())
        answers = list(zip(hashes, reply.present, reply.sizes, strict=True))
        return ({h: size for h, ok, size in answers if ok},
                [h for h, ok, _ in answers if not ok])

    def _copy_local(self, sizes: dict[bytes, int]) -> dict[bytes, int]:
        """Copy objects the host holds in its own files; returns those still missing."""
        tree = self.current_tree()
        if tree is None:
            return sizes
        paths = {inode.hash: path for path, _, inode in tree.walk()
                 if inode.kind == Kind.REGULAR and inode.hash in sizes}
        remaining = dict(sizes)
        batch = self.cache.batch()
        for digest, path in paths.items():
            try:  # never a FIFO, device or symlink swapped in since the scan
                fd, st = open_under(self.root, path)
                with os.fdopen(fd, "rb") as source:
                    if st.st_size != sizes[digest]:
                        raise FleetError(f"{path}: {st.st_size} bytes, not {sizes[digest]}")
                    writer = batch.begin(digest, sizes[digest])
                    while data := source.read(1 << 20):
                        writer.write(data)
                    writer.finish()
            except (OSError, FleetError) as err:  # changed since scanned: download it
                log.debug("local copy of %s failed: %s", path, err)
                continue
            del remaining[digest]
            self.progress.objects_done += 1
            self.progress.bytes_done += sizes[digest]
            self.progress.bytes_copied_locally += sizes[digest]
        batch.commit()
        return remaining

    async def _download(self, stub: objectserver_pb2_grpc.ObjectServerStub,
                        sizes: dict[bytes, int], address: str) -> None:
        limiter = RateLimiter(interface_speed(address) * self.network_speed_percent / 100)
        receiver = ObjectReceiver(self.cache)
        request = objectserver_pb2.GetObjectsRequest(hashes=list(sizes), compress=True)
        idle = call_timeout()
        call = stub.GetObjects(request)
        try:
            while True:
                try:
                    message = await asyncio.wait_for(call.read(), idle)
                except TimeoutError:
                    raise FleetError(f"image server {address} sent nothing for {idle:g} s: "
                                     "download abandoned") from None
                if message is grpc.aio.EOF:
                    break
                wire = 0
                for chunk in message.chunks:
                    wire += len(chunk.data)
                    done = receiver.feed(chunk)
                    if done is not None:
                        size = sizes.get(done, 0)
                        self.progress.objects_done += 1
                        self.progress.bytes_done += size
                        served = self.progress.bytes_by_server
                        served[address] = served.get(address, 0) + size
                await limiter.account(wire)
            receiver.close()
        finally:
            call.cancel()  # a no-op once the stream ended
            receiver.close(strict=False)  # keep whole objects: the next fetch resumes
