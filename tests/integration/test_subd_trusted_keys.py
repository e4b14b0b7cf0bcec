"""`subd --trusted-keys` with real daemons over mutual TLS: the host reads each image's
signed manifest from the image servers itself and fetches for and applies only what it
says. A signed image converges (two trusted keys: a rotation), an unsigned one is
refused, a server serving a tampered manifest is refused and skipped for the next one
in the host's ranked list, a Fetch of foreign content and an Update that does not match
the manifest are refused, an old subd certificate says to re-issue it, and a bad keys
folder stops subd with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dominator.herd.convergence import plan_update
from fleetlib.rpc.certs import issue
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import (
    PROJECT,
    Daemon,
    assert_one_line_error,
    cli,
    imageserver_daemon,
)
from fleetlib.testing.fleet import FleetUnderTest
from fleetlib.wire import imageserver_pb2
from fleetlib.wire.codec import image_from_proto, image_to_proto
from imageserver.client import ImageServerClient
from subd.client import SubClient

TOOL = "/usr/bin/tool"


def make_source(root: Path, motd: str) -> Path:
    """A small image tree: a message, a tool (0755), a hard link and a symlink."""
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc" / "motd").write_text(motd)
    tool = root / TOOL.lstrip("/")
    tool.write_bytes(b"\x7fELF" + os.urandom(50_000))
    tool.chmod(0o755)
    os.link(tool, root / "usr" / "bin" / "tool-link")
    (root / "usr" / "bin" / "t").symlink_to("tool")
    return root


def env_for(ca: Path, server: Daemon) -> dict[str, str]:
    """The CLI as admin against `server`."""
    return {"DOMINATOR_TLS_DIR": str(ca / "admin"), "DOMINATOR_IMAGESERVER": server.address}


@pytest.fixture
def keys(tmp_path: Path, ca: Path) -> dict[str, Path]:
    """Private keys old, new and stranger; the folder `trusted` holds old and new."""
    out, trusted = tmp_path / "keys", tmp_path / "trusted"
    trusted.mkdir()
    made = {}
    for name in ("old", "new", "stranger"):
        cli("keys", "create", name, "--out", str(out), check=True,
            env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
        made[name] = out / f"{name}.key"
    for name in ("old", "new"):  # a rotation: both trusted while images move over
        shutil.copy(out / f"{name}.pub", trusted)
    made["trusted"] = trusted
    return made


def add_image(ca: Path, server: Daemon, name: str, source: Path, key: Path | None) -> None:
    cli("image", "add", name, str(source), *(["--sign-key", str(key)] if key else []),
        env=env_for(ca, server), check=True)


def push(ca: Path, sub: Daemon, image: str, *servers: Daemon
         ) -> subprocess.CompletedProcess[str]:
    flags = [arg for server in servers for arg in ("--imageserver", server.address)]
    return cli("sub", "push-image", sub.address, image, *flags,
               env={"DOMINATOR_TLS_DIR": str(ca / "admin")})


def tamper(server: Daemon, name: str) -> None:
    """Rewrite the stored manifest of `name` on a stopped server: the tool becomes
    setuid, the signature stays the original's (the server loads stored images as they
    are; only what it is sent is checked)."""
    assert server.state_dir is not None
    path = server.state_dir / "images" / name / ".image"
    image = image_from_proto(imageserver_pb2.Image.FromString(path.read_bytes()))
    ino = image.tree.lookup(TOOL)
    assert ino is not None
    inodes = dict(image.tree.inodes)
    inodes[ino] = dataclasses.replace(inodes[ino], mode=0o4755)
    tree = dataclasses.replace(image.tree, inodes=inodes)
    path.write_bytes(image_to_proto(dataclasses.replace(image, tree=tree)).SerializeToString())


@pytest.fixture
def second_server(tmp_path: Path, ca: Path) -> Iterator[Daemon]:
    """Another image server (not started), in us-east/dc1."""
    daemon = imageserver_daemon(tmp_path / "second-state", ca, tmp_path / "second.log",
                                "--location", "us-east/dc1")
    yield daemon
    daemon.stop()


def test_signed_images_converge_across_a_key_rotation_and_an_unsigned_one_is_refused(
        tmp_path: Path, ca: Path, imageserver: Daemon, keys: dict[str, Path],
        start_subd: Callable[..., Daemon]) -> None:
    add_image(ca, imageserver, "by-old", make_source(tmp_path / "a", "old key\n"), keys["old"])
    add_image(ca, imageserver, "by-new", make_source(tmp_path / "b", "new key\n"), keys["new"])
    add_image(ca, imageserver, "unsigned", make_source(tmp_path / "c", "unsigned\n"), None)
    add_image(ca, imageserver, "by-stranger", make_source(tmp_path / "d", "stranger\n"),
              keys["stranger"])
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root, "--trusted-keys", str(keys["trusted"]))

    for image, motd in (("by-old", "old key\n"), ("by-new", "new key\n")):
        result = push(ca, sub, image, imageserver)
        assert result.returncode == 0, result.stderr
        assert (root / "etc/motd").read_text() == motd
    assert stat.S_IMODE((root / TOOL.lstrip("/")).stat().st_mode) == 0o755
    assert "signed by trusted key new" in sub.log()

    for image, why in (("unsigned", "is unsigned"), ("by-stranger", "not trusted")):
        assert_one_line_error(push(ca, sub, image, imageserver), "requires signed images",
                              f"image {image}", imageserver.address, why, code=4)
        assert (root / "etc/motd").read_text() == "new key\n"  # nothing fetched or changed


def test_a_host_refuses_foreign_objects_and_updates_that_differ_from_the_manifest(
        tmp_path: Path, ca: Path, admin: Security, imageserver: Daemon,
        keys: dict[str, Path], start_subd: Callable[..., Daemon]) -> None:
    source = make_source(tmp_path / "src", "signed\n")
    add_image(ca, imageserver, "img", source, keys["new"])
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root, "--trusted-keys", str(keys["trusted"]))
    with ImageServerClient(imageserver.address, admin) as images:
        image = images.get_image("img")
    wanted = list(image.tree.object_sizes())
    foreign = hashlib.sha256(b"not in the image").digest()
    with SubClient(sub.address, admin) as client:
        for hashes, name, why in (([*wanted, foreign], "img", "not content of the signed"),
                                  (wanted, "", "names no image")):
            with pytest.raises(grpc.RpcError) as refused:
                client.fetch([imageserver.address], hashes, name)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "requires signed images" in str(refused.value.details())
            assert why in str(refused.value.details())
        assert client.poll(short=True)[0].fetch.objects_total == 0  # no fetch started

        client.fetch([imageserver.address], wanted, "img")
        assert client.wait_fetch(timeout=60).error == ""
        status, tree = client.poll()
        assert tree is not None
        # An update planned from a forged manifest (the tool setuid), and one that
        # deletes a path the image holds: refused whole, nothing changes.
        ino = image.tree.lookup(TOOL)
        assert ino is not None
        forged_inodes = {**image.tree.inodes,
                         ino: dataclasses.replace(image.tree.inodes[ino], mode=0o4755)}
        forged = dataclasses.replace(
            image, tree=dataclasses.replace(image.tree, inodes=forged_inodes))
        plan = plan_update(tree, forged, list(status.scan_exclusions))
        plan.servers = [imageserver.address]
        with pytest.raises(grpc.RpcError) as refused:
            client.update(plan)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = str(refused.value.details())
        assert "does not match the signed image img" in details and TOOL in details
        assert "mode" in details and "\n" not in details
        last = client.poll(short=True)[0].last_update
        assert not last.success and "does not match the signed image" in last.error
        assert not (root / "etc").exists()

        good = plan_update(tree, image, list(status.scan_exclusions))  # no servers given:
        client.update(good)  # those of the last fetch for the image
        assert (root / "etc/motd").read_text() == "signed\n"


def test_a_tampering_server_is_refused_and_skipped_for_the_next_in_the_ranked_list(
        tmp_path: Path, ca: Path, imageserver: Daemon, second_server: Daemon,
        keys: dict[str, Path], start_subd: Callable[..., Daemon]) -> None:
    source = make_source(tmp_path / "src", "signed\n")
    second_server.start()
    for server in (imageserver, second_server):
        add_image(ca, server, "img", source, keys["new"])
        add_image(ca, server, "plain", source, None)
    second_server.stop()
    tamper(second_server, "img")
    second_server.start()

    alone = tmp_path / "alone"
    alone.mkdir()
    sub = start_subd(alone, "--trusted-keys", str(keys["trusted"]))
    assert_one_line_error(push(ca, sub, "img", second_server), "requires signed images",
                          "no trusted copy of image img", second_server.address,
                          "does not verify", code=4)
    assert not (alone / "usr").exists()

    # A fleet whose host ranks the tampering server first (its location), the master
    # last: the host skips the tampered copy and converges on the master's manifest.
    (tmp_path / "fleet").mkdir()
    fleet = FleetUnderTest(
        tmp_path / "fleet", ca, imageserver,
        lambda root: start_subd(root, "--trusted-keys", str(keys["trusted"])), hosts=2,
        serve_args=("--imageserver", second_server.address))
    try:
        machines = [{"Hostname": name, "IpAddress": sub.address, "RequiredImage": image,
                     "Location": "us-east/dc1/r1"}
                    for name, sub, image in zip(fleet.names, fleet.subs, ("img", "plain"),
                                                strict=True)]
        (tmp_path / "machines.json").write_text(json.dumps(machines))
        fleet.run("mdb", "import", str(tmp_path / "machines.json"))
        fleet.wait_status(fleet.names[:1], "synced", "img", timeout=120)
        host = fleet.roots[0]
        assert (host / "etc/motd").read_text() == "signed\n"
        assert stat.S_IMODE((host / TOOL.lstrip("/")).stat().st_mode) == 0o755
        skipped = [line for line in fleet.subs[0].log().splitlines()
                   if f"image img from image server {second_server.address} not used" in line]
        assert skipped and "does not verify" in skipped[0]
        # The dominator (no --trusted-keys of its own) sends the unsigned image: the
        # host refuses it and the dominator says why.
        held = fleet.wait_status(fleet.names[1:], "image not trusted")[fleet.names[1]]
        assert "requires signed images" in held["last_error"]
        assert "image plain is unsigned" in held["last_error"]
        assert not (fleet.roots[1] / "usr").exists()
    finally:
        fleet.stop()


def test_a_subd_certificate_without_getimage_says_to_reissue_it(
        tmp_path: Path, ca: Path, imageserver: Daemon, keys: dict[str, Path],
        start_subd: Callable[..., Daemon]) -> None:
    add_image(ca, imageserver, "img", make_source(tmp_path / "src", "signed\n"), keys["new"])
    old_identity = tmp_path / "old-subd"
    issue("subd", ["ObjectServer.GetObjects", "ObjectServer.CheckObjects"], ca, old_identity)
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root, "--trusted-keys", str(keys["trusted"]),
                     "--tls-dir", str(old_identity))
    assert_one_line_error(push(ca, sub, "img", imageserver), "ImageServer.GetImage",
                          "re-issue the subd certificate", "dominator certs issue", code=4)


def run_subd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "subd.main", *args], capture_output=True,
                          text=True, timeout=60, cwd=PROJECT)


def test_subd_documents_trusted_keys_and_refuses_a_bad_folder(
        tmp_path: Path, ca: Path, keys: dict[str, Path]) -> None:
    assert "--trusted-keys" in run_subd("--help").stdout
    root = tmp_path / "root"
    root.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(keys["trusted"] / "new.pub", bad)
    (bad / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n")
    base = ("--root", str(root), "--tls-dir", str(ca / "subd"), "--port", "0")
    for folder, why in ((tmp_path / "missing", "cannot read trusted keys folder"),
                        (empty, "no trusted keys"), (bad, "broken.pub"),
                        (keys["old"], "cannot read trusted keys folder")):  # a file
        assert_one_line_error(run_subd(*base, "--trusted-keys", str(folder)), why)
    assert not (root / ".subd").exists()  # refused before anything was made
