"""Replication, the upstream's side: an image server streams its journal to the servers
that follow it (`feed`, behind ImageService.Replicate) and keeps what they report
(`ReplicaRegistry`, behind ListReplicas). The follower is imageserver/follower.py.

The stream: the follower's hello (its identity, how far it applied whose journal, its
ancestry), the upstream's hello, then either the events after the follower's position
(when the upstream still holds them and the follower followed this very server) or a
snapshot of every live image and tombstone, then every event as it is appended. The
follower reports its progress on the same stream. Cycles are refused on both sides by
identity (`cycle_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from fleetlib.errors import FleetError, PreconditionError
from fleetlib.wire import imageserver_pb2
from imageserver.journal import LiveEntry
from imageserver.store import ImageStore
from imageserver.upstream import Upstream

log = logging.getLogger(__name__)

FORGET_AFTER = 3600.0  # a follower gone this long leaves ListReplicas

SYNCING, IN_SYNC, DIVERGED, ALARM = "syncing", "in sync", "diverged", "alarm"
DISCONNECTED = "disconnected"

Response = imageserver_pb2.ReplicateResponse
Request = imageserver_pb2.ReplicateRequest


def ancestry(store: ImageStore, upstream: Upstream | None) -> list[str]:
    """This server's upstream chain (ids, nearest first), as its last hello said; [] on a
    master (also one that was a replica before)."""
    position = store.journal.position() if upstream is not None else None
    return position.ancestry if position is not None else []


def cycle_error(follower: str, me: str, chain: list[str]) -> PreconditionError | None:
    """Why a server FOLLOWER following server ME (whose upstream chain is CHAIN) would
    close a cycle, or None."""
    if follower == me:
        return PreconditionError(f"replication cycle: server {me[:12]} cannot follow itself")
    if follower in chain:
        return PreconditionError(f"replication cycle: server {follower[:12]} is upstream of "
                                 f"{me[:12]}, so it cannot follow it")
    return None


@dataclass
class FollowerRecord:
    """What an upstream knows of one follower."""

    info: imageserver_pb2.ReplicaInfo
    connections: int = 0
    gone_unix: float = 0.0


class ReplicaRegistry:
    """The servers following this one (ListReplicas), disconnected ones for a while."""

    def __init__(self) -> None:
        self.followers: dict[str, FollowerRecord] = {}
        self.snapshots_sent = 0  # snapshots sent since start (a resume sends none)

    def connected(self, hello: imageserver_pb2.ReplicaHello, address: str) -> FollowerRecord:
        """A follower said hello."""
        record = self.followers.get(hello.identity.id)
        if record is None:
            record = self.followers[hello.identity.id] = FollowerRecord(
                imageserver_pb2.ReplicaInfo(applied_sequence=hello.from_sequence,
                                            state=SYNCING))
        record.info.identity.CopyFrom(hello.identity)
        record.info.address = address
        record.info.location = hello.location
        record.info.connected = True
        record.info.last_seen_unix = int(time.time())
        record.connections += 1
        return record

    @staticmethod
    def progress(record: FollowerRecord, progress: imageserver_pb2.ReplicaProgress) -> None:
        """A follower reported how far it is."""
        info = record.info
        info.applied_sequence = progress.applied_sequence
        info.bytes_replicated = progress.bytes_replicated
        info.bytes_pending = progress.bytes_pending
        info.state = progress.state
        info.last_seen_unix = int(time.time())

    @staticmethod
    def disconnected(record: FollowerRecord) -> None:
        """A follower's stream ended."""
        record.connections -= 1
        if record.connections <= 0:
            record.info.connected = False
            record.gone_unix = time.time()

    def connected_count(self) -> int:
        """Followers with a stream open now."""
        return sum(1 for r in self.followers.values() if r.info.connected)

    def listing(self, sequence: int) -> list[imageserver_pb2.ReplicaInfo]:
        """Every follower known, by address, with its lag against SEQUENCE."""
        now = time.time()
        for ident in [i for i, r in self.followers.items()
                      if not r.info.connected and now - r.gone_unix > FORGET_AFTER]:
            del self.followers[ident]
        infos = []
        for record in self.followers.values():
            info = imageserver_pb2.ReplicaInfo()
            info.CopyFrom(record.info)
            info.lag_events = max(sequence - info.applied_sequence, 0)
            if not info.connected:
                info.state = DISCONNECTED
            infos.append(info)
        return sorted(infos, key=lambda i: i.address)


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """The caller's IP from gRPC's peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0]
    return host if kind == "ipv6" else host or "unknown"


async def feed(store: ImageStore, registry: ReplicaRegistry, upstream: Upstream | None,
               requests: AsyncIterator[Request], context: grpc.aio.ServicerContext
               ) -> AsyncIterator[Response]:
    """ImageService.Replicate: stream this server's journal to one follower."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        return
    if first.WhichOneof("message") != "hello" or not first.hello.identity.id:
        raise FleetError("Replicate: the first message must be a hello with the follower's "
                         "identity")
    hello = first.hello
    journal = store.journal
    me = journal.identity
    chain = ancestry(store, upstream)
    refused = cycle_error(hello.identity.id, me.id, chain)
    if refused is not None:
        raise refused
    address = hello.address or f"{_peer_host(context)}:{hello.port}"
    record = registry.connected(hello, address)
    changed = journal.listen()
    reader = asyncio.create_task(_read_progress(requests, record))
    try:
        resume = (hello.following_id == me.id and hello.following_generation <= me.generation
                  and 0 < hello.from_sequence <= journal.sequence
                  and journal.oldest_sequence() <= hello.from_sequence + 1)
        yield Response(hello=imageserver_pb2.UpstreamHello(
            identity=me, ancestry=chain, sequence=journal.sequence, snapshot_follows=not resume,
            master_address=upstream.master() if upstream is not None else ""))
        if resume:
            sent = hello.from_sequence
            log.info("replica %s (%s) resumes after sequence %d", address,
                     hello.identity.id[:12], sent)
        else:
            batches = journal.snapshot([LiveEntry(i.name, i.digest, i.expires_unix)
                                        for i in store.list()])
            sent = batches[-1].sequence
            registry.snapshots_sent += 1
            log.info("sending replica %s (%s) a snapshot: %d entries as of sequence %d",
                     address, hello.identity.id[:12], sum(len(b.entries) for b in batches),
                     sent)
            for batch in batches:
                yield Response(snapshot=batch)
        while True:
            changed.clear()
            events = journal.events_after(sent)
            for event in events:
                yield Response(event=event)
                sent = event.sequence
            if not events:
                await changed.wait()
    finally:
        reader.cancel()
        journal.unlisten(changed)
        registry.disconnected(record)
        log.info("replica %s (%s) disconnected", address, hello.identity.id[:12])


async def _read_progress(requests: AsyncIterator[Request], record: FollowerRecord) -> None:
    with contextlib.suppress(grpc.RpcError, FleetError):
        async for request in requests:
            if request.WhichOneof("message") == "progress":
                ReplicaRegistry.progress(record, request.progress)


def list_replicas(store: ImageStore, registry: ReplicaRegistry, location: str,
                  upstream: Upstream | None) -> imageserver_pb2.ListReplicasResponse:
    """ImageService.ListReplicas: this server and the servers following it."""
    sequence = store.journal.sequence
    return imageserver_pb2.ListReplicasResponse(
        identity=store.journal.identity, location=location, sequence=sequence,
        upstream=upstream.address if upstream is not None else "",
        replicas=registry.listing(sequence))
