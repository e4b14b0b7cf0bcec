"""Updates larger than one gRPC message (issue 9, defect 2): a first sync of a
40,000-file image whose update is half again over the 8 MiB cap, and a 20 MiB computed
file, both through Subd.UpdateStream against a real subd, where the unary Update (capped
at 8 MiB) fails."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.diff import Change, DiffEntry, TreeDiff, diff_trees
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.tree import Tree, regular
from fleetlib.rpc.tls import MAX_MESSAGE_BYTES
from fleetlib.testing.daemons import Daemon, cli
from fleetlib.testing.trees import rsync_differences
from fleetlib.wire import subd_pb2, subd_pb2_grpc
from fleetlib.wire.tree_pb2 import Chunk
from subd.changes import UpdatePlan, plan_to_proto
from subd.client import AsyncSubClient, SubClient, encode_update
from tests.integration.test_tree_limits import serving

# An update carries every path whole: long names make it big with few files (each
# file costs seconds of CPU in image add and the push, on a busy 2-core machine).
DIRS, FILES_PER_DIR = 100, 400  # 40,000 files, paths of about 250 bytes: ~12 MiB
DIR_PAD, FILE_PAD = "d" * 140, "f" * 80


def many_files(root: Path) -> Path:
    """DIRS folders of FILES_PER_DIR distinct files of about 50 bytes each."""
    for d in range(DIRS):
        folder = root / f"directory-{d:04d}-{DIR_PAD}"
        folder.mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            (folder / f"file-number-{f:04d}-{FILE_PAD}.conf").write_bytes(
                b"setting-%04d-%04d = some fifty bytes of value\n" % (d, f))
    return root


@pytest.mark.slow  # minutes on a busy 2-core machine (image add, then the push)
@pytest.mark.timeout(1800)
def test_first_sync_larger_than_one_message_converges(
        tmp_path: Path, cli_env: dict[str, str], start_subd: Callable[..., Daemon]) -> None:
    started = time.monotonic()
    image_root = many_files(tmp_path / "image")
    image_tree = scan_directory(image_root)
    first_sync = diff_trees(Tree.empty(image_tree.inodes[image_tree.root]), image_tree, None)
    assert len(first_sync.entries) > DIRS * FILES_PER_DIR
    size = len(encode_update(UpdatePlan("many", first_sync, None)))
    assert size > 1.4 * MAX_MESSAGE_BYTES, size  # far more than one unary Update carries
    cli("image", "add", "many", str(image_root), env=cli_env, check=True, timeout=900)
    added = time.monotonic()
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    pushed = cli("sub", "push-image", sub.address, "many", env=cli_env, timeout=900)
    assert pushed.returncode == 0, pushed.stderr
    if shutil.which("rsync"):
        assert rsync_differences(image_root, root, "/.subd") == ""
    else:
        assert scan_directory(root, exclude=lambda p: p == "/.subd").fingerprint() \
            == image_tree.fingerprint()
    print(f"{DIRS * FILES_PER_DIR} files, {size} bytes of update: image added in "
          f"{added - started:.0f} s, "
          f"pushed in {time.monotonic() - added:.0f} s")


def test_20_mib_computed_file_travels_in_the_stream(tmp_path: Path, admin,
                                                    start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    sub = start_subd(root)
    data = os.urandom(20 << 20)
    inode = regular(0o600, 0, 0, 1_700_000_000_000_000_000, len(data),
                    hashlib.sha256(data).digest())
    plan = UpdatePlan("computed", TreeDiff([
        DiffEntry("/etc/rendered.bin", Change.ADD, None, inode)]), None, inline_objects=[data])
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        with pytest.raises(grpc.RpcError) as unary:  # the defect: one message, 8 MiB at most
            client.stub.Update(plan_to_proto(plan))
        assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not (root / "etc" / "rendered.bin").exists()
        result = client.update(plan)
    assert result.success, result.error
    assert (root / "etc" / "rendered.bin").read_bytes() == data
    assert (root / "etc" / "rendered.bin").stat().st_mode & 0o7777 == 0o600


def test_unary_update_still_serves_old_clients(tmp_path: Path, admin,
                                               start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    sub = start_subd(root)
    data = b"rendered by an old dominator\n"
    inode = regular(0o644, 0, 0, 0, len(data), hashlib.sha256(data).digest())
    plan = UpdatePlan("old", TreeDiff([DiffEntry("/etc/motd", Change.ADD, None, inode)]), None,
                      inline_objects=[data])
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        client.stub.Update(plan_to_proto(plan))
        assert client.poll(short=True)[0].last_update.success
    assert (root / "etc" / "motd").read_bytes() == data


def test_garbage_update_stream_is_refused_in_one_line(tmp_path: Path, admin,
                                                      start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        with pytest.raises(grpc.RpcError) as refused:
            client.stub.UpdateStream(iter([Chunk(data=b"\xff" * 100)]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "update stream is not a valid UpdateRequest"


class OlderSubd(subd_pb2_grpc.SubdServicer):
    """A subd from before UpdateStream: the unary Update only (UpdateStream is
    UNIMPLEMENTED, as the generated base class answers)."""

    def __init__(self) -> None:
        self.updates: list[subd_pb2.UpdateRequest] = []

    def Update(self, request: subd_pb2.UpdateRequest, context: grpc.ServicerContext
               ) -> subd_pb2.UpdateResponse:
        self.updates.append(request)
        return subd_pb2.UpdateResponse()

    def Poll(self, request: subd_pb2.PollRequest, context: grpc.ServicerContext):
        yield subd_pb2.PollResponse(status=subd_pb2.SubStatus(
            last_update=subd_pb2.UpdateResult(image_name="old", success=True)))


def test_an_older_subd_still_gets_updates_that_fit_one_message(ca: Path, admin) -> None:
    inode = regular(0o644, 0, 0, 0, 3, hashlib.sha256(b"new").digest())
    plan = UpdatePlan("with-new-subd", TreeDiff([
        DiffEntry("/usr/sbin/subd", Change.REPLACE, None, inode)]), None,
        inline_objects=[b"new"])
    older = OlderSubd()
    with serving(older, ca) as address:
        with SubClient(address, admin) as client:
            assert client.update(plan).success

        async def update() -> None:
            client = AsyncSubClient(address, admin)
            try:
                await client.update(plan)
            finally:
                await client.close()

        asyncio.run(update())
    assert older.updates == [plan_to_proto(plan)] * 2
