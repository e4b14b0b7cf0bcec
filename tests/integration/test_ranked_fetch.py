"""Hosts fetch from an ordered list of image servers (real daemons, real mutual TLS):
per-object failover past a server that is down or serves a corrupt object, and a fleet
in two locations whose hosts each fetch from their own location's server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dominator.herd.ranking import ImageServers
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import (
    PROJECT,
    Daemon,
    assert_one_line_error,
    cli,
    free_port,
    imageserver_daemon,
)
from fleetlib.testing.fleet import FleetUnderTest
from subd.client import SubClient

StartServer = Callable[[str], Daemon]


@pytest.fixture
def start_imageserver(tmp_path: Path, ca: Path) -> Iterator[StartServer]:
    """More real image servers: `start_imageserver(location)` ('' for none), each
    with a metrics port (its `metrics_port` attribute)."""
    started: list[Daemon] = []

    def start(location: str) -> Daemon:
        index = len(started)
        state = tmp_path / f"server-{index}-state"
        metrics_port = free_port()
        daemon = imageserver_daemon(state, ca, tmp_path / f"server-{index}.log",
                                    "--metrics-port", str(metrics_port),
                                    *(["--location", location] if location else []))
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


def served_bytes(server: Daemon) -> float:
    """Object bytes the server sent by GetObjects, from its /metrics."""
    port = server.args[server.args.index("--metrics-port") + 1]
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    reply.raise_for_status()
    return next(sample.value for family in text_string_to_metric_families(reply.text)
                for sample in family.samples if sample.name == "imageserver_served_bytes_total")


def add_image(ca: Path, server: Daemon, name: str, source: Path) -> None:
    cli("image", "add", name, str(source), check=True,
        env={"DOMINATOR_TLS_DIR": str(ca / "admin"), "DOMINATOR_IMAGESERVER": server.address})


def object_path(server: Daemon, content: bytes) -> Path:
    """Where `server` stores the object holding `content` (objectstore's fan-out)."""
    digest = hashlib.sha256(content).hexdigest()
    assert server.state_dir is not None
    return server.state_dir / "objects" / digest[:2] / digest[2:4] / digest[4:]


def test_fetch_falls_back_past_a_dead_server_and_a_corrupt_object(
        tmp_path: Path, ca: Path, admin: Security, start_imageserver: StartServer,
        start_subd: Callable[..., Daemon]) -> None:
    source = tmp_path / "image"
    source.mkdir()
    contents = [os.urandom(300_000 + i) for i in range(3)]
    for index, content in enumerate(contents):
        (source / f"file-{index}").write_bytes(content)
    corrupting, good = start_imageserver(""), start_imageserver("")
    for server in (corrupting, good):
        add_image(ca, server, "img", source)
    object_path(corrupting, contents[1]).write_bytes(os.urandom(len(contents[1])))
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    hashes = [hashlib.sha256(content).digest() for content in contents]
    with SubClient(sub.address, admin) as client:
        client.fetch([down, corrupting.address, good.address], hashes)
        status = client.wait_fetch(timeout=120)
    assert status.error == ""
    assert status.objects_done == status.objects_total == 3
    # The corrupt object and whatever followed it in that stream came from the third.
    by_server = dict(status.bytes_by_server)
    assert set(by_server) <= {corrupting.address, good.address}
    assert by_server.get(good.address, 0) >= len(contents[1])
    assert sum(by_server.values()) == sum(map(len, contents))
    assert served_bytes(good) >= len(contents[1])
    cache = root / ".subd" / "objects"
    cached = {path.read_bytes() for path in cache.rglob("*") if path.is_file()}
    assert cached == set(contents)  # the corrupt copy never became visible


def test_push_image_takes_imageserver_more_than_once(
        tmp_path: Path, ca: Path, start_imageserver: StartServer,
        start_subd: Callable[..., Daemon]) -> None:
    source = tmp_path / "image"
    source.mkdir()
    content = os.urandom(200_000)
    (source / "payload").write_bytes(content)
    corrupting, good = start_imageserver(""), start_imageserver("")
    for server in (corrupting, good):
        add_image(ca, server, "img", source)
    object_path(corrupting, content).write_bytes(os.urandom(len(content)))
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    cli("sub", "push-image", sub.address, "img", "--imageserver", corrupting.address,
        "--imageserver", good.address, check=True,
        env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert (root / "payload").read_bytes() == content
    assert served_bytes(good) == len(content)


def test_each_location_fetches_from_its_own_server(
        tmp_path: Path, ca: Path, imageserver: Daemon, start_imageserver: StartServer,
        start_subd: Callable[..., Daemon]) -> None:
    east, west = start_imageserver("us-east/dc1"), start_imageserver("eu-west/dc1")
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=3,
                           serve_args=("--imageserver", east.address,
                                       "--imageserver", west.address))
    try:
        source = tmp_path / "image"
        source.mkdir()
        payload = os.urandom(400_000)
        (source / "payload").write_bytes(payload)
        for server in (imageserver, east, west):
            add_image(ca, server, "img", source)
        locations = ["us-east/dc1/r1", "us-east/dc1/r2", "eu-west/dc1/r1"]
        machines = [{"Hostname": name, "IpAddress": sub.address, "RequiredImage": "img",
                     "Location": location}
                    for name, sub, location in zip(fleet.names, fleet.subs, locations,
                                                   strict=True)]
        (tmp_path / "machines.json").write_text(json.dumps(machines))
        fleet.run("mdb", "import", str(tmp_path / "machines.json"))
        fleet.wait_status(fleet.names, "synced", "img", timeout=120)
        assert all((root / "payload").read_bytes() == payload for root in fleet.roots)
        # Each host's bytes came from its own location's server, none from the master.
        assert served_bytes(east) == 2 * len(payload)
        assert served_bytes(west) == len(payload)
        for sub, server in zip(fleet.subs, (east, east, west), strict=True):
            with SubClient(sub.address, fleet.dominator.security) as client:
                fetched = client.poll(short=True)[0].fetch.bytes_by_server
            assert dict(fetched) == {server.address: len(payload)}
    finally:
        fleet.stop()


@pytest.mark.parametrize("location", ["us-east", "us east/dc1", "us/dc1/r4/x", "us//r4"])
def test_a_bad_location_is_one_line(tmp_path: Path, location: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imageserver.main", "--state-dir", str(tmp_path / "state"),
         "--insecure", "--location", location], capture_output=True, text=True, timeout=60,
        cwd=PROJECT)
    assert_one_line_error(result, "--location", "invalid location", "REGION/DC")
    assert not (tmp_path / "state").exists()


def test_hosts_ranked_while_servers_are_asked_wait_for_every_location(
        imageserver: Daemon, start_imageserver: StartServer, admin: Security) -> None:
    # Hosts converging together rank together: none may rank before every server was
    # asked where it stands (a half-known map sent eu-west hosts to us-east).
    east, west = start_imageserver("us-east/dc1"), start_imageserver("eu-west/dc1")
    servers = ImageServers(imageserver.address, [east.address, west.address], admin)

    async def rank_while_asking() -> list[list[str]]:
        first = asyncio.create_task(servers.ranked("host-0", "eu-west/dc1/r1"))
        while not servers.locations:  # the master answered, the others not yet
            await asyncio.sleep(0.001)
        later = [await servers.ranked(f"host-{i}", "eu-west/dc1/r1") for i in range(1, 9)]
        return [await first, *later]

    for order in asyncio.run(rank_while_asking()):
        assert order == [west.address, east.address, imageserver.address]
