"""Replicated image servers (real daemons, real mutual TLS, loopback): a master and
replicas (and a replica of a replica) following its journal; only missing objects
move; a SIGKILLed replica resumes without fetching anything twice; a name bound to
other content is quarantined; a replaced master diverges its replicas instead of
wiping them; cycles and bad upstreams are refused with one line."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.image import Image
from fleetlib.fstree.source import DirectorySource
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import (
    Daemon,
    free_port,
    imageserver_daemon,
)
from fleetlib.wire import imageserver_pb2
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


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "") -> float:
    """Poll CHECK until true; the seconds it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)
    return time.monotonic() - began


def holds(server: Daemon, security: Security, *wanted: str) -> Callable[[], bool]:
    return lambda: set(wanted) <= names(server, security)


def replicas(server: Daemon, security: Security) -> imageserver_pb2.ListReplicasResponse:
    with ImageServerClient(server.address, security) as client:
        return client.images.ListReplicas(imageserver_pb2.ListReplicasRequest(), timeout=30)


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
    push(master, admin, "base", write_files(tmp_path / "base", random_files(3, 64 << 10)))
    for server in (first, second, third):
        wait_until(holds(server, admin, "base"), what=f"base on {server.address}")
    # A new image appears on every replica within a second of its add (plus its objects).
    push(master, admin, "new", write_files(tmp_path / "new", random_files(2, 4 << 10)))
    began = time.monotonic()
    wait_until(holds(first, admin, "new"), what="new on replica 1")
    wait_until(holds(second, admin, "new"), what="new on replica 2")
    assert time.monotonic() - began < 1.5
    wait_until(holds(third, admin, "new"), what="new on replica 3")
    with ImageServerClient(first.address, admin) as client:
        assert client.get_image("new").tree.object_sizes() == \
            ImageServerClient(master.address, admin).get_image("new").tree.object_sizes()
    # The master lists its two direct followers, with location and state; replica 1 its own.
    wait_until(in_sync(master, admin, 2), what="two replicas in sync")
    listing = replicas(master, admin)
    assert {r.location for r in listing.replicas} == {"eu/b", "us/a"}
    assert {r.address for r in listing.replicas} == {first.address, second.address}
    assert all(r.lag_events == 0 for r in listing.replicas)
    assert listing.upstream == "" and listing.location == "eu/a"
    wait_until(in_sync(first, admin, 1), what="replica 3 in sync with replica 1")
    assert replicas(first, admin).upstream == master.address
    assert metric(master, "imageserver_followers_connected") == 2
    # A delete on the master removes the image everywhere, replica of a replica too.
    with ImageServerClient(master.address, admin) as client:
        client.delete_image("base")
    for server in (first, second, third):
        wait_until(lambda s=server: "base" not in names(s, admin), what="base deleted")
    assert names(third, admin) == {"new"}
    assert metric(first, "imageserver_replication_lag_events") == 0
