"""Which image servers a host fetches from, in what order: the nearest first (longest
common REGION/DC/RACK prefix), equals spread by a rendezvous hash, the master last.
`rank_servers` is pure; `ImageServers` learns where each server stands (it says so in
ListImages, from `imageserver --location`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security, call_timeout
from fleetlib.wire import imageserver_pb2
from imageserver.client import ImageServerClient

log = logging.getLogger(__name__)

NO_IMAGE = "\n"  # a ListImages prefix no image name starts with (names have no newline)


@dataclass(frozen=True)
class ImageServerInfo:
    """One image server the dominator may send hosts to."""

    address: str
    location: str = ""
    is_master: bool = False


def components(location: str) -> list[str]:
    """A location's components ('' has none)."""
    return [part for part in location.split("/") if part]


def common_prefix(one: str, other: str) -> int:
    """How many leading components two locations share (`us/dc1/r4`, `us/dc1/r9`: 2)."""
    shared = 0
    for mine, theirs in zip(components(one), components(other), strict=False):
        if mine != theirs:
            break
        shared += 1
    return shared


def rendezvous(host: str, address: str) -> int:
    """A stable pseudo-random weight of (host, server): equally near servers each come
    first for about the same share of hosts, and a server's departure moves only its own."""
    digest = hashlib.blake2b(f"{host}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_servers(host: str, location: str, servers: Iterable[ImageServerInfo]) -> list[str]:
    """The addresses of `servers` in the order `host` (standing at `location`) should try
    them: non-masters by longest common location prefix, ties by rendezvous hash, then
    the master(s). Deterministic; duplicates are dropped."""
    unique = {server.address: server for server in servers}.values()
    ordered = sorted(unique, key=lambda server: (
        server.is_master, -common_prefix(location, server.location),
        -rendezvous(host, server.address)))
    return [server.address for server in ordered]


def server_location(address: str, security: Security) -> str:
    """Where the image server at `address` says it stands ('' : it does not say). Asked
    through ListImages with a prefix no image name has, so the reply is small."""
    with ImageServerClient(address, security) as client:
        reply = client.images.ListImages(imageserver_pb2.ListImagesRequest(prefix=NO_IMAGE),
                                         timeout=call_timeout())
    return str(reply.location)


class ImageServers:
    """The master and the extra image servers the herd sends hosts to, with the
    locations they report (asked again every REFRESH_SECONDS; one that does not
    answer keeps its last known location, '' at first, and still gets ranked)."""

    REFRESH_SECONDS = 60.0

    def __init__(self, master: str, others: Iterable[str], security: Security) -> None:
        self.master = master
        self.others = [address for address in dict.fromkeys(others) if address != master]
        self.security = security
        self.locations: dict[str, str] = {}
        self._asked = -self.REFRESH_SECONDS
        self._asked_once = False  # every server asked at least once (answered or not)
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._asked < self.REFRESH_SECONDS:
                return
            for address in [self.master, *self.others]:
                try:
                    self.locations[address] = await asyncio.to_thread(
                        server_location, address, self.security)
                except grpc.RpcError as err:
                    log.warning("image server %s: location unknown: %s", address,
                                describe_rpc_error(err))
            self._asked = time.monotonic()
            self._asked_once = True

    async def ranked(self, host: str, location: str) -> list[str]:
        """The servers in the order `host` should try them (the master alone when
        there are no others). Calls wait until every server was asked once (hosts
        converging together must not rank on a half-known map); later ones rank with
        what is known while a refresh runs in the background."""
        if not self.others:
            return [self.master]
        if not self._asked_once:
            await self._refresh()
        elif (time.monotonic() - self._asked >= self.REFRESH_SECONDS
              and (self._refreshing is None or self._refreshing.done())):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return rank_servers(host, location, [
            ImageServerInfo(address, self.locations.get(address, ""), address == self.master)
            for address in [self.master, *self.others]])
