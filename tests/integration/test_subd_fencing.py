"""Fencing against a real subd over mutual TLS (issue 11): a mutating call carrying an
older lease token than subd has accepted is refused in one line and changes nothing;
the same token and newer ones pass; the highest survives SIGKILL; unfenced calls pass,
unless subd runs with --require-fence; a corrupt fence file is kept aside and the next
token rules."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.fstree.diff import Change, DiffEntry, TreeDiff
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.tree import regular
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, cli, free_port
from fleetlib.wire import subd_pb2
from subd.changes import UpdatePlan, plan_to_proto
from subd.client import SubClient
from subd.fence import FENCE_FILE, FenceToken

A5, A6, A7 = (FenceToken("dominator-a", token) for token in (5, 6, 7))
B4, B6 = FenceToken("dominator-b", 4), FenceToken("dominator-b", 6)


def file_plan(image: str, path: str, data: bytes, inline: bool = True) -> UpdatePlan:
    """An update adding one file (its content inline, or fetched beforehand)."""
    inode = regular(0o644, 0, 0, 1_700_000_000_000_000_000, len(data),
                    hashlib.sha256(data).digest())
    return UpdatePlan(image, TreeDiff([DiffEntry(path, Change.ADD, None, inode)]), None,
                      inline_objects=[data] if inline else [])


def refused(call: Callable[[], object]) -> str:
    """The one-line message of a call subd refuses as fenced."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    message = str(err.value.details())
    assert "\n" not in message
    return message


def stale(old: FenceToken, new: FenceToken) -> str:
    return (f"fenced: token {old.token} from {old.owner} is older than {new.token} from "
            f"{new.owner} (a newer owner holds this host's shard)")


def metrics(port: int) -> dict[str, tuple[dict[str, str], float]]:
    """subd's fence samples: name -> (labels, value)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {sample.name: (sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples
            if "fence" in sample.name}


def test_older_tokens_are_refused_and_change_nothing(
        tmp_path: Path, admin: Security, cli_env: dict[str, str], imageserver: Daemon,
        start_subd: Callable[..., Daemon]) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    motd, issue = b"served by the image server\n", b"another object of the image\n"
    (image / "etc/motd").write_bytes(motd)
    (image / "etc/issue").write_bytes(issue)
    cli("image", "add", "web", str(image), env=cli_env, check=True)
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    metrics_port = free_port()
    sub = start_subd(root, "--metrics-port", str(metrics_port))
    server = [imageserver.address]
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        assert not client.poll(short=True)[0].HasField("fence")
        client.fetch(server, [hashlib.sha256(motd).digest()], "web", fence=A5)
        client.wait_fetch()
        assert client.update(file_plan("web", "/etc/motd", motd, inline=False),
                             fence=A5).success
        assert (root / "etc/motd").read_bytes() == motd
        before = client.poll(short=True)[0]

        # dominator-b's lease (token 4) is older than dominator-a's (5): refused, no trace
        assert refused(lambda: client.update(file_plan("stale", "/etc/stale", b"x\n"),
                                             fence=B4)) == stale(B4, A5)
        unary = plan_to_proto(file_plan("stale", "/etc/stale", b"x\n"))
        unary.fence.CopyFrom(B4.to_proto())
        assert refused(lambda: client.stub.Update(unary, timeout=30)  # the unary form
                       ) == stale(B4, A5)
        assert refused(lambda: client.fetch(server, [hashlib.sha256(issue).digest()], "web",
                                            fence=B4)) == stale(B4, A5)
        after = client.poll(short=True)[0]
        assert not (root / "etc/stale").exists()
        assert after.last_update == before.last_update  # no outcome recorded either
        assert after.cached_objects == before.cached_objects  # no object came
        assert not after.fetch.in_progress and after.fetch == before.fetch
        assert after.fence == A5.to_proto()

        assert client.update(file_plan("web", "/etc/again", b"same lease\n"),
                             fence=A5).success  # the same token: the same lease
        assert client.update(file_plan("web", "/etc/newer", b"new lease\n"),
                             fence=B6).success  # dominator-b took the shard over
        assert (root / "etc/again").exists() and (root / "etc/newer").exists()
        assert refused(lambda: client.update(file_plan("web", "/etc/late", b"late\n"),
                                             fence=A5)) == stale(A5, B6)
        assert not (root / "etc/late").exists()
        status = client.poll(short=True)[0]
    assert status.fence == B6.to_proto() and status.fence_error == ""
    assert json.loads((root / ".subd" / FENCE_FILE).read_text()) == {"owner": "dominator-b",
                                                                   "token": 6}
    samples = metrics(metrics_port)
    assert samples["subd_fence_token"] == ({"owner": "dominator-b"}, 6.0)
    assert samples["subd_fenced_calls_refused_total"] == ({}, 4.0)
    assert "fetch refused: fenced: token 4 from dominator-b" in sub.log()


def test_the_highest_survives_sigkill_and_unfenced_calls_pass(
        tmp_path: Path, admin: Security, start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    sub = start_subd(root)
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        client.set_configuration(subd_pb2.Configuration(cpu_percent=40), fence=A6)
        assert client.update(file_plan("web", "/etc/motd", b"cached\n"), fence=A6).success
    sub.kill()
    sub = start_subd(root)
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        assert client.poll(short=True)[0].fence == A6.to_proto()
        # SetConfiguration fenced: an older token leaves the configuration alone
        assert refused(lambda: client.set_configuration(
            subd_pb2.Configuration(cpu_percent=30), fence=B4)) == stale(B4, A6)
        assert client.get_configuration().cpu_percent == 50  # the flag's value again
        assert client.set_configuration(subd_pb2.Configuration(cpu_percent=30),
                                        fence=A7).cpu_percent == 30
        # Cleanup fenced: an older token removes nothing
        cache = ObjectStore(root / ".subd" / "objects")
        digest = cache.add_bytes(b"an object no image needs\n")
        assert refused(lambda: client.cleanup_all_but([], fence=A6)) == stale(A6, A7)
        assert cache.has(digest)
        # unfenced calls (an operator's `dominator sub ...`) still pass, logged
        assert client.set_configuration(subd_pb2.Configuration(cpu_percent=20)
                                        ).cpu_percent == 20
        assert client.update(file_plan("manual", "/etc/manual", b"by hand\n")).success
        assert client.cleanup_all_but([]) == 1 and not cache.has(digest)
        client.cleanup_all_but([], fence=A7)
        assert client.poll(short=True)[0].fence == A7.to_proto()
    assert (root / "etc/manual").read_bytes() == b"by hand\n"
    assert "unfenced configuration change accepted" in sub.log()
    assert "unfenced update accepted" in sub.log()


def test_require_fence_refuses_every_unfenced_mutating_call(
        tmp_path: Path, admin: Security, cli_env: dict[str, str], imageserver: Daemon,
        start_subd: Callable[..., Daemon]) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    motd = b"served by the image server\n"
    (image / "etc/motd").write_bytes(motd)
    cli("image", "add", "web", str(image), env=cli_env, check=True)
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    metrics_port = free_port()
    sub = start_subd(root, "--require-fence", "--metrics-port", str(metrics_port))
    server, digest = [imageserver.address], hashlib.sha256(motd).digest()
    cache = ObjectStore(root / ".subd" / "objects")
    kept = cache.add_bytes(b"an object no image needs\n")

    def unfenced(what: str) -> str:
        return (f"unfenced: {what} without a fence refused (subd runs with --require-fence: "
                "only a dominator holding this host's lease may change it)")
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        before = client.poll(short=True)[0]
        assert refused(lambda: client.fetch(server, [digest], "web")) == unfenced("fetch")
        assert refused(lambda: client.update(file_plan("web", "/etc/motd", motd))
                       ) == unfenced("update")
        assert refused(lambda: client.stub.Update(plan_to_proto(file_plan(
            "web", "/etc/motd", motd)), timeout=30)) == unfenced("update")  # the unary form
        assert refused(lambda: client.cleanup_all_but([])) == unfenced("cleanup")
        assert refused(lambda: client.set_configuration(subd_pb2.Configuration(cpu_percent=30))
                       ) == unfenced("configuration change")
        after = client.poll(short=True)[0]
        assert not (root / "etc/motd").exists() and cache.has(kept)
        assert after.last_update == before.last_update and after.fetch == before.fetch
        assert client.get_configuration().cpu_percent == 50
        assert not after.HasField("fence")  # nothing recorded
        # The operator's CLI gets the same line (exit 4: refused by a precondition).
        config = cli("sub", "config", sub.address, "--set", "cpu_percent=30", env=cli_env)
        assert config.returncode == 4, (config.stdout, config.stderr)
        assert "unfenced: configuration change without a fence refused" in config.stderr
        assert "Traceback" not in config.stderr

        # A dominator's fenced calls pass, and older tokens are still refused.
        client.fetch(server, [digest], "web", fence=A5)
        client.wait_fetch()
        assert client.update(file_plan("web", "/etc/motd", motd, inline=False),
                             fence=A5).success
        assert client.cleanup_all_but([digest], fence=A6) == 1 and not cache.has(kept)
        assert client.set_configuration(subd_pb2.Configuration(cpu_percent=30),
                                        fence=A6).cpu_percent == 30
        assert refused(lambda: client.set_configuration(
            subd_pb2.Configuration(cpu_percent=20), fence=B4)) == stale(B4, A6)
        # Reads never need a fence.
        assert client.get_configuration().cpu_percent == 30
    assert (root / "etc/motd").read_bytes() == motd
    samples = metrics(metrics_port)
    assert samples["subd_unfenced_calls_refused_total"] == ({}, 6.0)
    assert samples["subd_fenced_calls_refused_total"] == ({}, 1.0)
    assert "mutating calls without a fence refused" in sub.log()


def test_a_corrupt_fence_file_is_kept_aside_and_the_next_token_rules(
        tmp_path: Path, admin: Security, start_subd: Callable[..., Daemon]) -> None:
    root = tmp_path / "host"
    (root / ".subd").mkdir(parents=True, mode=0o700)
    (root / ".subd" / FENCE_FILE).write_bytes(b'{"owner": "dominator-a", "tok')  # torn
    sub = start_subd(root)
    with SubClient(sub.address, admin) as client:
        status = client.poll(short=True)[0]
        assert not status.HasField("fence")
        assert "unreadable" in status.fence_error and "kept as fence.json.corrupt-" \
            in status.fence_error
        client.set_configuration(subd_pb2.Configuration(cpu_percent=40), fence=B4)
        assert refused(lambda: client.set_configuration(
            subd_pb2.Configuration(cpu_percent=30),
            fence=FenceToken("dominator-c", 3))) == stale(FenceToken("dominator-c", 3), B4)
        status = client.poll(short=True)[0]
    assert status.fence == B4.to_proto() and status.fence_error == ""
    aside = list((root / ".subd").glob(f"{FENCE_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().endswith(b'"tok')
    assert "ERROR" in sub.log() and "unreadable" in sub.log()


def test_racing_owners_are_serialized(tmp_path: Path, admin: Security,
                                      start_subd: Callable[..., Daemon]) -> None:
    """The former owner keeps firing while the new one takes over: once the new owner's
    call was answered, no call of the former one sent later gets through."""
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    old, new = FenceToken("dominator-a", 10), FenceToken("dominator-b", 11)
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        client.set_configuration(subd_pb2.Configuration(cpu_percent=40), fence=old)
        late: list[str] = []  # the former owner's calls sent after the takeover
        takeover = threading.Event()

        def former_owner() -> None:
            for _ in range(300):
                sent_after = takeover.is_set()
                try:
                    client.set_configuration(subd_pb2.Configuration(cpu_percent=41),
                                             fence=old)
                    late.extend(["accepted"] if sent_after else [])
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                    late.extend([err.details()] if sent_after else [])

        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(former_owner) for _ in range(4)]
            client.set_configuration(subd_pb2.Configuration(cpu_percent=42), fence=new)
            takeover.set()
            for call in calls:
                call.result()
        assert late and set(late) == {stale(old, new)}
        assert client.poll(short=True)[0].fence == new.to_proto()
