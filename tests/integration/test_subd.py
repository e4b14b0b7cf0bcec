"""subd as a real daemon, converged by `dominator sub push-image` from a real image
server: birth, filters, triggers, refusals, free space, forged objects, SIGKILL at
random moments, and a non-root agent."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.diff import Change, DiffEntry, TreeDiff
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.tree import Kind, regular
from fleetlib.testing.daemons import PROJECT, Daemon, assert_one_line_error, cli
from fleetlib.testing.trees import make_tree, rsync_differences
from subd.changes import UpdatePlan
from subd.client import SubClient

needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


def add_image(env: dict[str, str], name: str, source: Path, *extra: str) -> None:
    cli("image", "add", name, str(source), *extra, env=env, check=True)


def push(env: dict[str, str], sub: Daemon, image: str, *extra: str
         ) -> subprocess.CompletedProcess[str]:
    return cli("sub", "push-image", sub.address, image, *extra, env=env)


def copy_tree(source: Path, dest: Path) -> None:
    """cp -a: devices, fifos, xattrs and hard links included."""
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)


def tree_of(root: Path) -> dict[str, tuple]:
    """Path -> comparable inode facts, without subd's own state."""
    tree = scan_directory(root, exclude=lambda p: p == "/.subd")
    return {path: (i.kind, i.mode, i.uid, i.gid, i.hash, i.target)
            for path, _, i in tree.walk()}


def test_birth_on_empty_root_and_idempotence(tmp_path: Path, cli_env: dict[str, str],
                                             start_subd: Callable[..., Daemon]) -> None:
    image_root = make_tree(tmp_path / "image")
    add_image(cli_env, "base", image_root)
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    pushed = push(cli_env, sub, "base", "--json")
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["success"] and report["paths_changed"] > 10
    assert tree_of(root) == tree_of(image_root)
    if shutil.which("rsync"):
        assert rsync_differences(image_root, root, "/.subd") == ""
    again = push(cli_env, sub, "base")
    assert again.returncode == 0 and "already matches" in again.stdout
    polled = json.loads(cli("sub", "poll", sub.address, "--json", env=cli_env,
                            check=True).stdout)
    assert polled["last_successful_image"] == "base"
    assert polled["last_update"]["success"] is True


def test_filtered_paths_are_left_alone_and_triggers_fire(
        tmp_path: Path, cli_env: dict[str, str], start_subd: Callable[..., Daemon],
        trigger_log: Path) -> None:
    image_a = make_tree(tmp_path / "a")
    (image_a / "etc/nginx").mkdir()
    (image_a / "etc/nginx/nginx.conf").write_text("worker_processes 1;\n")
    (tmp_path / "triggers.json").write_text(json.dumps([
        {"MatchLines": ["/etc/nginx/.*", "/usr/sbin/nginx"], "Service": "nginx"},
        {"MatchLines": ["/etc/ssh/.*"], "Service": "ssh"},
        {"MatchLines": ["/etc/ssl/.*"], "Service": "certs", "DoReload": True}]))
    (tmp_path / "filter").write_text("/etc/hostname\n/var/lib/.*\n")
    add_image(cli_env, "a", image_a, "--filter", str(tmp_path / "filter"),
              "--triggers", str(tmp_path / "triggers.json"))
    root = tmp_path / "host"
    copy_tree(image_a, root)
    (root / "etc/hostname").write_text("this-host\n")           # differs, filtered
    (root / "var/lib/local-state").write_text("keep me\n")       # extra, filtered
    (root / "etc/stray").write_text("not in the image\n")        # extra, owned
    sub = start_subd(root)
    image_b = tmp_path / "b"
    copy_tree(image_a, image_b)
    (image_b / "etc/nginx/nginx.conf").write_text("worker_processes 4;\n")
    (image_b / "etc/ssl/cert.pem").write_bytes(os.urandom(3000))
    add_image(cli_env, "b", image_b, "--filter", str(tmp_path / "filter"),
              "--triggers", str(tmp_path / "triggers.json"))
    diff = cli("sub", "diff", sub.address, "b", "--json", env=cli_env)
    assert diff.returncode == 1
    plan = json.loads(diff.stdout)
    assert plan["triggers"] == ["certs", "nginx"] and plan["deleted"] == 1
    pushed = push(cli_env, sub, "b")
    assert pushed.returncode == 0, pushed.stderr
    assert (root / "etc/hostname").read_text() == "this-host\n"
    assert (root / "var/lib/local-state").read_text() == "keep me\n"
    assert not (root / "etc/stray").exists()
    assert (root / "etc/nginx/nginx.conf").read_text() == "worker_processes 4;\n"
    log = trigger_log.read_text().splitlines()
    assert log.index("stop nginx") < log.index("start nginx")
    assert "reload certs" in log and "stop certs" not in log
    assert not any("ssh" in line for line in log)


def test_refusals_change_nothing(tmp_path: Path, cli_env: dict[str, str],
                                 start_subd: Callable[..., Daemon]) -> None:
    big = make_tree(tmp_path / "big")
    add_image(cli_env, "big", big)
    tiny = tmp_path / "tiny"
    (tiny / "etc").mkdir(parents=True)
    (tiny / "etc" / "hostname").write_text("golden\n")
    add_image(cli_env, "tiny", tiny)
    root = tmp_path / "host"
    copy_tree(big, root)
    sub = start_subd(root)
    before = tree_of(root)
    refused = push(cli_env, sub, "tiny")
    assert_one_line_error(refused, "more than half", code=4)  # a safety rule
    assert tree_of(root) == before
    forced = push(cli_env, sub, "tiny", "--disable-safety-check")
    assert forced.returncode == 0, forced.stderr
    assert tree_of(root) == tree_of(tiny)


def test_forged_object_from_image_server_is_refused(
        tmp_path: Path, cli_env: dict[str, str], imageserver: Daemon,
        start_subd: Callable[..., Daemon]) -> None:
    source = tmp_path / "image"
    source.mkdir()
    content = os.urandom(50_000)
    (source / "payload").write_bytes(content)
    add_image(cli_env, "forged", source)
    digest = hashlib.sha256(content).hexdigest()
    assert imageserver.state_dir is not None
    stored = imageserver.state_dir / "objects" / digest[:2] / digest[2:4] / digest[4:]
    stored.write_bytes(os.urandom(50_000))  # bit rot or a compromised server
    root = tmp_path / "host"
    root.mkdir()
    sub = start_subd(root)
    refused = push(cli_env, sub, "forged")
    assert_one_line_error(refused, "does not match its hash")
    assert sorted(p.name for p in root.iterdir()) == [".subd"]
    cache = root / ".subd" / "objects"
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_insufficient_space_is_refused_before_fetching(
        tmp_path: Path, cli_env: dict[str, str], start_subd: Callable[..., Daemon]) -> None:
    source = tmp_path / "image"
    source.mkdir()
    (source / "large").write_bytes(os.urandom(6 << 20))
    add_image(cli_env, "large", source)
    root = tmp_path / "small-fs"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        sub = start_subd(root)
        refused = push(cli_env, sub, "large")
        assert_one_line_error(refused, "insufficient space")
        assert sorted(p.name for p in root.iterdir()) == [".subd"]
        sub.stop()
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_non_root_subd_converges_what_it_may(tmp_path: Path, cli_env: dict[str, str],
                                             ca: Path, start_subd: Callable[..., Daemon]
                                             ) -> None:
    source = make_tree(tmp_path / "image")
    for path in (source / "dev").iterdir():
        path.unlink()  # device nodes need root to make; this test is about ownership
    add_image(cli_env, "owned", source)
    nobody = 65534
    home = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="subd-nobody-"))
    try:
        os.chown(home, nobody, nobody)
        root = home / "root"
        root.mkdir()
        tls = home / "tls"
        shutil.copytree(ca / "subd", tls)
        for path in [root, tls, *tls.iterdir()]:
            os.chown(path, nobody, nobody)
        sub = start_subd(root, "--tls-dir", str(tls), user=nobody)
        pushed = push(cli_env, sub, "owned", "--json")
        assert pushed.returncode == 0, pushed.stderr
        report = json.loads(pushed.stdout)
        assert any("owner" in warning for warning in report["warnings"]), report
        for path in ("etc/hostname", "usr/bin/passwd", "etc/ssl/cert.pem", "var/lib/app.db"):
            assert (root / path).read_bytes() == (source / path).read_bytes()
        assert (root / "var/lib/app.db").stat().st_uid == nobody  # could not chown: reported
        assert sub.process is not None and sub.process.poll() is None, "subd must not crash"
        sub.stop()
    finally:
        shutil.rmtree(home)


def regular_contents(*roots: Path) -> dict[str, set[bytes]]:
    """Every acceptable content hash per path across the given trees."""
    allowed: dict[str, set[bytes]] = {}
    for root in roots:
        for path, _, inode in scan_directory(root, exclude=lambda p: p == "/.subd").walk():
            if inode.kind == Kind.REGULAR:
                allowed.setdefault(path, set()).add(inode.hash)
    return allowed


@needs_rsync
def test_sigkill_at_random_moments_then_converge(
        tmp_path: Path, cli_env: dict[str, str], start_subd: Callable[..., Daemon]) -> None:
    image_a = make_tree(tmp_path / "a")
    for index in range(60):
        (image_a / "usr/bin" / f"tool{index}").write_bytes(os.urandom(200_000))
    image_b = tmp_path / "b"
    copy_tree(image_a, image_b)
    for index in range(0, 60, 2):
        (image_b / "usr/bin" / f"tool{index}").write_bytes(os.urandom(210_000))
    for index in range(30):
        (image_b / "etc" / f"new{index}.conf").write_bytes(os.urandom(100_000))
    shutil.rmtree(image_b / "etc/ssl")
    add_image(cli_env, "a", image_a)
    add_image(cli_env, "b", image_b)
    allowed = regular_contents(image_a, image_b)
    root = tmp_path / "host"
    copy_tree(image_a, root)
    sub = start_subd(root)
    rng = random.Random(1234)
    for attempt in range(20):
        target = "b" if attempt % 2 == 0 else "a"
        pusher = subprocess.Popen(
            [sys.executable, "-m", "dominator.cli", "sub", "push-image", sub.address, target],
            cwd=PROJECT, env={**os.environ, **cli_env}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.6))
        sub.kill()
        pusher.wait(timeout=60)
        for path, _, inode in scan_directory(root, exclude=lambda p: p == "/.subd").walk():
            if inode.kind == Kind.REGULAR:
                assert inode.hash in allowed.get(path, set()), \
                    f"attempt {attempt}: {path} holds content no image has (partial write?)"
        sub.start()
    final = push(cli_env, sub, "b")
    assert final.returncode == 0, final.stderr
    assert rsync_differences(image_b, root, "/.subd") == ""


def test_update_refuses_paths_escaping_root(tmp_path: Path, admin,
                                           start_subd: Callable[..., Daemon]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "link").symlink_to(outside)
    sub = start_subd(root)
    payload = regular(0o644, 0, 0, 0, 0, b"")
    with SubClient(sub.address, admin) as client:
        client.wait_for_scan(0)
        before = tree_of(root)
        for path, reason in (("/etc/../../escape", "escapes"),
                             ("/link/evil", "symlink"),
                             ("/.subd/state.json", ".subd")):
            plan = UpdatePlan("evil", TreeDiff([DiffEntry(path, Change.ADD, None, payload)]),
                              None)
            with pytest.raises(grpc.RpcError) as refused:
                client.update(plan)
            assert reason in refused.value.details(), refused.value.details()
    assert tree_of(root) == before
    assert list(outside.iterdir()) == []
