"""A synchronous client of one subd, for the CLI (and the dominator's tools).

No call waits forever: unary calls and short polls have a deadline
(`fleetlib.rpc.tls.call_timeout`), an update UPDATE_TIMEOUT, and a stream of unknown
size (a poll with the tree, GetFiles) relies on the channel's keepalive, which fails
it once the connection goes silent.

Every mutating call takes an optional `fence` (subd.fence): the caller's lease on the
host, which subd checks; without it the call is unfenced (an operator's, or a single
dominator's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import grpc

from fleetlib.errors import FleetError
from fleetlib.fstree.tree import Tree
from fleetlib.rpc.chunks import join_chunks, parse_in_pieces, split_message
from fleetlib.rpc.ports import SUBD_PORT
from fleetlib.rpc.tls import Security, call_timeout, open_channel, parse_address
from fleetlib.wire import subd_pb2, subd_pb2_grpc, tree_pb2
from fleetlib.wire.codec import tree_from_proto
from subd.changes import UpdatePlan, plan_to_proto
from subd.fence import FenceToken

log = logging.getLogger(__name__)

DEFAULT_PORT = SUBD_PORT
POLL_INTERVAL = 0.2
# The most tree the dominator takes from one host per poll. A Debian install (~40k
# inodes) serializes to about 5 MiB and 300k inodes to about 40 MiB; 512 MiB is millions of
# inodes, beyond any real host, while it bounds what one broken or hostile sub can make
# the dominator buffer (decoded, a tree takes several times its wire size).
DEFAULT_MAX_TREE_BYTES = 512 << 20
# How long an update may take on the sub, from the first chunk sent to its result.
UPDATE_TIMEOUT = 600.0
Fenceable = TypeVar("Fenceable", subd_pb2.CleanupRequest, subd_pb2.Configuration)


class TreeTooLarge(FleetError):
    """A sub's tree is larger than the caller accepts: nothing past the limit was read."""


def decode_tree(data: bytes) -> Tree:
    """A tree from its serialized form (seconds of CPU for a few hundred thousand inodes)."""
    return tree_from_proto(parse_in_pieces(tree_pb2.Tree, data))


def read_poll(responses: Iterable[subd_pb2.PollResponse]
              ) -> tuple[subd_pb2.SubStatus, Tree | None]:
    """Status and (when it follows) the tree from a Poll response stream."""
    stream = iter(responses)
    first = next(stream)
    if not first.tree_follows:
        return first.status, None
    return first.status, decode_tree(join_chunks(r.tree_chunk for r in stream))


def encode_update(plan: UpdatePlan, fence: FenceToken | None = None) -> bytes:
    """An update serialized, to travel in 1 MiB chunks of an UpdateStream call."""
    request = plan_to_proto(plan)
    if fence is not None:
        request.fence.CopyFrom(fence.to_proto())
    return request.SerializeToString()


def fenced(request: Fenceable, fence: FenceToken | None) -> Fenceable:
    """`request` carrying `fence` (unchanged when None)."""
    if fence is not None:
        request.fence.CopyFrom(fence.to_proto())
    return request


def fetch_request(servers: str | Sequence[str], hashes: list[bytes], image_name: str = "",
                  fence: FenceToken | None = None) -> subd_pb2.FetchRequest:
    """A Fetch of `hashes` (content of image `image_name`, which a subd with
    --trusted-keys needs) from `servers` (one or several, tried in order); `server`
    carries the first, for a subd that predates `servers`."""
    ordered = [servers] if isinstance(servers, str) else list(servers)
    if not ordered:
        raise FleetError("no image server to fetch from")
    return subd_pb2.FetchRequest(server=ordered[0], servers=ordered, hashes=hashes,
                                 image_name=image_name,
                                 fence=fence.to_proto() if fence is not None else None)


def older_subd(err: grpc.RpcError, address: str) -> bool:
    """Whether a failed UpdateStream means a subd from before it existed (which takes
    updates that fit one message): an image carrying a newer subd must still reach it."""
    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
        return False
    log.info("%s has no UpdateStream (an older subd): sending one Update message", address)
    return True


class SubClient:
    """One connection to a subd (`HOST` or `HOST:PORT`, default port 6969)."""

    def __init__(self, address: str, security: Security) -> None:
        self.address = parse_address(address, DEFAULT_PORT)
        self.channel = open_channel(self.address, security, "subd")
        self.stub = subd_pb2_grpc.SubdStub(self.channel)

    def close(self) -> None:
        """Close the connection."""
        self.channel.close()

    def __enter__(self) -> SubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, have_generation: int = 0, short: bool = False
             ) -> tuple[subd_pb2.SubStatus, Tree | None]:
        """Status, and the tree when the sub's generation differs from ours (a short
        poll, status only, has a deadline; a tree of any size has none but keepalive)."""
        request = subd_pb2.PollRequest(have_generation=have_generation, short=short)
        stream = self.stub.Poll(request, timeout=call_timeout() if short else None)
        try:
            return read_poll(stream)
        finally:
            stream.cancel()  # a no-op once the stream ended

    def fetch(self, servers: str | Sequence[str], hashes: list[bytes], image_name: str = "",
              fence: FenceToken | None = None) -> None:
        """Ask the sub to fetch objects of image `image_name` from image servers, tried
        in order (runs in the background)."""
        self.stub.Fetch(fetch_request(servers, hashes, image_name, fence),
                        timeout=call_timeout())

    def wait_fetch(self, progress: Callable[[subd_pb2.FetchStatus], None] | None = None,
                   timeout: float = 3600) -> subd_pb2.FetchStatus:
        """Poll until the fetch ends; FleetError with the sub's reason if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.poll(short=True)
            if progress is not None:
                progress(status.fetch)
            if not status.fetch.in_progress:
                if status.fetch.error:
                    raise FleetError(f"fetch failed on {self.address}: {status.fetch.error}")
                return status.fetch
            if time.monotonic() > deadline:
                raise FleetError(f"fetch on {self.address} still running after {timeout:.0f} s")
            time.sleep(POLL_INTERVAL)

    def update(self, plan: UpdatePlan, fence: FenceToken | None = None
               ) -> subd_pb2.UpdateResult:
        """Apply an update of any size and return its result (the sub refuses unsafe ones)."""
        data = encode_update(plan, fence)
        try:
            self.stub.UpdateStream(split_message(data), timeout=UPDATE_TIMEOUT)
        except grpc.RpcError as err:
            if not older_subd(err, self.address):
                raise
            self.stub.Update(subd_pb2.UpdateRequest.FromString(data), timeout=UPDATE_TIMEOUT)
        status, _ = self.poll(short=True)
        return status.last_update

    def wait_for_scan(self, after: int, timeout: float = 120) -> subd_pb2.SubStatus:
        """Poll until the sub completes a scan numbered above `after`."""
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.poll(short=True)
            if status.scan_count > after:
                return status
            if time.monotonic() > deadline:
                raise FleetError(f"{self.address} did not finish a scan within {timeout:.0f} s")
            time.sleep(POLL_INTERVAL)

    def cleanup(self, hashes: list[bytes], fence: FenceToken | None = None) -> int:
        """Remove cached objects; returns how many were removed."""
        reply: subd_pb2.CleanupResponse = self.stub.Cleanup(
            fenced(subd_pb2.CleanupRequest(hashes=hashes), fence), timeout=call_timeout())
        return reply.removed

    def cleanup_all_but(self, keep: list[bytes], fence: FenceToken | None = None) -> int:
        """Remove every cached object not in `keep`; returns how many were removed."""
        reply: subd_pb2.CleanupResponse = self.stub.Cleanup(
            fenced(subd_pb2.CleanupRequest(all_but_keep=True, keep=keep), fence),
            timeout=call_timeout())
        return reply.removed

    def get_files(self, paths: list[str]) -> dict[str, bytes | None]:
        """Contents of files on the host (None where missing)."""
        result: dict[str, bytes | None] = {}
        parts: list[bytes] = []
        for path, data, last in self.stream_files(paths):
            if data is None:
                result[path] = None
                continue
            parts.append(data)
            if last:
                result[path] = b"".join(parts)
                parts = []
        return result

    def stream_files(self, paths: list[str]) -> Iterator[tuple[str, bytes | None, bool]]:
        """(path, piece of at most 1 MiB or None when missing, whether it is the file's
        last piece) for the files at `paths` on the host, in order; a directory, device
        or symlink fails the call (INVALID_ARGUMENT). No deadline: a file of any size
        streams for as long as the connection lives (keepalive)."""
        request = subd_pb2.GetFilesRequest(paths=[os.fsencode(p) for p in paths])
        for piece in self.stub.GetFiles(request):
            path = os.fsdecode(piece.path)
            yield path, None if piece.missing else piece.data, piece.last

    def get_configuration(self) -> subd_pb2.Configuration:
        """subd's current limits and scan exclusions."""
        reply: subd_pb2.Configuration = self.stub.GetConfiguration(
            subd_pb2.GetConfigurationRequest(), timeout=call_timeout())
        return reply

    def set_configuration(self, changes: subd_pb2.Configuration,
                          fence: FenceToken | None = None) -> subd_pb2.Configuration:
        """Change what `changes` sets (0 or empty: unchanged); the configuration after."""
        request = subd_pb2.Configuration()
        request.CopyFrom(changes)
        reply: subd_pb2.Configuration = self.stub.SetConfiguration(fenced(request, fence),
                                                                   timeout=call_timeout())
        return reply


class AsyncSubClient:
    """The dominator's asynchronous view of one subd: the calls its herd makes."""

    def __init__(self, address: str, security: Security) -> None:
        self.address = parse_address(address, DEFAULT_PORT)
        self.channel = open_channel(self.address, security, "subd", aio=True)
        self.stub = subd_pb2_grpc.SubdStub(self.channel)

    async def close(self) -> None:
        """Close the connection."""
        await self.channel.close()

    async def poll(self, have_generation: int = 0, short: bool = False, timeout: float = 60,
                   max_tree_bytes: int = DEFAULT_MAX_TREE_BYTES
                   ) -> tuple[subd_pb2.SubStatus, Tree | None]:
        """Status, and the tree when the sub's generation differs from ours.

        A tree over `max_tree_bytes` raises TreeTooLarge and the call is cancelled
        before more arrives; decoding runs in a thread so the event loop stays free.
        """
        request = subd_pb2.PollRequest(have_generation=have_generation, short=short)
        call = self.stub.Poll(request, timeout=timeout)
        try:
            first = await call.read()
            if first is grpc.aio.EOF:
                raise FleetError(f"{self.address}: poll ended without a status")
            if not first.tree_follows:
                return first.status, None
            if first.tree_bytes > max_tree_bytes:  # announced by subds that know it
                raise TreeTooLarge(f"tree too large: {self.address} sends "
                                   f"{first.tree_bytes} bytes, the limit is {max_tree_bytes}")
            parts: list[bytes] = []
            total = 0
            while (response := await call.read()) is not grpc.aio.EOF:
                total += len(response.tree_chunk.data)
                if total > max_tree_bytes:
                    raise TreeTooLarge(f"tree too large: {self.address} sent at least "
                                       f"{total} bytes, the limit is {max_tree_bytes}")
                parts.append(response.tree_chunk.data)
        finally:
            call.cancel()  # stops the transfer when we stopped reading; else a no-op
        tree = await asyncio.to_thread(lambda: decode_tree(b"".join(parts)))
        return first.status, tree

    async def fetch(self, servers: str | Sequence[str], hashes: list[bytes],
                    image_name: str = "", fence: FenceToken | None = None) -> None:
        """Start a fetch on the sub of objects of image `image_name` from image
        servers, tried in order."""
        await self.stub.Fetch(fetch_request(servers, hashes, image_name, fence), timeout=60)

    async def update(self, plan: UpdatePlan, timeout: float = UPDATE_TIMEOUT,
                     fence: FenceToken | None = None) -> None:
        """Apply an update of any size (raises grpc.aio.AioRpcError when refused or failed)."""
        data = await asyncio.to_thread(encode_update, plan, fence)  # 100k paths take a while
        try:
            await self.stub.UpdateStream(split_message(data), timeout=timeout)
        except grpc.RpcError as err:
            if not older_subd(err, self.address):
                raise
            await self.stub.Update(subd_pb2.UpdateRequest.FromString(data), timeout=timeout)

    async def cleanup_all_but(self, keep: list[bytes], fence: FenceToken | None = None) -> int:
        """Remove every cached object not in `keep`."""
        request = fenced(subd_pb2.CleanupRequest(all_but_keep=True, keep=keep), fence)
        reply: subd_pb2.CleanupResponse = await self.stub.Cleanup(request, timeout=60)
        return reply.removed
