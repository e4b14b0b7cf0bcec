"""Replicated image servers (real daemons, real mutual TLS, loopback): a master and
replicas (and a replica of a replica) following its journal; only missing objects
move; a SIGKILLed replica resumes without fetching anything twice; hosts asking a
replica for objects it is replicating share its fetches (the master serves one copy); a
name bound to other content is quarantined; a replaced master diverges its replicas
instead of wiping them, until `--accept-upstream`; cycles and bad upstreams are refused
with one line."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.image import Image
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.source import DirectorySource
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security, open_channel
from fleetlib.testing.daemons import (
    PROJECT,
    Daemon,
    assert_one_line_error,
    free_port,
    imageserver_daemon,
)
from fleetlib.wire import audit_pb2, imageserver_pb2, objectserver_pb2, objectserver_pb2_grpc
from imageserver.client import ImageServerClient

MiB = 1 << 20
Start = Callable[..., Daemon]


@pytest.fixture
def start(tmp_path: Path, ca: Path) -> Iterator[Start]:
    """`start(name, *flags, upstream=None)`: a real image server with a metrics port
    (its state in tmp_path/NAME), replicating from UPSTREAM when given."""
    started: list[Daemon] = []

    def start_one(name: str, *flags: str, upstream: Daemon | None = None) -> Daemon:
        metrics = free_port()
        extra = ["--metrics-port", str(metrics), *flags]
        if upstream is not None:
            extra += ["--replicate-from", upstream.address]
        daemon = imageserver_daemon(tmp_path / name, ca, tmp_path / f"{name}.log", *extra)
        started.append(daemon)
        return daemon.start()

    yield start_one
    for daemon in reversed(started):  # followers first: none waits on a gone upstream
        daemon.stop()


def metric(server: Daemon, name: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    port = server.args[server.args.index("--metrics-port") + 1]
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    reply.raise_for_status()
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def push(server: Daemon, security: Security, name: str, folder: Path) -> Image:
    """Add the image of FOLDER to SERVER as `image add` does (missing objects, then the
    image)."""
    source = DirectorySource(folder)
    image = Image(name, source.tree, EMPTY)
    with ImageServerClient(server.address, security) as client:
        missing = client.missing(source.tree.object_sizes())
        client.upload(source, missing)
        client.add_image(image)
    return image


def names(server: Daemon, security: Security) -> set[str]:
    with ImageServerClient(server.address, security) as client:
        return {summary.name for summary in client.list_images()}


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "",
               interval: float = 0.05) -> float:
    """Poll CHECK until true; the seconds it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(interval)
    return time.monotonic() - began


def holds(server: Daemon, security: Security, *wanted: str) -> Callable[[], bool]:
    return lambda: set(wanted) <= names(server, security)


def lacks(server: Daemon, security: Security, name: str) -> Callable[[], bool]:
    return lambda: name not in names(server, security)


def replicas(server: Daemon, security: Security) -> imageserver_pb2.ListReplicasResponse:
    with ImageServerClient(server.address, security) as client:
        reply: imageserver_pb2.ListReplicasResponse = client.images.ListReplicas(
            imageserver_pb2.ListReplicasRequest(), timeout=30)
        return reply


def in_sync(upstream: Daemon, security: Security, count: int) -> Callable[[], bool]:
    """COUNT followers of UPSTREAM connected, all 'in sync' at its latest sequence."""
    def check() -> bool:
        listing = replicas(upstream, security)
        ready = [r for r in listing.replicas if r.connected and r.state == "in sync"
                 and r.applied_sequence == listing.sequence]
        return len(ready) == count
    return check


def random_files(count: int, size: int, prefix: str = "f") -> dict[str, bytes]:
    return {f"{prefix}{index}": os.urandom(size) for index in range(count)}


def test_master_and_two_replicas_and_a_replica_of_a_replica(
        tmp_path: Path, admin: Security, start: Start) -> None:
    master = start("master", "--location", "eu/a")
    first = start("replica-1", "--location", "eu/b", upstream=master)
    second = start("replica-2", "--location", "us/a", upstream=master)
    third = start("replica-3", upstream=first)  # a replica of a replica
    shared = random_files(18, 256 << 10)
    push(master, admin, "base", write_files(tmp_path / "base", shared))
    for server in (first, second, third):
        wait_until(holds(server, admin, "base"), what=f"base on {server.address}")
    served = metric(master, "imageserver_served_bytes_total")
    moved = metric(first, "imageserver_replicated_bytes_total")
    assert served == 2 * 18 * (256 << 10) and moved == 18 * (256 << 10)
    # A new image appears on every replica within a second of its add (plus its
    # objects); replicas holding 90% of its content move only the rest.
    fresh = random_files(2, 256 << 10, prefix="new")
    push(master, admin, "new", write_files(tmp_path / "new", {**shared, **fresh}))
    began = time.monotonic()
    wait_until(holds(first, admin, "new"), what="new on replica 1")
    wait_until(holds(second, admin, "new"), what="new on replica 2")
    assert time.monotonic() - began < 2  # 1 s, and a loaded test machine
    wait_until(holds(third, admin, "new"), what="new on replica 3")
    assert metric(master, "imageserver_served_bytes_total") - served == 2 * 2 * (256 << 10)
    assert metric(first, "imageserver_replicated_bytes_total") - moved == 2 * (256 << 10)
    assert metric(third, "imageserver_replicated_bytes_total") == 20 * (256 << 10)
    with ImageServerClient(first.address, admin) as client, \
            ImageServerClient(master.address, admin) as upstream:
        assert client.get_image("new").tree.object_sizes() == \
            upstream.get_image("new").tree.object_sizes()
    # The master lists its two direct followers, with location and state; replica 1 its own.
    wait_until(in_sync(master, admin, 2), what="two replicas in sync")
    listing = replicas(master, admin)
    assert {r.location for r in listing.replicas} == {"eu/b", "us/a"}
    assert {r.address for r in listing.replicas} == {first.address, second.address}
    assert all(r.lag_events == 0 and r.bytes_pending == 0 for r in listing.replicas)
    assert listing.upstream == "" and listing.location == "eu/a"
    wait_until(in_sync(first, admin, 1), what="replica 3 in sync with replica 1")
    assert replicas(first, admin).upstream == master.address
    assert metric(master, "imageserver_followers_connected") == 2
    # An expiry change follows the same way.
    with ImageServerClient(master.address, admin) as client:
        client.set_expiry("new", 4_000_000_000)
    def expiry(server: Daemon) -> int:
        with ImageServerClient(server.address, admin) as client:
            return next(i.expires_unix for i in client.list_images() if i.name == "new")
    wait_until(lambda: expiry(third) == 4_000_000_000, what="the expiry on replica 3")
    # A delete on the master removes the image everywhere, replica of a replica too.
    with ImageServerClient(master.address, admin) as client:
        client.delete_image("base")
    for server in (first, second, third):
        wait_until(lacks(server, admin, "base"), what="base deleted")
    assert names(third, admin) == {"new"}
    assert metric(first, "imageserver_replication_lag_events") == 0


def objects_bytes(server: Daemon) -> int:
    """Bytes of the objects at their final paths in SERVER's store."""
    assert server.state_dir is not None
    return sum(path.stat().st_size for path in (server.state_dir / "objects").rglob("*")
               if path.is_file() and ".tmp" not in path.parts)


def test_a_replica_killed_mid_replication_converges_without_fetching_twice(
        tmp_path: Path, admin: Security, start: Start) -> None:
    master = start("master")
    replica = start("replica", upstream=master)
    size, count = 4 * MiB, 10
    folder = write_files(tmp_path / "big", random_files(count, size))
    push(master, admin, "big", folder)
    wait_until(lambda: objects_bytes(replica) >= size, what="replication under way",
               interval=0.005)
    replica.kill()
    assert replica.state_dir is not None
    assert not (replica.state_dir / "images" / "big" / ".image").exists(), \
        "replication finished before the kill: make the image bigger"
    kept = objects_bytes(replica)
    wait_until(lambda: not any(r.connected for r in replicas(master, admin).replicas),
               what="the master saw the replica go")
    # What the master counts served by now includes what was still on the wire at the
    # kill (gRPC's flow-control window): the replica never read it.
    served = metric(master, "imageserver_served_bytes_total")
    replica.start()  # a persisted position: it serves at once and resumes
    wait_until(holds(replica, admin, "big"), timeout=60, what="big on the replica")
    # Every object the replica held whole at the kill stays: only the rest moves again.
    assert metric(master, "imageserver_served_bytes_total") - served == count * size - kept
    assert metric(replica, "imageserver_replicated_bytes_total") == count * size - kept
    assert objects_bytes(replica) == count * size


def test_a_name_bound_to_other_content_is_quarantined_then_upstreams_served(
        tmp_path: Path, admin: Security, start: Start, ca: Path) -> None:
    master = start("master")
    push(master, admin, "app", write_files(tmp_path / "theirs", {"x": b"master's content"}))
    push(master, admin, "same", write_files(tmp_path / "same", {"y": b"the same content"}))
    # Before it became a replica, this server held "app" with other content.
    loner = start("replica")
    push(loner, admin, "app", write_files(tmp_path / "ours", {"x": b"a local variant"}))
    push(loner, admin, "same", tmp_path / "same")
    loner.stop()
    replica = start("replica", upstream=master)
    with ImageServerClient(master.address, admin) as client:
        expected = client.get_image("app").tree.object_sizes()
    def serves_masters() -> bool:
        with ImageServerClient(replica.address, admin) as client:
            return "app" in names(replica, admin) and \
                client.get_image("app").tree.object_sizes() == expected
    wait_until(serves_masters, what="the master's app on the replica")
    assert metric(replica, "imageserver_quarantined_images") == 1
    assert replica.state_dir is not None
    assert len(list((replica.state_dir / "quarantine" / "app").glob(".*"))) == 1
    assert "QUARANTINED image app" in replica.log()
    wait_until(lambda: [r.state for r in replicas(master, admin).replicas] == ["alarm"],
               what="the replica's alarm on the master")


def test_a_replaced_master_diverges_its_replica_which_deletes_nothing(
        tmp_path: Path, admin: Security, start: Start) -> None:
    master = start("master")
    replica = start("replica", upstream=master)
    push(master, admin, "kept", write_files(tmp_path / "kept", {"k": b"kept"}))
    wait_until(holds(replica, admin, "kept"), what="kept on the replica")
    old_id = replicas(master, admin).identity.id
    master.stop()
    assert master.state_dir is not None
    for path in sorted(master.state_dir.rglob("*"), reverse=True):  # wiped: a new identity
        path.rmdir() if path.is_dir() else path.unlink()
    master.start()
    wait_until(lambda: metric(replica, "imageserver_replication_diverged") == 1, timeout=60,
               what="the replica diverged")
    assert "DIVERGED from upstream" in replica.log()
    push(master, admin, "later", write_files(tmp_path / "later", {"l": b"later"}))
    wait_until(holds(replica, admin, "kept", "later"), what="adds still apply")
    with ImageServerClient(master.address, admin) as client:
        client.delete_image("later")
    wait_until(lambda: replicas(master, admin).replicas[0].applied_sequence == 2,
               what="the delete event applied")
    assert names(replica, admin) == {"kept", "later"}  # no delete applied
    assert [r.state for r in replicas(master, admin).replicas] == ["diverged"]
    # A restart alone changes nothing: still diverged, still no deletes.
    replica.stop()
    replica.start()
    push(master, admin, "third", write_files(tmp_path / "third", {"t": b"third"}))
    wait_until(holds(replica, admin, "third"), what="third on the restarted replica")
    with ImageServerClient(master.address, admin) as client:
        client.delete_image("third")
    wait_until(lambda: replicas(master, admin).replicas[0].applied_sequence == 4,
               what="the second delete event applied")
    assert names(replica, admin) == {"kept", "later", "third"}
    assert metric(replica, "imageserver_replication_diverged") == 1
    assert [r.state for r in replicas(master, admin).replicas] == ["diverged"]
    # The operator accepts the new master: the replica follows it as it is now, its
    # snapshot's tombstones of the same content delete, what it never had stays.
    replica.stop()
    replica.args.append("--accept-upstream")
    replica.start()
    wait_until(in_sync(master, admin, 1), what="the replica in sync with the new master")
    assert metric(replica, "imageserver_replication_diverged") == 0
    assert names(replica, admin) == {"kept"}
    new_id = replicas(master, admin).identity.id
    accepted = f"WARNING imageserver.follower: --accept-upstream: accepted upstream " \
        f"{master.address} as it is now: server {old_id[:12]} generation 1 -> server " \
        f"{new_id[:12]} generation 1"
    assert replica.log().count(accepted) == 1
    with ImageServerClient(replica.address, admin) as client:
        audit = client.images.ListAudit(audit_pb2.ListAuditRequest(), timeout=30).entries
    changes = [(e.who, e.action, json.loads(e.details_json)) for e in audit
               if e.action.startswith("replication.")]
    assert [(who, action, details["old_id"], details["new_id"], details["was_diverged"])
            for who, action, details in changes] == [
        ("imageserver (replication)", "replication.diverged", old_id, new_id, False),
        ("imageserver --accept-upstream", "replication.accept-upstream", old_id, new_id, True)]
    # From now on deletes apply, also after a restart without the flag.
    replica.stop()
    replica.args.remove("--accept-upstream")
    replica.start()
    push(master, admin, "after", write_files(tmp_path / "after", {"a": b"after"}))
    wait_until(holds(replica, admin, "after"), what="after on the replica")
    with ImageServerClient(master.address, admin) as client:
        client.delete_image("after")
    wait_until(lacks(replica, admin, "after"), what="the delete applied on the replica")
    assert names(replica, admin) == {"kept"}
    assert metric(replica, "imageserver_replication_diverged") == 0
    assert replica.log().count(accepted) == 1


def test_callers_asking_a_replicating_replica_share_its_fetches(
        tmp_path: Path, admin: Security, start: Start) -> None:
    """Hosts asking a replica for the objects of an image it is replicating: each object
    leaves the master once, fetched by replication or pulled through, never both."""
    master = start("master")
    size, count = MiB, 48
    image = push(master, admin, "big", write_files(tmp_path / "big", random_files(count, size)))
    hashes = sorted(image.tree.object_sizes())
    assert metric(master, "imageserver_served_bytes_total") == 0
    replica = start("replica", upstream=master)
    wait_until(lambda: objects_bytes(replica) >= size, what="replication under way",
               interval=0.005)
    assert master.process is not None
    master.process.send_signal(signal.SIGSTOP)  # replication's fetch stays in flight
    try:
        assert objects_bytes(replica) < count * size, \
            "replication finished before the master stopped: make the image bigger"
        callers = Callers(replica, admin, hashes)
        wait_until(lambda: metric(replica, "imageserver_shared_fetch_objects_total") > 0,
                   what="callers waiting for replication's fetch")
    finally:
        master.process.send_signal(signal.SIGCONT)
    wait_until(holds(replica, admin, "big"), timeout=60, what="big on the replica")
    callers.check()
    # One copy left the master, however many callers asked the replica meanwhile.
    assert metric(master, "imageserver_served_bytes_total") == count * size
    assert metric(replica, "imageserver_replicated_bytes_total") \
        + metric(replica, "imageserver_pulled_bytes_total") == count * size
    assert metric(replica, "imageserver_served_objects_total") == CALLERS * CALLER_OBJECTS


def test_replication_waits_for_what_callers_pull_through(
        tmp_path: Path, admin: Security, start: Start) -> None:
    """The other way round: callers ask for objects first, then their image is added:
    replication waits for what pull-through has on its way instead of fetching it."""
    master = start("master")
    replica = start("replica", upstream=master)
    size, count = MiB, 24
    source = DirectorySource(write_files(tmp_path / "big", random_files(count, size)))
    with ImageServerClient(master.address, admin) as client:  # the objects, not the image
        client.upload(source, client.missing(source.tree.object_sizes()))
    hashes = sorted(source.tree.object_sizes())
    assert replica.process is not None
    callers = Callers(replica, admin, hashes, hold=True)
    replica.process.send_signal(signal.SIGSTOP)
    try:  # the callers' requests and then the image's ADDED event wait in its sockets
        callers.go.set()
        time.sleep(0.5)
        with ImageServerClient(master.address, admin) as client:
            client.add_image(Image("big", source.tree, EMPTY))
        time.sleep(0.5)
    finally:
        replica.process.send_signal(signal.SIGCONT)
    wait_until(holds(replica, admin, "big"), timeout=60, what="big on the replica")
    callers.check()
    assert metric(master, "imageserver_served_bytes_total") == count * size
    pulled = metric(replica, "imageserver_pulled_bytes_total")
    assert pulled > 0
    assert metric(replica, "imageserver_replicated_bytes_total") == count * size - pulled
    assert metric(replica, "imageserver_shared_fetch_objects_total") > 0


def test_callers_fetch_themselves_what_replication_failed_to_bring(
        tmp_path: Path, admin: Security, start: Start) -> None:
    """Replication's fetch fails (upstream sends a corrupt object): the callers waiting
    for the objects after it pull them through themselves; the bad one is kept by
    nobody."""
    master = start("master")
    size, count, bad = MiB, 48, 30
    image = push(master, admin, "big", write_files(tmp_path / "big", random_files(count, size)))
    # the order replication asks for them (imageserver/follower.py fetch_order)
    hashes = list(dict.fromkeys(inode.hash for _, inode in sorted(image.tree.inodes.items())
                                if inode.size))
    replica = start("replica", upstream=master)
    wait_until(lambda: objects_bytes(replica) >= size, what="replication under way",
               interval=0.005)
    assert master.process is not None and master.state_dir is not None
    master.process.send_signal(signal.SIGSTOP)
    try:
        path = Path(ObjectStore(master.state_dir / "objects").path_of(hashes[bad]))
        path.chmod(0o644)
        data = path.read_bytes()
        path.write_bytes(bytes(b ^ 0xFF for b in data[:10]) + data[10:])
        callers = Callers(replica, admin, hashes[bad + 1:])
        wait_until(lambda: metric(replica, "imageserver_shared_fetch_objects_total") > 0,
                   what="callers waiting for replication's fetch")
    finally:
        master.process.send_signal(signal.SIGCONT)
    callers.check()
    assert metric(replica, "imageserver_pulled_bytes_total") > 0
    wait_until(lambda: "does not match its hash" in replica.log(), what="the bad object")
    assert "big" not in names(replica, admin), \
        "the master read the object before it was spoiled: make the image bigger"
    assert replica.state_dir is not None
    assert not ObjectStore(replica.state_dir / "objects").has(hashes[bad])


CALLERS, CALLER_OBJECTS, CALLERS_STEP = 20, 12, 5


class Callers:
    """CALLERS concurrent GetObjects calls to SERVER on a thread, each for CALLER_OBJECTS
    of HASHES (from its own offset): with HOLD, on a channel opened first, sent once
    `go` is set."""

    def __init__(self, server: Daemon, security: Security, hashes: list[bytes],
                 hold: bool = False) -> None:
        self.wanted = [[hashes[(CALLERS_STEP * i + k) % len(hashes)]
                        for k in range(CALLER_OBJECTS)] for i in range(CALLERS)]
        self.results: list[dict[bytes, bytes] | BaseException] = []
        self.opened, self.go = threading.Event(), threading.Event()
        if not hold:
            self.go.set()
        self.thread = threading.Thread(target=lambda: self.results.extend(asyncio.run(
            fetch_objects(server.address, security, self.wanted, self.opened, self.go))))
        self.thread.start()
        assert self.opened.wait(30), "the callers' channel did not open"

    def check(self) -> None:
        """Every call got exactly the objects it asked for, each matching its hash."""
        self.thread.join(timeout=120)
        assert len(self.results) == CALLERS
        for asked, got in zip(self.wanted, self.results, strict=True):
            assert isinstance(got, dict), got
            assert sorted(got) == sorted(asked)  # what it holds first, then as it arrives
            assert all(hashlib.sha256(data).digest() == digest
                       for digest, data in got.items())


async def fetch_objects(address: str, security: Security, wanted: list[list[bytes]],
                        opened: threading.Event, go: threading.Event
                        ) -> list[dict[bytes, bytes] | BaseException]:
    """One GetObjects call per list of WANTED, all at once once GO is set (OPENED says
    the channel is up): each call's objects by hash, or its error."""
    channel = open_channel(address, security, "imageserver", aio=True)
    stub = objectserver_pb2_grpc.ObjectServerStub(channel)
    await stub.CheckObjects(objectserver_pb2.CheckObjectsRequest(), timeout=30)
    opened.set()
    await asyncio.to_thread(go.wait)

    async def one(hashes: list[bytes]) -> dict[bytes, bytes]:
        objects: dict[bytes, bytearray] = {}
        current = bytearray()
        async for message in stub.GetObjects(objectserver_pb2.GetObjectsRequest(
                hashes=hashes), timeout=90):
            for chunk in message.chunks:
                if chunk.hash:
                    current = objects[chunk.hash] = bytearray()
                current.extend(chunk.data)
        return {digest: bytes(data) for digest, data in objects.items()}

    try:
        return list(await asyncio.gather(*(one(h) for h in wanted), return_exceptions=True))
    finally:
        await channel.close()


def test_resuming_moves_only_the_changes_and_a_cycle_is_refused(
        tmp_path: Path, admin: Security, ca: Path, start: Start) -> None:
    master = start("master")
    replica = start("replica", upstream=master)
    push(master, admin, "one", write_files(tmp_path / "one", random_files(2, 1024)))
    wait_until(holds(replica, admin, "one"), what="one on the replica")
    assert metric(replica, "imageserver_replication_snapshots_total") == 1
    # The connection is cut (the master restarts): the replica resumes with events.
    master.stop()
    master.start()
    push(master, admin, "two", write_files(tmp_path / "two", random_files(2, 1024)))
    wait_until(holds(replica, admin, "two"), timeout=60, what="two on the replica")
    assert metric(replica, "imageserver_replication_snapshots_total") == 1
    assert metric(master, "imageserver_snapshots_sent_total") == 0
    # The replica restarts: it serves what it has and resumes from its position.
    replica.kill()
    replica.start()
    assert names(replica, admin) == {"one", "two"}
    push(master, admin, "three", write_files(tmp_path / "three", random_files(1, 1024)))
    wait_until(holds(replica, admin, "three"), what="three on the replica")
    assert metric(replica, "imageserver_replication_snapshots_total") == 0
    assert metric(master, "imageserver_snapshots_sent_total") == 0
    assert "resumes after sequence" in master.log()
    # The master cannot become a replica of its replica: A -> B -> A.
    master.stop()
    assert master.state_dir is not None
    before = state_of(master.state_dir)
    result = run_replica(master.state_dir, ca, replica.address, master.port)
    assert_one_line_error(result, "replication cycle", replica.address)
    assert state_of(master.state_dir) == before


def state_of(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*")) if folder.exists() else []


def run_replica(state: Path, ca: Path, upstream: str, port: int | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Start an image server replicating from UPSTREAM that must refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "imageserver.main", "--state-dir", str(state), "--tls-dir",
         str(ca / "imageserver"), "--port", str(port or free_port()),
         "--replicate-from", upstream],
        capture_output=True, text=True, timeout=60, cwd=PROJECT)


def test_bad_upstreams_are_refused_with_one_line(tmp_path: Path, ca: Path, start: Start) -> None:
    foreign = tmp_path / "foreign-ca"
    init_ca(foreign)
    stranger = imageserver_daemon(tmp_path / "stranger", foreign, tmp_path / "stranger.log")
    stranger.start()
    try:
        state = tmp_path / "replica"
        port = free_port()
        cases = [(f"127.0.0.1:{free_port()}", ("cannot replicate from", "127.0.0.1")),
                 (stranger.address, ("cannot replicate from", stranger.address)),
                 (f"127.0.0.1:{port}", ("is this server itself",)),
                 ("bad:address:x", ("bad address",))]
        for upstream, fragments in cases:
            result = run_replica(state, ca, upstream, port)
            assert_one_line_error(result, *fragments)
            assert not state.exists(), upstream
        alone = subprocess.run(
            [sys.executable, "-m", "imageserver.main", "--state-dir", str(state), "--tls-dir",
             str(ca / "imageserver"), "--accept-upstream"],
            capture_output=True, text=True, timeout=60, cwd=PROJECT)
        assert_one_line_error(alone, "--accept-upstream needs --replicate-from")
        assert not state.exists()
        existing = start("existing")
        existing.stop()
        assert existing.state_dir is not None
        before = state_of(existing.state_dir)
        assert_one_line_error(run_replica(existing.state_dir, ca, stranger.address),
                              "cannot replicate from")
        assert state_of(existing.state_dir) == before
    finally:
        stranger.stop()
