"""Issue 9 (hardening) against real daemons: a full disk, malformed protobuf
requests, objects no image references, and a host root's /.subd as image source."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.image import Image
from fleetlib.fstree.source import DirectorySource
from fleetlib.fstree.tree import TreeBuilder
from fleetlib.rpc.chunks import split_message
from fleetlib.rpc.tls import Security, open_channel
from fleetlib.testing.daemons import (
    TRACEBACK_RE,
    Daemon,
    assert_one_line_error,
    cli,
    imageserver_daemon,
)
from fleetlib.wire import imageserver_pb2_grpc, objectserver_pb2, objectserver_pb2_grpc
from fleetlib.wire.codec import image_to_proto
from imageserver.client import ImageServerClient

HOUR = 3600


def tmpfs(folder: Path, size: str = "4m") -> None:
    """Mount a small tmpfs on `folder` (made if missing), or skip the test."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.strip()}")


def image_daemon(tmp_path: Path, ca: Path, state: Path, *extra: str) -> Daemon:
    return imageserver_daemon(state, ca, tmp_path / "imageserver.log", *extra)


def final_objects(state: Path) -> list[Path]:
    return [p for p in (state / "objects").rglob("*")
            if p.is_file() and p.parent.name != ".tmp"]


def assert_objects_intact(state: Path) -> None:
    """Every object at a final path holds exactly the bytes its name promises, and
    no temporary file is left (once the server has finished the refused calls)."""
    for path in final_objects(state):
        name = "".join(path.relative_to(path.parents[2]).parts)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name, path
    tmp = state / "objects" / ".tmp"
    deadline = time.monotonic() + 5
    while any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp.iterdir()) == []


def random_files(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"file{index:03d}").write_bytes(os.urandom(size))
    return folder


# --- (a) a full disk ------------------------------------------------------------------


@pytest.fixture
def small_imageserver(tmp_path: Path, ca: Path) -> Iterator[Daemon]:
    """An image server whose state dir is a 4 MiB tmpfs."""
    state = tmp_path / "small-state"
    tmpfs(state)
    daemon = image_daemon(tmp_path, ca, state)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["umount", str(state)], check=True)


@pytest.mark.parametrize("count, size", [(1, 6 << 20), (12, 512 << 10)],
                         ids=["one-object-too-big", "many-objects-fill-it"])
def test_full_disk_image_add_is_one_line_error(tmp_path: Path, ca: Path,
                                               small_imageserver: Daemon,
                                               count: int, size: int) -> None:
    source = random_files(tmp_path / "src", count, size)
    env = {"DOMINATOR_TLS_DIR": str(ca / "admin"),
           "DOMINATOR_IMAGESERVER": small_imageserver.address}
    refused = cli("image", "add", "big", str(source), env=env)
    assert_one_line_error(refused, "resource exhausted", "space",  # 3: retry once freed
                          str(small_imageserver.state_dir), "bytes", code=3)
    assert not TRACEBACK_RE.search(small_imageserver.log()), small_imageserver.log()
    assert_objects_intact(small_imageserver.state_dir)
    assert json.loads(cli("image", "list", "--json", env=env, check=True).stdout) == []


def test_full_disk_object_upload_is_resource_exhausted(tmp_path: Path, admin: Security,
                                                       small_imageserver: Daemon) -> None:
    source = DirectorySource(random_files(tmp_path / "src", 12, 512 << 10))
    with ImageServerClient(small_imageserver.address, admin) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.upload(source, source.tree.object_sizes())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = refused.value.details()
    assert "space" in details and str(small_imageserver.state_dir) in details, details
    assert "\n" not in details
    assert not TRACEBACK_RE.search(small_imageserver.log()), small_imageserver.log()
    assert_objects_intact(small_imageserver.state_dir)
    # What fits is still accepted after the refusal.
    small = DirectorySource(random_files(tmp_path / "small", 1, 1000))
    with ImageServerClient(small_imageserver.address, admin) as client:
        assert client.upload(small, small.tree.object_sizes()) == 1


# --- (b) malformed protobuf -----------------------------------------------------------

GARBAGE = b"\xff\xff\xff\xff not a protobuf"
MALFORMED_CALLS = {
    "imageserver": [("unary", "/fleet.ImageServer/ListImages"),
                    ("stream-out", "/fleet.ObjectServer/GetObjects"),
                    ("stream-in", "/fleet.ObjectServer/AddObjects")],
    "subd": [("unary", "/fleet.Subd/Fetch"), ("stream-out", "/fleet.Subd/Poll")],
}


def call_raw(daemon: Daemon, kind: str, method: str) -> grpc.RpcError:
    """Send GARBAGE as the request of `method`; the error the server answers."""
    channel = open_channel(daemon.address, daemon.security, daemon.role)
    try:
        if kind == "unary":
            call: Callable = channel.unary_unary(method)
            call(GARBAGE, timeout=10)
        elif kind == "stream-out":
            for _ in channel.unary_stream(method)(GARBAGE, timeout=10):
                pass
        else:
            channel.stream_unary(method)(iter([GARBAGE]), timeout=10)
    except grpc.RpcError as err:
        return err
    finally:
        channel.close()
    raise AssertionError(f"{method} accepted garbage")


@pytest.mark.parametrize("kind, method", MALFORMED_CALLS["imageserver"])
def test_malformed_request_to_imageserver_is_invalid_argument(imageserver: Daemon, kind: str,
                                                              method: str) -> None:
    err = call_raw(imageserver, kind, method)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "malformed" in err.details() and "\n" not in err.details()
    time.sleep(0.2)
    assert not TRACEBACK_RE.search(imageserver.log()), imageserver.log()
    assert "malformed" in imageserver.log()


@pytest.mark.parametrize("kind, method", MALFORMED_CALLS["subd"])
def test_malformed_request_to_subd_is_invalid_argument(tmp_path: Path, kind: str, method: str,
                                                       start_subd: Callable[..., Daemon]
                                                       ) -> None:
    (tmp_path / "root").mkdir()
    sub = start_subd(tmp_path / "root")
    err = call_raw(sub, kind, method)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "malformed" in err.details()
    time.sleep(0.2)
    assert not TRACEBACK_RE.search(sub.log()), sub.log()


# --- (c) objects no image references --------------------------------------------------


def age(paths: list[Path], seconds: float) -> None:
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def upload_only(daemon: Daemon, security: Security, folder: Path) -> set[Path]:
    """Upload a folder's objects without committing an image; their paths."""
    source = DirectorySource(folder)
    before = set(final_objects(daemon.state_dir))
    with ImageServerClient(daemon.address, security) as client:
        client.upload(source, source.tree.object_sizes())
    return set(final_objects(daemon.state_dir)) - before


@pytest.fixture
def collecting_imageserver(tmp_path: Path, ca: Path) -> Iterator[Daemon]:
    daemon = image_daemon(tmp_path, ca, tmp_path / "state", "--orphan-grace", "1h")
    daemon.start()
    yield daemon
    daemon.stop()


def test_orphans_are_collected_after_the_grace_period(tmp_path: Path, ca: Path,
                                                      admin: Security,
                                                      collecting_imageserver: Daemon) -> None:
    daemon = collecting_imageserver
    env = {"DOMINATOR_TLS_DIR": str(ca / "admin"), "DOMINATOR_IMAGESERVER": daemon.address}
    committed = random_files(tmp_path / "committed", 3, 1000)
    cli("image", "add", "kept", str(committed), env=env, check=True)
    image_objects = set(final_objects(daemon.state_dir))
    old = upload_only(daemon, admin, random_files(tmp_path / "old", 4, 2000))
    young = upload_only(daemon, admin, random_files(tmp_path / "young", 2, 3000))
    assert len(image_objects) == 3 and len(old) == 4 and len(young) == 2
    age(list(image_objects | old), 2 * HOUR)
    daemon.stop()
    daemon.start()  # the start-up pass
    assert set(final_objects(daemon.state_dir)) == image_objects | young
    assert "freed 4 orphaned object(s), 8000 bytes" in daemon.log()
    got = cli("image", "get", "kept", str(tmp_path / "out"), env=env, check=True)
    assert got.returncode == 0
    assert sorted(p.read_bytes() for p in (tmp_path / "out").iterdir()) == \
        sorted(p.read_bytes() for p in committed.iterdir())


def test_upload_racing_with_collection_ends_with_complete_image(
        tmp_path: Path, ca: Path, admin: Security) -> None:
    """Old orphans the client finds present (and so does not send again) must
    survive collections before its AddImage; new objects are young anyway."""
    daemon = image_daemon(tmp_path, ca, tmp_path / "state", "--orphan-grace", "1h",
                          "--orphan-interval", "1")
    daemon.start()
    try:
        folder = random_files(tmp_path / "src", 6, 4000)
        orphans = upload_only(daemon, admin, folder)
        unrelated = upload_only(daemon, admin, random_files(tmp_path / "other", 2, 100))
        age(list(orphans | unrelated), 2 * HOUR)
        random_files(folder / "new", 3, 5000)
        source = DirectorySource(folder)
        with ImageServerClient(daemon.address, admin) as client:
            missing = client.missing(source.tree.object_sizes())
            assert len(missing) == 3  # the 6 old orphans are present
            time.sleep(2.5)  # collections run
            assert not any(path.exists() for path in unrelated)  # they do collect
            client.upload(source, missing)
            time.sleep(2.5)
            client.add_image(Image("raced", source.tree, EMPTY))
            stored = client.get_image("raced")
        assert len(stored.tree.object_sizes()) == 9
        assert len(final_objects(daemon.state_dir)) == 9
        assert not TRACEBACK_RE.search(daemon.log()), daemon.log()
    finally:
        daemon.stop()


def test_orphan_options_in_help() -> None:
    shown = subprocess.run([sys.executable, "-m", "imageserver.main", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "--orphan-grace" in shown and "6h" in shown and "--orphan-interval" in shown


# --- (d) a host root's /.subd ---------------------------------------------------------


def test_image_add_of_a_host_root_leaves_out_its_subd_state(tmp_path: Path,
                                                            cli_env: dict[str, str]) -> None:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello\n")
    objects = root / ".subd" / "objects" / "ab" / "cd"
    objects.mkdir(parents=True)
    (objects / "ef01").write_bytes(os.urandom(3000))
    (root / "etc" / ".subd").mkdir()  # only the top-level one is subd's
    cli("image", "add", "host", str(root), env=cli_env, check=True)
    listing = cli("image", "show", "host", env=cli_env, check=True).stdout
    assert "/etc/motd" in listing and "/etc/.subd" in listing
    assert "/.subd" not in listing.replace("/etc/.subd", ""), listing
    report = json.loads(cli("image", "add", "host2", str(root), "--json", env=cli_env,
                            check=True).stdout)
    assert report["inodes"] == 4  # /, /etc, /etc/motd, /etc/.subd
    tarball = tmp_path / "host.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
    report = json.loads(cli("image", "add", "host3", str(tarball), "--json", env=cli_env,
                            check=True).stdout)
    assert report["inodes"] == 4 and report["uploaded_objects"] == 0


# --- siblings ------------------------------------------------------------------------


def test_object_vanishing_while_served_is_not_found(tmp_path: Path, imageserver: Daemon,
                                                    admin: Security) -> None:
    """An object deleted (image delete, orphan collection) after GetObjects checked it."""
    paths = sorted(upload_only(imageserver, admin, random_files(tmp_path / "src", 12, 1 << 20)))
    hashes = [bytes.fromhex("".join(p.relative_to(p.parents[2]).parts)) for p in paths]
    channel = open_channel(imageserver.address, admin, "imageserver")
    stream = objectserver_pb2_grpc.ObjectServerStub(channel).GetObjects(
        objectserver_pb2.GetObjectsRequest(hashes=hashes), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        for index, _ in enumerate(stream):
            if index == 0:
                paths[-1].unlink()
    channel.close()
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
    assert format_hash(hashes[-1]) in refused.value.details()
    time.sleep(0.2)
    assert not TRACEBACK_RE.search(imageserver.log()), imageserver.log()


@pytest.mark.parametrize("field, value", [("created_unix", -1), ("expires_unix", -5),
                                          ("created_unix", 1 << 62), ("expires_unix", 1 << 62)])
def test_image_with_impossible_time_is_refused(imageserver: Daemon, admin: Security,
                                               cli_env: dict[str, str], field: str,
                                               value: int) -> None:
    builder = TreeBuilder()
    message = image_to_proto(Image("timely", builder.tree, EMPTY))
    setattr(message, field, value)
    channel = open_channel(imageserver.address, admin, "imageserver")
    with pytest.raises(grpc.RpcError) as refused:
        imageserver_pb2_grpc.ImageServerStub(channel).AddImage(
            split_message(message.SerializeToString()))
    channel.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split("_")[0] in refused.value.details()
    assert cli("image", "list", env=cli_env, check=True).stdout == ""
