"""The order in which a host tries the image servers (dominator/herd/ranking.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import grpc

from dominator.herd.fetchslots import ServerSlots
from dominator.herd.ranking import ImageServerInfo, ImageServers, common_prefix, rank_servers
from dominator.herd.replicas import replica_row, walk
from fleetlib.rpc.tls import Security
from fleetlib.wire import imageserver_pb2

MASTER = ImageServerInfo("master:6971", "us-east/dc1", is_master=True)


def test_common_prefix_is_component_wise() -> None:
    assert common_prefix("us-east/dc1/r4", "us-east/dc1/r9") == 2
    assert common_prefix("us-east/dc1", "us-east/dc10") == 1  # not a string prefix
    assert common_prefix("us-east/dc1/r4", "us-east/dc1/r4") == 3
    assert common_prefix("", "us-east/dc1") == 0


def test_nearest_first_and_master_last() -> None:
    servers = [MASTER,
               ImageServerInfo("eu:6971", "eu-west/dc1"),
               ImageServerInfo("region:6971", "us-east/dc2"),
               ImageServerInfo("rack:6971", "us-east/dc1/r4"),
               ImageServerInfo("dc:6971", "us-east/dc1")]
    assert rank_servers("web1", "us-east/dc1/r4", servers) == \
        ["rack:6971", "dc:6971", "region:6971", "eu:6971", "master:6971"]
    # The master is last even when it stands next to the host.
    assert rank_servers("web1", "us-east/dc1", servers)[-1] == "master:6971"
    # A host with no location still gets every server, the master last.
    unplaced = rank_servers("web1", "", servers)
    assert sorted(unplaced) == sorted(s.address for s in servers)
    assert unplaced[-1] == "master:6971"


def test_ranking_is_stable_and_ignores_input_order() -> None:
    servers = [ImageServerInfo(f"r{i}:6971", "eu/dc1") for i in range(3)] + [MASTER]
    first = rank_servers("host-7", "eu/dc1/r1", servers)
    assert rank_servers("host-7", "eu/dc1/r1", list(reversed(servers))) == first
    assert rank_servers("host-7", "eu/dc1/r1", servers + servers) == first


def test_equal_replicas_share_the_hosts() -> None:
    replicas = [ImageServerInfo(f"replica-{i}:6971", "eu/dc1") for i in range(3)]
    firsts = Counter(rank_servers(f"host-{n}", "eu/dc1/r2", [MASTER, *replicas])[0]
                     for n in range(300))
    assert set(firsts) == {replica.address for replica in replicas}
    # Each replica's share is within 20% of an even split (the hash is fixed: no flakes).
    assert all(80 <= count <= 120 for count in firsts.values()), firsts


# Replicas learned from the master: the tree walk (dominator/herd/replicas.py), pure.

def identity(name: str) -> imageserver_pb2.ServerIdentity:
    return imageserver_pb2.ServerIdentity(id=f"id-{name}", generation=1)


def info(name: str, location: str = "", state: str = "in sync", connected: bool = True,
         lag: int = 0) -> imageserver_pb2.ReplicaInfo:
    return imageserver_pb2.ReplicaInfo(identity=identity(name), address=f"{name}:6971",
                                       location=location, state=state, connected=connected,
                                       lag_events=lag, bytes_replicated=7, last_seen_unix=99)


def asker(tree: dict[str, tuple[str, list[imageserver_pb2.ReplicaInfo]]],
          asked: list[str] | None = None) -> Callable[[str], imageserver_pb2.ListReplicasResponse]:
    """ListReplicas of a made-up tree: address -> (its identity name, its replicas);
    an address not in it is unreachable."""
    def ask(address: str) -> imageserver_pb2.ListReplicasResponse:
        if asked is not None:
            asked.append(address)
        if address not in tree:
            raise Unreachable()
        name, replicas = tree[address]
        return imageserver_pb2.ListReplicasResponse(identity=identity(name), location="us/dc1",
                                                    replicas=replicas)
    return ask


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def test_walk_lists_replicas_of_replicas_breadth_first() -> None:
    tree = {"master:6971": ("master", [info("east", "us/dc1"), info("west", "eu/dc1")]),
            "east:6971": ("east", [info("east-2", "us/dc2", state="syncing", lag=3)]),
            "west:6971": ("west", []), "east-2:6971": ("east-2", [])}
    found = walk("master:6971", asker(tree))
    assert [(r.address, r.upstream, r.depth) for r in found.rows] == [
        ("master:6971", "", 0), ("east:6971", "master:6971", 1),
        ("west:6971", "master:6971", 1), ("east-2:6971", "east:6971", 2)]
    root, *_, deep = found.rows
    assert (root.state, root.location, root.healthy) == ("master", "us/dc1", True)
    assert (deep.state, deep.lag_events, deep.location, deep.healthy) == \
        ("syncing", 3, "us/dc2", True)
    assert deep.to_json()["last_seen_unix"] == 99
    assert found.unreachable == {}


def test_walk_ends_on_a_cycle_and_asks_each_server_once() -> None:
    # b lists a, a lists b (a cycle), and b also lists the master itself.
    master_info = imageserver_pb2.ReplicaInfo(identity=identity("master"),
                                              address="master:6971", connected=True,
                                              state="in sync")
    tree = {"master:6971": ("master", [info("a")]), "a:6971": ("a", [info("b")]),
            "b:6971": ("b", [info("a"), master_info])}
    asked: list[str] = []
    found = walk("master:6971", asker(tree, asked))
    assert sorted(asked) == ["a:6971", "b:6971", "master:6971"]
    assert [row.address for row in found.rows] == ["master:6971", "a:6971", "b:6971"]
    assert found.rows[0].is_root


def test_a_replica_listed_twice_keeps_its_connected_row() -> None:
    # The master still remembers r (disconnected); r now follows a, which reports it well.
    tree = {"master:6971": ("master", [info("r", connected=False), info("a")]),
            "a:6971": ("a", [info("r")]), "r:6971": ("r", [])}
    asked: list[str] = []
    found = walk("master:6971", asker(tree, asked))
    rows = {row.address: row for row in found.rows}
    assert (rows["r:6971"].upstream, rows["r:6971"].state) == ("a:6971", "in sync")
    assert asked.count("r:6971") == 1


def test_an_unreachable_replica_keeps_its_row_and_is_noted() -> None:
    tree = {"master:6971": ("master", [info("gone", state="in sync")])}
    found = walk("master:6971", asker(tree))
    assert [row.address for row in found.replicas] == ["gone:6971"]
    assert "connection refused" in found.unreachable["gone:6971"]


def test_a_replica_gone_reads_disconnected_whatever_it_last_said() -> None:
    row = replica_row(info("r", state="in sync", connected=False), "master:6971", 1)
    assert (row.state, row.healthy) == ("disconnected", False)
    for state in ("diverged", "alarm"):
        assert not replica_row(info("r", state=state), "m", 1).healthy


def test_unhealthy_replicas_rank_after_healthy_ones_but_before_the_master() -> None:
    near_bad = ImageServerInfo("near:6971", "eu/dc1/r1", healthy=False)
    far_good = ImageServerInfo("far:6971", "us/dc9")
    assert rank_servers("web1", "eu/dc1/r1", [MASTER, near_bad, far_good]) == \
        ["far:6971", "near:6971", "master:6971"]


def test_learned_replicas_join_the_ranking_and_disconnected_ones_do_not() -> None:
    servers = ImageServers("master:6971", ["byhand:6971"],
                           Security.from_options(None, insecure=True))
    tree = {"master:6971": ("master", [info("east", "us/dc1"), info("west", "eu/dc1"),
                                       info("gone", "eu/dc1", connected=False),
                                       info("odd", "eu/dc1", state="diverged"),
                                       info("byhand", "eu/dc1", state="alarm")]),
            "east:6971": ("east", []), "west:6971": ("west", []), "odd:6971": ("odd", []),
            "byhand:6971": ("byhand", [])}
    servers.tree = walk("master:6971", asker(tree))
    servers.locations["master:6971"] = "us/dc1"
    ranked = rank_servers("web1", "eu/dc1/r1", servers.candidates())
    assert ranked[0] == "west:6971"
    assert ranked[-1] == "master:6971"
    assert "gone:6971" not in ranked
    # Diverged or in alarm (even one given by hand): after every healthy replica.
    assert set(ranked[2:4]) == {"odd:6971", "byhand:6971"}
    # Without a tree (a master from before replication), only the hand-given servers.
    servers.tree = None
    assert rank_servers("web1", "eu/dc1", servers.candidates()) == \
        ["byhand:6971", "master:6971"]


def test_server_slots_cap_fetches_in_flight_per_server() -> None:
    async def fetches(slots: ServerSlots, servers: list[str]) -> list[int]:
        running: list[int] = []  # in flight on "a" as each of its fetches starts

        async def fetch(server: str) -> None:
            async with slots.hold(server):
                if server == "a":
                    running.append(slots.in_flight[server])
                await asyncio.sleep(0.01)
        await asyncio.gather(*(fetch(server) for server in servers))
        return running

    capped = ServerSlots(2)
    running = asyncio.run(fetches(capped, ["a"] * 7 + ["b"] * 3))
    assert max(running) == 2 and len(running) == 7
    assert dict(capped.peak) == {"a": 2, "b": 2}
    assert dict(capped.in_flight) == {"a": 0, "b": 0}
    assert dict(capped.waiting) == {"a": 0, "b": 0}
    uncapped = ServerSlots(0)
    asyncio.run(fetches(uncapped, ["a"] * 5))
    assert uncapped.peak["a"] == 5


def test_server_slots_cap_the_bytes_asked_of_a_server_at_once() -> None:
    async def fetches(slots: ServerSlots, sizes: list[int]) -> list[tuple[int, int]]:
        running: list[tuple[int, int]] = []  # (fetches, bytes) in flight as each starts

        async def fetch(size: int) -> None:
            async with slots.hold("a", size):
                running.append((slots.in_flight["a"], slots.bytes_in_flight["a"]))
                await asyncio.sleep(0.01)
        await asyncio.gather(*(fetch(size) for size in sizes))
        return running

    async def both(slots: ServerSlots) -> tuple[list[tuple[int, int]], ...]:
        return (await fetches(slots, [100] * 30),  # small changes: ten at once
                await fetches(slots, [600, 600, 5000, 100]))  # large: fewer, or alone

    slots = ServerSlots(100, byte_budget=1000)
    small, running = asyncio.run(both(slots))
    assert max(count for count, _ in small) == 10
    assert max(held for _, held in small) == 1000 and len(small) == 30
    assert all(held <= 1000 or count == 1 for count, held in running)
    assert (1, 5000) in running
    assert dict(slots.bytes_in_flight) == {"a": 0} and slots.waited["a"] > 0

