"""The tree of replicated image servers as the dominator sees it: the master, the
replicas it reports (ImageServer.ListReplicas), the replicas each of those reports, and
so on. `walk` is pure (it asks through a callable); `walk_servers` asks over the network.

A server is asked once, however often it is listed: the walk is guarded by identity id
(a replication cycle, or a server listed by two upstreams, cannot loop it)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from fleetlib.errors import FleetError
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security, call_timeout
from fleetlib.wire import imageserver_pb2
from imageserver.client import ImageServerClient

MASTER_STATE = "master"
DISCONNECTED = "disconnected"
HEALTHY_STATES = frozenset({"syncing", "in sync"})  # the states a replica reports when well
STATES = ("syncing", "in sync", "diverged", "alarm", DISCONNECTED)  # a replica's states
MAX_SERVERS = 1000  # the most servers one walk lists (a runaway tree stops here)
ASK_TIMEOUT = 10.0  # seconds one ListReplicas may take (a dead replica must not stall a walk)

Ask = Callable[[str], imageserver_pb2.ListReplicasResponse]


@dataclass(frozen=True)
class ReplicaRow:
    """One image server of the tree: the root (master) or a replica, as its upstream
    reports it (`upstream` is the address of the server that listed it)."""

    address: str
    location: str = ""
    upstream: str = ""      # "" for the root of the walk
    state: str = MASTER_STATE
    connected: bool = True
    lag_events: int = 0
    bytes_pending: int = 0
    bytes_replicated: int = 0
    last_seen_unix: int = 0
    identity: str = ""
    depth: int = 0          # 0 the root, 1 its replicas, 2 theirs...

    @property
    def is_root(self) -> bool:
        """The server the walk started at (the master)."""
        return self.depth == 0

    @property
    def healthy(self) -> bool:
        """Whether hosts may be sent to it ahead of others: the root always; a replica
        while its upstream is connected to it and it reports syncing or in sync (not
        diverged, not in alarm, not disconnected)."""
        return self.is_root or (self.connected and self.state in HEALTHY_STATES)

    def to_json(self) -> dict[str, Any]:
        """The row for --json and the dashboard (snake_case keys, times as `_unix`)."""
        return {**asdict(self), "healthy": self.healthy}


@dataclass
class ReplicaTree:
    """What one walk found: its rows (the root first, then breadth-first) and the
    servers listed that could not be asked for their own replicas (address -> why)."""

    rows: list[ReplicaRow] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def replicas(self) -> list[ReplicaRow]:
        """Every row but the root."""
        return [row for row in self.rows if not row.is_root]


def replica_row(info: imageserver_pb2.ReplicaInfo, upstream: str, depth: int) -> ReplicaRow:
    """A ReplicaInfo as a row; a replica its upstream holds no connection from reads
    'disconnected' whatever it last reported."""
    state = info.state if info.connected and info.state else DISCONNECTED
    return ReplicaRow(address=info.address, location=info.location, upstream=upstream,
                      state=state, connected=info.connected, lag_events=info.lag_events,
                      bytes_pending=info.bytes_pending, bytes_replicated=info.bytes_replicated,
                      last_seen_unix=info.last_seen_unix, identity=info.identity.id,
                      depth=depth)


def walk(root: str, ask: Ask) -> ReplicaTree:
    """The servers replicating from `root`, directly or not, breadth-first. `ask(address)`
    is that server's ListReplicas: the root's errors propagate (grpc.RpcError), a
    replica's are noted in `unreachable` (its row stays, as its upstream reports it).
    A server listed twice (by two upstreams, or a stale entry) keeps one row, a connected
    one over a disconnected one; servers whose identity was asked already are not asked
    again, so a cycle ends the walk instead of looping it."""
    reply = ask(root)
    rows: dict[str, ReplicaRow] = {}  # by identity id (address when it has none)
    root_key = reply.identity.id or root
    rows[root_key] = ReplicaRow(address=root, location=reply.location, upstream=reply.upstream,
                                state=MASTER_STATE if not reply.upstream else "",
                                identity=reply.identity.id)
    asked = {root_key}
    tree = ReplicaTree()
    pending: deque[tuple[str, imageserver_pb2.ListReplicasResponse, int]] = deque(
        [(root, reply, 1)])
    while pending and len(rows) < MAX_SERVERS:
        upstream, reply, depth = pending.popleft()
        for info in reply.replicas:
            row = replica_row(info, upstream, depth)
            key = row.identity or row.address
            known = rows.get(key)
            if known is not None and (known.is_root or known.connected or not row.connected):
                continue
            rows[key] = row
            if key in asked or not row.address or len(rows) >= MAX_SERVERS:
                continue
            asked.add(key)
            try:
                child = ask(row.address)
            except grpc.RpcError as err:
                tree.unreachable[row.address] = describe_rpc_error(err)
                continue
            if child.identity.id and child.identity.id != key and child.identity.id in asked:
                continue  # that address answers as a server already walked
            if child.identity.id:
                asked.add(child.identity.id)
            pending.append((row.address, child, depth + 1))
    tree.rows = list(rows.values())
    return tree


def list_replicas(address: str, security: Security,
                  timeout: float = ASK_TIMEOUT) -> imageserver_pb2.ListReplicasResponse:
    """The ListReplicas reply of the image server at `address`."""
    with ImageServerClient(address, security) as client:
        reply: imageserver_pb2.ListReplicasResponse = client.images.ListReplicas(
            imageserver_pb2.ListReplicasRequest(), timeout=min(timeout, call_timeout()))
    return reply


def walk_servers(root: str, security: Security) -> ReplicaTree:
    """`walk` over the network, from the image server at `root`."""
    return walk(root, lambda address: list_replicas(address, security))


def not_replication_aware(err: grpc.RpcError) -> bool:
    """Whether a ListReplicas error means the server has no such method (an image
    server from before replication)."""
    return bool(err.code() == grpc.StatusCode.UNIMPLEMENTED)


def unaware_error(root: str) -> FleetError:
    """The one-line error for a root that does not answer ListReplicas."""
    return FleetError(f"image server {root} is not replication-aware "
                      "(it does not answer ListReplicas: an older version?)")
