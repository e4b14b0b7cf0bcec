"""The dominator over replicated image servers (real daemons, real mutual TLS): given only
the master, it learns the replicas from it (ListReplicas) and sends each host to its own
location's replica, at most --fetches-per-imageserver fetches in flight on each;
`dominator image replicas` lists the tree, and the dashboard and /metrics show it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dominator.herd.ranking import ImageServers
from fleetlib.rpc.tls import Identity, Security, server_credentials
from fleetlib.testing.daemons import (
    Daemon,
    assert_one_line_error,
    cli,
    free_port,
    imageserver_daemon,
)
from fleetlib.testing.fleet import FleetUnderTest, wait_for
from subd.client import SubClient
from tests.integration.test_ranked_fetch import add_image, served_bytes

StartReplica = Callable[[Daemon, str], Daemon]
PAYLOAD = 3_000_000


@pytest.fixture
def start_replica(tmp_path: Path, ca: Path) -> Iterator[StartReplica]:
    """`start_replica(upstream, location)`: a real image server replicating from
    `upstream`, standing at `location`, with a metrics port."""
    started: list[Daemon] = []

    def start(upstream: Daemon, location: str) -> Daemon:
        index = len(started)
        daemon = imageserver_daemon(tmp_path / f"replica-{index}-state", ca,
                                    tmp_path / f"replica-{index}.log",
                                    "--metrics-port", str(free_port()),
                                    "--replicate-from", upstream.address,
                                    "--location", location)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


def replicas_json(env: dict[str, str]) -> dict[str, Any]:
    """`dominator image replicas --json`, parsed."""
    result = cli("image", "replicas", "--json", env=env, check=True)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def in_sync(env: dict[str, str], replicas: list[Daemon]) -> dict[str, dict[str, Any]] | None:
    """The replicas' rows once each is connected, in sync, with no lag and nothing pending."""
    rows = {row["address"]: row for row in replicas_json(env)["servers"]}
    wanted = [rows.get(replica.address) for replica in replicas]
    if all(row is not None and row["state"] == "in sync" and row["lag_events"] == 0
           and row["bytes_pending"] == 0 and row["connected"] for row in wanted):
        return rows
    return None


def dominator_gauges(fleet: FleetUnderTest, name: str) -> dict[tuple[str, ...], float]:
    """The dominator's samples of metric `name`, by their label values."""
    reply = httpx.get(f"{fleet.base}/metrics", timeout=30)
    reply.raise_for_status()
    return {tuple(sample.labels.values()): sample.value
            for family in text_string_to_metric_families(reply.text)
            for sample in family.samples if sample.name == name}


def import_machines(fleet: FleetUnderTest, image: str, locations: list[str]) -> None:
    machines = [{"Hostname": name, "IpAddress": sub.address, "RequiredImage": image,
                 "Location": location}
                for name, sub, location in zip(fleet.names, fleet.subs, locations, strict=True)]
    path = fleet.tmp / f"machines-{image}.json"
    path.write_text(json.dumps(machines))
    fleet.run("mdb", "import", str(path))


def fetched_from(fleet: FleetUnderTest) -> list[dict[str, int]]:
    """Per host, the bytes its last fetch took from each server."""
    result = []
    for sub in fleet.subs:
        with SubClient(sub.address, fleet.dominator.security) as client:
            result.append(dict(client.poll(short=True)[0].fetch.bytes_by_server))
    return result


def test_a_fleet_fetches_from_the_replicas_it_learns_from_the_master(
        tmp_path: Path, ca: Path, imageserver: Daemon, cli_env: dict[str, str],
        start_replica: StartReplica, start_subd: Callable[..., Daemon]) -> None:
    east = start_replica(imageserver, "us-east/dc1")
    west = start_replica(imageserver, "eu-west/dc1")
    deeper = start_replica(east, "us-east/dc2")  # a replica of a replica
    payloads = {}
    for image in ("img", "img2"):
        source = tmp_path / image
        source.mkdir()
        payloads[image] = os.urandom(PAYLOAD)
        (source / "payload").write_bytes(payloads[image])
        add_image(ca, imageserver, image, source)
    rows = wait_for(lambda: in_sync(cli_env, [east, west, deeper]),
                    "every replica is in sync", timeout=60)
    assert {rows[r.address]["upstream"] for r in (east, west)} == {imageserver.address}
    assert (rows[deeper.address]["upstream"], rows[deeper.address]["depth"]) == \
        (east.address, 2)
    assert rows[east.address]["location"] == "us-east/dc1"
    master_row = rows[imageserver.address]
    assert (master_row["state"], master_row["depth"], master_row["upstream"]) == \
        ("master", 0, "")
    replicated = {r.address: served_bytes(r) for r in (east, west)}  # deeper's from east
    # The dominator is given the master only, and one fetch in flight per server.
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=3,
                           serve_args=("--fetches-per-imageserver", "1"))
    try:
        import_machines(fleet, "img", ["us-east/dc1/r1", "us-east/dc1/r2", "eu-west/dc1/r1"])
        fleet.wait_status(fleet.names, "synced", "img", timeout=120)
        assert all((root / "payload").read_bytes() == payloads["img"] for root in fleet.roots)
        # Each host's bytes came from its own location's replica, none from the master.
        assert fetched_from(fleet) == [{east.address: PAYLOAD}, {east.address: PAYLOAD},
                                       {west.address: PAYLOAD}]
        assert served_bytes(east) - replicated[east.address] == 2 * PAYLOAD
        assert served_bytes(west) - replicated[west.address] == PAYLOAD
        # All three hosts move to us-east: every fetch goes to the one replica there,
        # never more than one at a time (the dominator's own count of it).
        import_machines(fleet, "img2", ["us-east/dc1/r1", "us-east/dc1/r2", "us-east/dc1/r3"])
        fleet.wait_status(fleet.names, "synced", "img2", timeout=120)
        assert fetched_from(fleet) == [{east.address: PAYLOAD}] * 3
        assert served_bytes(east) - replicated[east.address] == 5 * PAYLOAD
        peaks = dominator_gauges(fleet, "dominator_fetches_in_flight_max")
        assert peaks == {(east.address,): 1.0, (west.address,): 1.0}
        assert set(dominator_gauges(fleet, "dominator_fetches_in_flight").values()) == {0.0}
        # /metrics and the dashboard show the replicas as the CLI does.
        states = dominator_gauges(fleet, "dominator_replica_state")
        assert states[(east.address, "in sync")] == states[(west.address, "in sync")] == 1.0
        assert states[(east.address, "diverged")] == 0.0
        lags = dominator_gauges(fleet, "dominator_replica_lag_events")
        assert lags == {(east.address, imageserver.address): 0.0,
                        (west.address, imageserver.address): 0.0,
                        (deeper.address, east.address): 0.0}
        moved = dominator_gauges(fleet, "dominator_replica_bytes_replicated")
        assert moved[(east.address, imageserver.address)] >= 2 * PAYLOAD
        overview = httpx.get(f"{fleet.base}/index.json", timeout=30).json()["imageservers"]
        assert [row["address"] for row in overview["servers"]] == \
            [imageserver.address, *sorted([east.address, west.address]), deeper.address]
        assert overview["fetch_cap"] == 1 and overview["error"] == ""
        page = httpx.get(f"{fleet.base}/", timeout=30).text
        assert 'id="imageservers"' in page and east.address in page
    finally:
        fleet.stop()


@pytest.fixture
def old_imageserver(ca: Path) -> Iterator[str]:
    """An image server from before replication, as far as ListReplicas shows: the image
    server's identity over mutual TLS, and no such method (UNIMPLEMENTED, as gRPC
    answers for a method a server does not define). Its HOST:PORT."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}",
                           server_credentials(Identity.load(ca / "imageserver")))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_a_master_that_is_not_replication_aware(ca: Path, admin: Security,
                                                old_imageserver: str) -> None:
    env = {"DOMINATOR_TLS_DIR": str(ca / "admin")}
    result = cli("image", "replicas", "--imageserver", old_imageserver, env=env)
    assert_one_line_error(result, old_imageserver, "not replication-aware")
    result = cli("image", "replicas", "--imageserver", f"127.0.0.1:{free_port()}", env=env)
    assert_one_line_error(result, "cannot reach the image server", code=3)
    # The dominator ranks as before replication: the master alone, no replicas known.
    servers = ImageServers(old_imageserver, [], admin)
    assert asyncio.run(servers.ranked("web1", "us/dc1")) == [old_imageserver]
    assert servers.tree is None and "unimplemented" in servers.replication_error
