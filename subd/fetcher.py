"""Fetch: bring the objects an update needs into subd's cache (ROOT/.subd/objects).

Objects the host already holds in some file are copied locally instead of
downloaded; the rest come from an image server, zstd-compressed on the wire,
each verified against its SHA-256 before it is kept. Nothing outside `.subd`
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
from dataclasses import dataclass
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

    def start(self, server: str, hashes: list[bytes]) -> None:
        """Begin fetching in the background, pinning what is asked for (see Pins);
        PreconditionError if one is running."""
        if self._task is not None and not self._task.done():
            raise PreconditionError("a fetch is already in progress")
        address = parse_address(server, IMAGESERVER_PORT)
        self.pins.pin(hashes)
        self.progress = FetchProgress(in_progress=True)
        self._task = asyncio.get_running_loop().create_task(self._run(address, hashes))

    async def wait(self) -> None:
        """Until the current fetch (if any) ends."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self, address: str, hashes: list[bytes]) -> None:
        try:
            await self._fetch(address, list(dict.fromkeys(hashes)))
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
                log.warning("fetch from %s failed: %s", address, self.progress.error)
            else:
                log.info("fetched %d objects (%d bytes, %d copied locally)",
                         self.progress.objects_done, self.progress.bytes_done,
                         self.progress.bytes_copied_locally)
            self.on_cache_change()

    async def _fetch(self, address: str, hashes: list[bytes]) -> None:
        missing = [h for h in hashes if not self.cache.has(h)]
        progress = self.progress
        channel = open_channel(address, self.security, "imageserver", aio=True)
        try:
            stub = objectserver_pb2_grpc.ObjectServerStub(channel)
            sizes = await self._sizes(stub, missing, address)
            progress.objects_total = len(missing)
            progress.bytes_total = sum(sizes.values())
            check_free_space(self.root, progress.bytes_total)
            remote = await asyncio.to_thread(self._copy_local, sizes)
            if remote:
                await self._download(stub, remote, address)
        finally:
            await channel.close()

    async def _sizes(self, stub: objectserver_pb2_grpc.ObjectServerStub, hashes: list[bytes],
                     address: str) -> dict[bytes, int]:
        if not hashes:
            return {}
        reply = await stub.CheckObjects(objectserver_pb2.CheckObjectsRequest(hashes=hashes),
                                        timeout=call_timeout())
        absent = [h for h, ok in zip(hashes, reply.present, strict=True) if not ok]
        if absent:
            raise PreconditionError(f"image server {address} lacks {len(absent)} object(s), "
                                    f"e.g. {format_hash(absent[0])}")
        return dict(zip(hashes, reply.sizes, strict=True))

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
                        self.progress.objects_done += 1
                        self.progress.bytes_done += sizes.get(done, 0)
                await limiter.account(wire)
            receiver.close()
        finally:
            call.cancel()  # a no-op once the stream ended
            receiver.close(strict=False)  # keep whole objects: the next fetch resumes
