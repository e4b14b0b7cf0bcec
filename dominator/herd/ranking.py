"""Which image servers a host fetches from, in what order: healthy replicas first, the
nearest first (longest common REGION/DC/RACK prefix), equals spread by a rendezvous hash,
then replicas that are diverged or in alarm, the master last. `rank_servers` is pure;
`ImageServers` learns the replicas from the master (ImageServer.ListReplicas, walking the
tree: dominator/herd/replicas.py) and where each server stands (its ReplicaInfo, or
ListImages' location for a server given by hand)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from dominator.herd.replicas import (
    DISCONNECTED,
    ReplicaTree,
    not_replication_aware,
    walk_servers,
)
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
    healthy: bool = True  # False: a replica diverged or in alarm (ranked after the healthy)


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
    them: healthy non-masters by longest common location prefix, ties by rendezvous hash,
    then the unhealthy ones the same way, then the master(s). Deterministic; of duplicate
    addresses the last given counts."""
    unique = {server.address: server for server in servers}.values()
    ordered = sorted(unique, key=lambda server: (
        server.is_master, not server.healthy, -common_prefix(location, server.location),
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
    """The image servers the herd sends hosts to: the master, the servers given by hand
    (`--imageserver` more than once) and the replicas learned from the master, asked
    again every REFRESH_SECONDS. A replica its upstream reports disconnected is left out
    (nothing says it still serves, and it cannot pull what it lacks); one diverged or in
    alarm is ranked after the healthy ones. A master that is not replication-aware (or
    does not let the dominator call ListReplicas) has no replicas: the servers given by
    hand are ranked as before. A server that does not answer keeps its last known
    location ('' at first), and a failed walk keeps the last tree."""

    REFRESH_SECONDS = 15.0

    def __init__(self, master: str, others: Iterable[str], security: Security) -> None:
        self.master = master
        self.others = [address for address in dict.fromkeys(others) if address != master]
        self.security = security
        self.locations: dict[str, str] = {}  # the master's and those of servers given by hand
        self.tree: ReplicaTree | None = None  # the last walk; None: no replicas known
        self.replication_error = ""  # why the master's replicas are unknown ("" : known)
        self._asked = -self.REFRESH_SECONDS
        self._asked_once = False  # every server asked at least once (answered or not)
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None

    def _walk(self) -> None:
        """Learn the replica tree from the master (blocking: run in a thread)."""
        try:
            tree = walk_servers(self.master, self.security)
        except grpc.RpcError as err:
            denied = err.code() == grpc.StatusCode.PERMISSION_DENIED
            if not_replication_aware(err) or denied:
                error = describe_rpc_error(err)
                if error != self.replication_error:
                    log.log(logging.WARNING if denied else logging.INFO,
                            "image server %s: no replicas learned (%s)%s", self.master, error,
                            "; a dominator certificate made before replication lacks "
                            "ImageServer.ListReplicas" if denied else "")
                self.tree, self.replication_error = None, error
            else:
                self.replication_error = describe_rpc_error(err)
                log.warning("image server %s: cannot list its replicas (keeping the last "
                            "known): %s", self.master, self.replication_error)
            return
        before = self.tree
        if before is None or [(r.address, r.state) for r in tree.rows] != [
                (r.address, r.state) for r in before.rows]:
            log.info("image server %s: replicas %s", self.master,
                     ", ".join(f"{row.address} ({row.state})" for row in tree.replicas)
                     or "none")
        for address, error in tree.unreachable.items():
            if before is None or before.unreachable.get(address) != error:
                log.warning("replica %s: cannot list its replicas: %s", address, error)
        self.tree, self.replication_error = tree, ""
        self.locations[self.master] = tree.rows[0].location

    def _ask(self) -> None:
        """Walk the replicas, and ask the other servers where they stand (blocking)."""
        self._walk()
        unplaced = self.tree is None and self.others  # the master's location still counts
        for address in ([self.master] if unplaced else []) + self.others:
            try:
                self.locations[address] = server_location(address, self.security)
            except grpc.RpcError as err:
                log.warning("image server %s: location unknown: %s", address,
                            describe_rpc_error(err))

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._asked < self.REFRESH_SECONDS:
                return
            await asyncio.to_thread(self._ask)
            self._asked = time.monotonic()
            self._asked_once = True

    async def current(self) -> ReplicaTree | None:
        """The replica tree as last learned (None: no replicas known). The first call
        waits until every server was asked once; later ones return what is known and
        start a refresh in the background when it is due."""
        if not self._asked_once:
            await self._refresh()
        else:
            self._refresh_when_due()
        return self.tree

    def known(self) -> ReplicaTree | None:
        """The replica tree as last learned, without waiting (None: none known, or not
        asked yet); starts a refresh in the background when one is due."""
        self._refresh_when_due()
        return self.tree

    def _refresh_when_due(self) -> None:
        if (time.monotonic() - self._asked >= self.REFRESH_SECONDS
                and (self._refreshing is None or self._refreshing.done())):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    def candidates(self) -> list[ImageServerInfo]:
        """Every server a host may be sent to, as last learned (the master last)."""
        learned = {row.address: row for row in self.tree.replicas} if self.tree else {}
        servers = [ImageServerInfo(address, self.locations.get(address, ""),
                                   healthy=learned[address].healthy if address in learned
                                   else True)
                   for address in self.others]
        servers += [ImageServerInfo(row.address, row.location, healthy=row.healthy)
                    for row in learned.values()
                    if row.address not in self.others and row.state != DISCONNECTED]
        return [*servers, ImageServerInfo(self.master, self.locations.get(self.master, ""),
                                          is_master=True)]

    async def ranked(self, host: str, location: str) -> list[str]:
        """The servers in the order `host` should try them (the master alone when
        there are no others). Calls wait until every server was asked once (hosts
        converging together must not rank on a half-known map); later ones rank with
        what is known while a refresh runs in the background."""
        await self.current()
        return rank_servers(host, location, self.candidates())
