"""What a replica image server (`imageserver --replicate-from MASTER`) does for its
clients, with real daemons over mutual TLS: objects it lacks are pulled through from
the master once however many callers wait, `image add` is written through to the
master and committed locally only once the master accepted it, deletes and expiry
changes are refused naming the master, and `--replica-only` drops a replica's copy."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.image import Image
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.source import open_source
from fleetlib.rpc.objects import object_chunks, pack
from fleetlib.rpc.tls import Security, open_channel
from fleetlib.testing.daemons import (
    Daemon,
    assert_one_line_error,
    cli,
    free_port,
    imageserver_daemon,
)
from fleetlib.testing.fleet import wait_for
from fleetlib.testing.trees import make_tree
from fleetlib.wire import (
    audit_pb2,
    imageserver_pb2,
    imageserver_pb2_grpc,
    objectserver_pb2,
    objectserver_pb2_grpc,
)
from imageserver.client import ImageServerClient

WAITERS = 50
OBJECT_BYTES = 3 << 20  # three pieces


def start_server(tmp: Path, ca: Path, name: str, *extra: str) -> Daemon:
    """An image server with a metrics port (its `metrics_port`)."""
    port = free_port()
    daemon = imageserver_daemon(tmp / name, ca, tmp / f"{name}.log", "--metrics-port",
                                str(port), *extra)
    daemon.metrics_port = port  # type: ignore[attr-defined]
    return daemon.start()


def start_pair(tmp: Path, ca: Path) -> tuple[Daemon, Daemon]:
    """(master, replica of the master), started."""
    master = start_server(tmp, ca, "master")
    return master, start_server(tmp, ca, "replica", "--replicate-from", master.address)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, ca: Path
            ) -> Iterator[tuple[Daemon, Daemon]]:
    """A master and its replica shared by the tests that leave both running (each test
    uses its own image names)."""
    pair = start_pair(tmp_path_factory.mktemp("servers"), ca)
    yield pair
    for daemon in reversed(pair):
        daemon.stop()


@pytest.fixture
def own_servers(tmp_path: Path, ca: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """A master and its replica for one test."""
    pair = start_pair(tmp_path, ca)
    yield pair
    for daemon in reversed(pair):
        daemon.stop()


def metric(server: Daemon, name: str) -> float:
    """One sample of the server's /metrics (counters end in _total)."""
    port = server.metrics_port  # type: ignore[attr-defined]
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    reply.raise_for_status()
    return next(sample.value for family in text_string_to_metric_families(reply.text)
                for sample in family.samples if sample.name == name)


def env_for(ca: Path, server: Daemon) -> dict[str, str]:
    return {"DOMINATOR_TLS_DIR": str(ca / "admin"), "DOMINATOR_IMAGESERVER": server.address}


def add_object(server: Daemon, admin: Security, data: bytes) -> bytes:
    """Upload DATA as an object (no image references it); its hash."""
    digest = hashlib.sha256(data).digest()
    with open_channel(server.address, admin, "imageserver") as channel:
        stub = objectserver_pb2_grpc.ObjectServerStub(channel)
        reply = stub.AddObjects(pack(object_chunks(digest, len(data), io.BytesIO(data))),
                                timeout=30)
    assert reply.added == 1
    return digest


def check(server: Daemon, admin: Security, digest: bytes) -> int:
    """The size CheckObjects reports for DIGEST (0: absent)."""
    with open_channel(server.address, admin, "imageserver") as channel:
        stub = objectserver_pb2_grpc.ObjectServerStub(channel)
        reply = stub.CheckObjects(objectserver_pb2.CheckObjectsRequest(hashes=[digest]),
                                  timeout=30)
    return reply.sizes[0] if reply.present[0] else 0


async def fetch_all(server: Daemon, admin: Security, digest: bytes, callers: int
                    ) -> list[bytes | grpc.RpcError]:
    """CALLERS GetObjects calls for DIGEST at once: each one's bytes, or its error."""
    channel = open_channel(server.address, admin, "imageserver", aio=True)
    stub = objectserver_pb2_grpc.ObjectServerStub(channel)

    async def one() -> bytes | grpc.RpcError:
        data = bytearray()
        try:
            async for message in stub.GetObjects(
                    objectserver_pb2.GetObjectsRequest(hashes=[digest]), timeout=60):
                data.extend(b"".join(chunk.data for chunk in message.chunks))
        except grpc.RpcError as err:
            return err
        return bytes(data)

    try:
        return list(await asyncio.gather(*(one() for _ in range(callers))))
    finally:
        await channel.close()


def fetch(server: Daemon, admin: Security, digest: bytes) -> bytes | grpc.RpcError:
    return asyncio.run(fetch_all(server, admin, digest, 1))[0]


def held(server: Daemon, digest: bytes) -> bool:
    """Whether the server's own store holds DIGEST (not asking its upstream)."""
    assert server.state_dir is not None
    return ObjectStore(server.state_dir / "objects").has(digest)


def images(server: Daemon, admin: Security) -> imageserver_pb2.ListImagesResponse:
    with open_channel(server.address, admin, "imageserver") as channel:
        reply: imageserver_pb2.ListImagesResponse = imageserver_pb2_grpc.ImageServerStub(
            channel).ListImages(imageserver_pb2.ListImagesRequest(), timeout=30)
    return reply


def names(server: Daemon, admin: Security) -> dict[str, imageserver_pb2.ImageSummary]:
    return {info.name: info for info in images(server, admin).images}


def audit_lines(server: Daemon, admin: Security) -> list[str]:
    with open_channel(server.address, admin, "imageserver") as channel:
        reply = imageserver_pb2_grpc.ImageServerStub(channel).ListAudit(
            audit_pb2.ListAuditRequest(), timeout=30)
    return [f"{entry.who} {entry.summary}" for entry in reply.entries]


def counters(master: Daemon, replica: Daemon) -> dict[str, float]:
    """The counters pull-through moves: the master's objects served, the replica's
    objects served and pulled through, and their bytes."""
    return {"master served": metric(master, "imageserver_served_objects_total"),
            "replica served": metric(replica, "imageserver_served_objects_total"),
            "pulled": metric(replica, "imageserver_pulled_objects_total"),
            "pulled bytes": metric(replica, "imageserver_pulled_bytes_total")}


def test_fifty_callers_pull_one_object_through_once(servers: tuple[Daemon, Daemon],
                                                    admin: Security) -> None:
    master, replica = servers
    data = os.urandom(OBJECT_BYTES)
    digest = add_object(master, admin, data)
    assert not held(replica, digest)
    # CheckObjects on the replica counts what its upstream holds: a host asks it, not
    # the master, for the object.
    assert check(replica, admin, digest) == len(data)
    before = counters(master, replica)

    results = asyncio.run(fetch_all(replica, admin, digest, WAITERS))

    assert all(result == data for result in results), [
        r.details() if isinstance(r, grpc.RpcError) else len(r) for r in results]
    after = counters(master, replica)
    assert {key: after[key] - before[key] for key in after} == {
        "master served": 1, "replica served": WAITERS, "pulled": 1, "pulled bytes": len(data)}
    assert held(replica, digest)
    # Held now: served from the replica's own store.
    assert fetch(replica, admin, digest) == data
    assert counters(master, replica)["master served"] == after["master served"]


def test_unknown_and_corrupt_objects_are_not_served(servers: tuple[Daemon, Daemon],
                                                    admin: Security) -> None:
    master, replica = servers
    unknown = hashlib.sha256(b"nobody has this").digest()
    assert check(replica, admin, unknown) == 0
    failed = fetch(replica, admin, unknown)
    assert isinstance(failed, grpc.RpcError)
    assert failed.code() == grpc.StatusCode.NOT_FOUND, failed.details()
    assert "neither here nor on upstream" in (failed.details() or "")

    pulled = metric(replica, "imageserver_pulled_objects_total")
    data = os.urandom(200_000)
    digest = add_object(master, admin, data)
    assert master.state_dir is not None
    path = Path(ObjectStore(master.state_dir / "objects").path_of(digest))
    path.chmod(0o644)
    path.write_bytes(bytes(b ^ 0xFF for b in data[:10]) + data[10:])  # same size, bad content
    failed = fetch(replica, admin, digest)
    assert isinstance(failed, grpc.RpcError)
    assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed.details()
    assert "sent a bad object" in (failed.details() or "")
    assert "does not match its hash" in (failed.details() or "")
    assert not held(replica, digest)
    assert metric(replica, "imageserver_pulled_objects_total") == pulled


def test_image_add_on_a_replica_is_written_through(servers: tuple[Daemon, Daemon],
                                                   admin: Security, ca: Path,
                                                   tmp_path: Path) -> None:
    master, replica = servers
    tree = make_tree(tmp_path / "tree")
    added = cli("image", "add", "web/1", str(tree), "--json", env=env_for(ca, replica),
                check=True)
    assert json.loads(added.stdout)["uploaded_objects"] > 0
    on_master, on_replica = names(master, admin), names(replica, admin)
    assert "web/1" in on_master and "web/1" in on_replica
    assert on_master["web/1"].created_unix == on_replica["web/1"].created_unix
    assert images(replica, admin).upstream == master.address
    assert images(master, admin).upstream == ""
    assert any("added image web/1, written through to " + master.address in line
               for line in audit_lines(replica, admin)), audit_lines(replica, admin)
    shown = cli("image", "show", "web/1", "--json", env=env_for(ca, master), check=True)
    assert json.loads(shown.stdout)["listing"] == json.loads(cli(
        "image", "show", "web/1", "--json", env=env_for(ca, replica), check=True).stdout)[
            "listing"]

    # A second image sharing most content: the replica uploads to the master only what
    # it lacks (nothing here: the same tree, another name).
    received = metric(master, "imageserver_received_bytes_total")
    cli("image", "add", "web/2", str(tree), env=env_for(ca, replica), check=True)
    assert metric(master, "imageserver_received_bytes_total") == received
    assert "web/2" in names(master, admin)


def test_the_masters_refusal_reaches_the_caller(servers: tuple[Daemon, Daemon],
                                                admin: Security, ca: Path,
                                                tmp_path: Path) -> None:
    master, replica = servers
    cli("image", "add", "db/1", str(make_tree(tmp_path / "a")), env=env_for(ca, master),
        check=True)
    other = tmp_path / "b"
    other.mkdir()
    (other / "different").write_text("other content\n")
    # Uploaded to the replica, added there by AddImage itself (the CLI would refuse on its
    # own if replication already brought db/1 here).
    refused = add_image_directly(replica, admin, "db/1", other)
    assert refused is not None
    assert refused.code() == grpc.StatusCode.ALREADY_EXISTS, refused.details()
    assert "already exists" in (refused.details() or "")
    master_copy = cli("image", "show", "db/1", "--json", env=env_for(ca, master), check=True)
    replica_copy = cli("image", "show", "db/1", "--json", env=env_for(ca, replica))
    if replica_copy.returncode == 0:  # replication may have brought the master's copy
        assert json.loads(replica_copy.stdout)["listing"] == json.loads(
            master_copy.stdout)["listing"]
    assert not any("db/1" in line and "added" in line for line in audit_lines(replica, admin))

    # A refusal the CLI meets (the replica leaves that check to the master): one line,
    # the master's words.
    result = cli("image", "add", "db/2", str(other), "--expires-in", "3000000000d",
                 env=env_for(ca, replica))
    assert_one_line_error(result, "image db/2: expires time", "is not between", code=2)
    assert "db/2" not in names(master, admin) and "db/2" not in names(replica, admin)


def add_image_directly(server: Daemon, admin: Security, name: str, tree: Path
                       ) -> grpc.RpcError | None:
    """Upload TREE's objects to SERVER and send it AddImage; its refusal, if any."""
    with ImageServerClient(server.address, admin) as client:
        source = open_source(tree)
        client.upload(source, client.missing(source.tree.object_sizes()))
        try:
            client.add_image(Image(name, source.tree, EMPTY))
        except grpc.RpcError as err:
            return err
    return None


def test_delete_and_expiry_are_refused_on_a_replica(servers: tuple[Daemon, Daemon],
                                                    admin: Security, ca: Path,
                                                    tmp_path: Path) -> None:
    master, replica = servers
    cli("image", "add", "app/1", str(make_tree(tmp_path / "tree")), env=env_for(ca, replica),
        check=True)
    before = names(replica, admin)["app/1"]
    for args in (["image", "delete", "app/1"], ["image", "delete", "app/1", "--force"]):
        assert_one_line_error(cli(*args, env=env_for(ca, replica)),
                              f"replica of {master.address}", "delete images on the master",
                              "--replica-only", code=4)
    assert_one_line_error(cli("image", "set-expiry", "app/1", "2d", env=env_for(ca, replica)),
                          f"replica of {master.address}", "on the master", code=4)
    assert names(replica, admin)["app/1"] == before
    assert "app/1" in names(master, admin)
    assert names(master, admin)["app/1"].expires_unix == 0

    deleted = cli("image", "delete", "app/1", "--replica-only", env=env_for(ca, replica),
                  check=True)
    assert "deleted this replica's copy of image app/1" in deleted.stdout
    assert "app/1" not in names(replica, admin)
    assert "app/1" in names(master, admin)
    assert any("replica-only" in line for line in audit_lines(replica, admin))
    assert_one_line_error(cli("image", "delete", "app/1", "--replica-only",
                              env=env_for(ca, master)), "is a master", "--replica-only",
                          code=4)
    assert "app/1" in names(master, admin)


def test_an_unreachable_upstream_is_named(own_servers: tuple[Daemon, Daemon],
                                          admin: Security, ca: Path, tmp_path: Path) -> None:
    master, replica = own_servers
    digest = add_object(master, admin, os.urandom(1000))
    master.stop()
    failed = fetch(replica, admin, digest)
    assert isinstance(failed, grpc.RpcError)
    assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed.details()
    assert f"upstream image server {master.address} could not be reached" in (
        failed.details() or "")
    assert check(replica, admin, digest) == 0  # its own answer, in time
    result = cli("image", "add", "down/1", str(make_tree(tmp_path / "tree")),
                 env=env_for(ca, replica))
    assert_one_line_error(result, master.address, "could not be reached", code=3)
    assert "down/1" not in names(replica, admin)


def small_tree(root: Path, text: str) -> Path:
    root.mkdir()
    (root / "content").write_text(text)
    return root


def test_a_deleted_name_stays_bound_through_a_replica(servers: tuple[Daemon, Daemon],
                                                      admin: Security, ca: Path,
                                                      tmp_path: Path) -> None:
    master, replica = servers
    cli("image", "add", "gone/1", str(small_tree(tmp_path / "a", "first\n")),
        env=env_for(ca, replica), check=True)
    cli("image", "delete", "gone/1", "--force", env=env_for(ca, master), check=True)
    wait_for(lambda: "gone/1" not in names(replica, admin), "the replica applies the delete")
    result = cli("image", "add", "gone/1", str(small_tree(tmp_path / "b", "second\n")),
                 env=env_for(ca, replica))
    assert_one_line_error(result, "image gone/1 existed with other content", code=4)
    assert "gone/1" not in names(master, admin) and "gone/1" not in names(replica, admin)
    # The same content again is welcome: the name is bound to it.
    cli("image", "add", "gone/1", str(tmp_path / "a"), env=env_for(ca, replica), check=True)
    assert "gone/1" in names(master, admin) and "gone/1" in names(replica, admin)


def test_a_quarantined_name_is_marked_and_replica_only_drops_it(
        tmp_path: Path, ca: Path, admin: Security) -> None:
    seeded = start_server(tmp_path, ca, "replica")  # first a master of its own
    cli("image", "add", "os/1", str(small_tree(tmp_path / "mine", "mine\n")),
        env=env_for(ca, seeded), check=True)
    seeded.stop()
    master = start_server(tmp_path, ca, "master")
    try:
        cli("image", "add", "os/1", str(small_tree(tmp_path / "theirs", "theirs\n")),
            env=env_for(ca, master), check=True)
        replica = start_server(tmp_path, ca, "replica", "--replicate-from", master.address)
        try:
            entry = wait_for(lambda: next(iter(images(replica, admin).quarantined), None),
                             "the replica quarantines its copy of os/1")
            wait_for(lambda: "os/1" in names(replica, admin), "the master's copy is in")
            env = env_for(ca, replica)
            listed = cli("image", "list", env=env, check=True)
            assert "os/1" in listed.stdout
            assert f"QUARANTINED os/1: local copy {entry.local_digest.hex()[:12]} differs " \
                f"from upstream's {entry.upstream_digest.hex()[:12]}" in listed.stderr
            assert [i["name"] for i in json.loads(cli("image", "list", "--json", env=env,
                                                      check=True).stdout)] == ["os/1"]
            assert json.loads(cli("image", "list", "--quarantined", "--json", env=env,
                                  check=True).stdout) == [{
                "name": "os/1", "local_digest": entry.local_digest.hex(),
                "upstream_digest": entry.upstream_digest.hex(),
                "since_unix": entry.since_unix}]

            cli("image", "delete", "os/1", "--replica-only", env=env, check=True)
            assert not images(replica, admin).quarantined
            assert "QUARANTINED" not in cli("image", "list", env=env, check=True).stderr
            assert "os/1" in names(replica, admin) and "os/1" in names(master, admin)
            assert any("quarantined copy of image os/1" in line
                       for line in audit_lines(replica, admin))
        finally:
            replica.stop()
    finally:
        master.stop()


def test_a_replica_of_a_replica_writes_through_and_pulls_through_both(
        servers: tuple[Daemon, Daemon], admin: Security, ca: Path, tmp_path: Path) -> None:
    master, middle = servers
    leaf = start_server(tmp_path, ca, "leaf", "--replicate-from", middle.address)
    try:
        data = os.urandom(100_000)
        digest = add_object(master, admin, data)
        assert fetch(leaf, admin, digest) == data
        assert held(middle, digest) and held(leaf, digest)

        cli("image", "add", "chain/1", str(make_tree(tmp_path / "tree")),
            env=env_for(ca, leaf), check=True)
        for server in (master, middle, leaf):
            assert "chain/1" in names(server, admin), server.address
        wait_for(lambda: any(f"written through to {master.address}" in line
                             for line in audit_lines(leaf, admin)),
                 "the leaf's audit names the master")
        assert_one_line_error(cli("image", "delete", "chain/1", env=env_for(ca, leaf)),
                              f"replica of {master.address}", code=4)
    finally:
        leaf.stop()
