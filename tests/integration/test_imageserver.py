"""The image server daemon: crash safety under SIGKILL, verification of what
clients send, image streams, watching, expiry, and persistence across restarts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import TreeBuilder, regular
from fleetlib.rpc.chunks import split_message
from fleetlib.rpc.tls import Security, open_channel
from fleetlib.testing.daemons import PROJECT, Daemon, cli
from fleetlib.wire import (
    imageserver_pb2,
    imageserver_pb2_grpc,
    objectserver_pb2,
    objectserver_pb2_grpc,
)
from fleetlib.wire.codec import image_to_proto


def stubs(daemon: Daemon, security: Security):
    channel = open_channel(daemon.address, security, "imageserver")
    return (channel, imageserver_pb2_grpc.ImageServerStub(channel),
            objectserver_pb2_grpc.ObjectServerStub(channel))


def object_files(daemon: Daemon) -> list[Path]:
    assert daemon.state_dir is not None
    root = daemon.state_dir / "objects"
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name != ".tmp"]


def received_bytes(daemon: Daemon) -> int:
    """Bytes the server holds in objects and in objects still being written."""
    assert daemon.state_dir is not None
    total = 0
    for path in (daemon.state_dir / "objects").rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            total += path.stat().st_size if path.is_file() else 0
    return total


def assert_objects_intact(daemon: Daemon) -> None:
    """Every object at a final path holds exactly the bytes its name promises."""
    for path in object_files(daemon):
        name = "".join(path.relative_to(path.parents[2]).parts)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name, path


def test_forged_object_is_refused_and_not_stored(imageserver: Daemon, admin: Security) -> None:
    channel, _, objects = stubs(imageserver, admin)
    content = b"the real content" * 100
    forged = objectserver_pb2.ObjectChunk(hash=hashlib.sha256(b"other").digest(),
                                          size=len(content), data=content)
    with pytest.raises(grpc.RpcError) as refused:
        objects.AddObjects(iter([objectserver_pb2.ObjectChunks(chunks=[forged])]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match its hash" in refused.value.details()
    short = objectserver_pb2.ObjectChunk(hash=hashlib.sha256(content).digest(),
                                         size=len(content) + 1, data=content)
    with pytest.raises(grpc.RpcError):
        objects.AddObjects(iter([objectserver_pb2.ObjectChunks(chunks=[short])]))
    assert object_files(imageserver) == []
    channel.close()


def test_image_naming_missing_object_is_refused(imageserver: Daemon, admin: Security) -> None:
    channel, images, _ = stubs(imageserver, admin)
    builder = TreeBuilder()
    builder.add("/etc/motd", regular(0o644, 0, 0, 0, 5, hashlib.sha256(b"hello").digest()))
    message = image_to_proto(Image("ghost", builder.tree, EMPTY)).SerializeToString()
    with pytest.raises(grpc.RpcError) as refused:
        images.AddImage(split_message(message))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as garbage:
        images.AddImage(iter(split_message(b"\xff\xff\xff not a protobuf")))
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not images.CheckImage(imageserver_pb2.CheckImageRequest(name="ghost")).exists
    channel.close()


def test_watch_streams_adds_and_deletes(tmp_path: Path, imageserver: Daemon, admin: Security,
                                        cli_env: dict[str, str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    cli("image", "add", "old", str(tmp_path / "src"), env=cli_env, check=True)
    channel, images, _ = stubs(imageserver, admin)
    events: list[tuple[int, str]] = []
    stream = images.WatchImages(imageserver_pb2.WatchImagesRequest(include_existing=True))

    def read() -> None:
        try:
            for event in stream:
                events.append((event.kind, event.name))
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    cli("image", "add", "stream/v2", str(tmp_path / "src"), env=cli_env, check=True)
    cli("image", "delete", "old", "--force", env=cli_env, check=True)  # no dominator: no MDB
    deadline = time.monotonic() + 10
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stream.cancel()
    reader.join()
    added, deleted = imageserver_pb2.ImageEvent.ADDED, imageserver_pb2.ImageEvent.DELETED
    assert events == [(added, "old"), (added, "stream/v2"), (deleted, "old")]
    channel.close()


def test_images_expire_and_survive_restart(tmp_path: Path, imageserver: Daemon,
                                           cli_env: dict[str, str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(os.urandom(1000))
    cli("image", "add", "keep/me", str(tmp_path / "src"), env=cli_env, check=True)
    cli("image", "add", "short-lived", str(tmp_path / "src"), "--expires-in", "2",
        env=cli_env, check=True)
    deadline = time.monotonic() + 15
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [i["name"] for i in
                 json.loads(cli("image", "list", "--json", env=cli_env).stdout)]
        if names == ["keep/me"]:
            break
        time.sleep(0.5)
    assert names == ["keep/me"]
    imageserver.stop()
    imageserver.start()
    listed = json.loads(cli("image", "list", "--json", env=cli_env, check=True).stdout)
    assert [i["name"] for i in listed] == ["keep/me"]
    assert len(object_files(imageserver)) == 1  # still used by keep/me


def test_sigkill_mid_upload_leaves_no_corruption_and_add_resumes(
        tmp_path: Path, imageserver: Daemon, cli_env: dict[str, str]) -> None:
    source = tmp_path / "big"
    source.mkdir()
    for index in range(240):
        (source / f"file{index:03d}").write_bytes(os.urandom(1 << 20))
    for attempt, threshold_mib in enumerate((3, 60, 200)):
        upload = subprocess.Popen(
            [sys.executable, "-m", "dominator.cli", "image", "add", "big", str(source)],
            cwd=PROJECT, env={**os.environ, **cli_env}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while received_bytes(imageserver) < threshold_mib << 20 and upload.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        imageserver.kill()
        _, err = upload.communicate(timeout=60)
        if upload.returncode == 0:
            pytest.fail(f"upload finished before the kill at attempt {attempt}")
        assert "Traceback" not in err and err.strip().startswith("error:"), err
        assert_objects_intact(imageserver)
        imageserver.start()
        listed = cli("image", "list", "--json", env=cli_env, check=True)
        assert json.loads(listed.stdout) == []
        assert not any((imageserver.state_dir / "objects" / ".tmp").iterdir())  # recovered
    stored_before = len(object_files(imageserver))
    done = json.loads(cli("image", "add", "big", str(source), "--json", env=cli_env,
                          check=True).stdout)
    assert done["skipped_objects"] == stored_before > 0
    assert done["uploaded_objects"] == 240 - stored_before
    assert_objects_intact(imageserver)
    assert len(object_files(imageserver)) == 240
