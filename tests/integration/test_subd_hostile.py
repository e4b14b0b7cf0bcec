"""subd against a hostile local user, with real daemons (issue 9): FIFOs and
devices where files were must never hang GetFiles or a fetch, and a scan that
cannot complete is reported in Poll."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.scan import scan_directory
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, cli
from fleetlib.wire import subd_pb2
from subd.client import SubClient
from subd.fetcher import Fetcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod)")


def unblock(fifo: Path) -> None:
    """Let a reader stuck opening or reading `fifo` go on (it then sees end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_get_files_of_a_fifo_a_device_or_a_directory_fails_promptly(
        tmp_path: Path, admin: Security, start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello\n")
    os.mkfifo(root / "etc" / "fifo")
    os.mknod(root / "etc" / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    sub = start_subd(root)
    try:
        with SubClient(sub.address, admin) as client:
            for path, kind in (("/etc/fifo", "fifo"), ("/etc/zero", "char_device"),
                               ("/etc", "directory")):
                request = subd_pb2.GetFilesRequest(paths=[os.fsencode(path)])
                with pytest.raises(grpc.RpcError) as failed:
                    list(client.stub.GetFiles(request, timeout=10))
                error = failed.value
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
                assert path in error.details() and "not a regular file" in error.details()
                assert kind in error.details() and "\n" not in error.details()
            assert client.get_files(["/etc/motd"]) == {"/etc/motd": b"hello\n"}
    finally:
        unblock(root / "etc" / "fifo")


def test_a_local_copy_from_a_file_swapped_for_a_fifo_fetches_from_the_server(
        tmp_path: Path, admin: Security, cli_env: dict[str, str], imageserver: Daemon) -> None:
    content = os.urandom(50_000)
    image = tmp_path / "image"
    image.mkdir()
    (image / "data").write_bytes(content)
    cli("image", "add", "img", str(image), env=cli_env, check=True)
    root = tmp_path / "host"
    root.mkdir()
    (root / "copy").write_bytes(content)  # the host holds the object: a local copy
    tree = scan_directory(root)
    digest = tree.inodes[tree.lookup("/copy")].hash
    (root / "copy").unlink()
    os.mkfifo(root / "copy")  # ... swapped for a FIFO since the scan
    cache = ObjectStore(root / ".subd" / "objects")
    fetcher = Fetcher(root, cache, admin, 100, lambda: tree, lambda: None)

    async def fetch() -> None:
        fetcher.start([imageserver.address], [digest])
        await asyncio.wait_for(fetcher.wait(), 20)

    rescue = threading.Timer(25, unblock, [root / "copy"])  # lets a stuck copy end
    rescue.start()
    try:
        asyncio.run(fetch())
    except TimeoutError:
        pytest.fail("the fetch hung on a FIFO")
    finally:
        rescue.cancel()
    assert fetcher.progress.error == ""
    assert fetcher.progress.bytes_copied_locally == 0
    assert cache.has(digest)


def wait_poll(client: SubClient, done: Callable[[subd_pb2.SubStatus], bool],
              timeout: float = 30) -> subd_pb2.SubStatus:
    deadline = time.monotonic() + timeout
    while True:
        status, _ = client.poll(short=True)
        if done(status):
            return status
        assert time.monotonic() < deadline, f"Poll never showed it: {status}"
        time.sleep(0.2)


def test_a_scan_that_cannot_complete_is_reported_in_poll(
        tmp_path: Path, admin: Security, start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    root.mkdir()
    (root / "file").write_text("x")
    sub = start_subd(root)
    with SubClient(sub.address, admin) as client:
        status = client.wait_for_scan(0)
        assert status.scan_error == ""
        away = tmp_path / "away"
        root.rename(away)  # ROOT unreadable: every pass fails
        try:
            failing = wait_poll(client, lambda s: s.scan_error != "")
        finally:
            away.rename(root)
        assert str(root) in failing.scan_error and "\n" not in failing.scan_error
        recovered = wait_poll(client, lambda s: s.scan_error == "")
        assert recovered.scan_count > failing.scan_count
