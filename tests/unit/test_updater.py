"""Tests of subd's updater, state and trigger runner on real directories: build the
sub's ROOT and a target tree, diff them, apply, and check that ROOT then equals
the target exactly (fingerprint and rsync), that every refusal changes nothing,
that triggers run around the change, and that a subd killed at any moment leaves
no partial file and converges on the next try."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.diff import Change, DiffEntry, TreeDiff, diff_trees
from fleetlib.fstree.filter import EMPTY, Filter
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.tree import Inode, Kind, Tree, regular, symlink
from fleetlib.fstree.triggers import make_trigger
from fleetlib.testing.trees import make_tree, rsync_differences
from subd.changes import UpdatePlan, plan_to_proto
from subd.state import SubdState, UpdateOutcome
from subd.trigger_runner import TriggerRunner, plan_actions
from subd.updater import Updater

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, mount)")

REPO = Path(__file__).resolve().parents[2]
SETCAP = "/usr/sbin/setcap"
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
T = 1_600_000_000_000_000_000
NOBODY = 65534


def not_subd(path: str) -> bool:
    return path == "/.subd" or path.startswith("/.subd/")


def scan_root(root: Path) -> Tree:
    """The sub's tree as its scanner sees it (without /.subd)."""
    return scan_directory(root, exclude=not_subd)


@dataclass
class Sub:
    root: Path
    cache: ObjectStore
    state: SubdState
    updater: Updater


def make_sub(root: Path, command: str = "true {action} {service}") -> Sub:
    """A subd's updater on `root` (made if missing), loading its state from disk."""
    root.mkdir(exist_ok=True)
    cache = ObjectStore(root / ".subd" / "objects")
    state = SubdState.at_root(root)
    return Sub(root, cache, state, Updater(root, cache, state, TriggerRunner(command)))


def recorder(tmp_path: Path, watch: Path | None = None) -> tuple[str, Path]:
    """A trigger command appending "ACTION SERVICE [content of `watch`]" to a log."""
    log = tmp_path / "triggers.log"
    script = tmp_path / "record.sh"
    shown = f' $(cat "{watch}" 2>/dev/null)' if watch else ""
    script.write_text(f'#!/bin/sh\necho "$1 $2{shown}" >> "{log}"\n')
    script.chmod(0o755)
    return f"{script} {{action}} {{service}}", log


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def fill_cache(cache: ObjectStore, target: Path, tree: Tree) -> None:
    """Put every object of the target tree in the cache, as a fetch would."""
    for path, _, inode in tree.walk():
        if inode.kind == Kind.REGULAR and inode.size and not cache.has(inode.hash):
            cache.add_bytes((target / path.lstrip("/")).read_bytes())


def plan_for(sub: Sub, target: Path, flt: Filter | None = EMPTY,
             excluded: Callable[[str], bool] | None = None, fill: bool = True,
             **options) -> tuple[UpdatePlan, Tree]:
    """The plan turning the sub's ROOT into `target`, and the sub's current tree."""
    old, new = scan_root(sub.root), scan_directory(target)
    if fill:
        fill_cache(sub.cache, target, new)
    return UpdatePlan("image", diff_trees(old, new, flt, excluded), flt, **options), old


def converge(sub: Sub, target: Path, flt: Filter | None = EMPTY,
             excluded: Callable[[str], bool] | None = None, **options) -> UpdateOutcome:
    plan, old = plan_for(sub, target, flt, excluded, **options)
    return sub.updater.apply(plan, old, excluded)


def assert_matches(root: Path, target: Path) -> None:
    """ROOT holds exactly the target tree (and nothing is left in subd's temp folder)."""
    assert scan_root(root).fingerprint() == scan_directory(target).fingerprint()
    assert rsync_differences(target, root, "/.subd") == ""
    assert os.listdir(root / ".subd" / "tmp") == []


def snapshot(root: Path) -> tuple[bytes, dict[str, tuple[int, int, int]]]:
    """Everything about ROOT outside /.subd: the tree, and every path's inode
    number, ctime and mtime (any rename, write or metadata change shows)."""
    tree = scan_root(root)
    stats = {}
    for path in tree.paths():
        st = os.lstat(root / path.lstrip("/"))
        stats[path] = (st.st_ino, st.st_ctime_ns, st.st_mtime_ns)
    return tree.fingerprint(), stats


def assert_refused(sub: Sub, plan: UpdatePlan, tree: Tree, match: str,
                   excluded: Callable[[str], bool] | None = None) -> None:
    """check() and apply() both refuse, apply() changes nothing and records why."""
    before = snapshot(sub.root)
    with pytest.raises(FleetError, match=match):
        sub.updater.check(plan, tree, excluded)
    with pytest.raises(FleetError, match=match) as raised:
        sub.updater.apply(plan, tree, excluded)
    assert "\n" not in str(raised.value)
    assert snapshot(sub.root) == before
    assert os.listdir(sub.updater.tmp_dir) == []
    last = SubdState.at_root(sub.root).last_update
    assert last is not None and not last.success and last.error == str(raised.value)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def reg(data: bytes, mode: int = 0o644) -> Inode:
    return regular(mode, 0, 0, T, len(data), sha(data))


def hand_plan(*entries: DiffEntry, flt: Filter | None = EMPTY, **options) -> UpdatePlan:
    return UpdatePlan("hand-made", TreeDiff(list(entries)), flt, **options)


def set_capability(path: Path) -> None:
    if os.path.exists(SETCAP):
        subprocess.run([SETCAP, "cap_net_raw+ep", str(path)], check=True)
    else:
        os.setxattr(path, "security.capability", CAPABILITY)


@pytest.fixture
def sub(tmp_path: Path) -> Sub:
    return make_sub(tmp_path / "root")


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


def write(root: Path, files: dict[str, bytes | str]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        path.write_bytes(data)
        os.utime(path, ns=(T, T))


# ------------------------------------------------------------------ converging


def test_birth_builds_every_kind_of_inode(sub: Sub, target: Path) -> None:
    make_tree(target, big_file_bytes=2 << 20)
    plan, old = plan_for(sub, target)
    outcome = sub.updater.apply(plan, old)
    assert_matches(sub.root, target)
    assert outcome.success and outcome.error == "" and outcome.warnings == []
    assert outcome.paths_changed == len(plan.diff.entries)
    assert 0 < outcome.change_window_ns < 10**10
    ping = sub.root / "usr" / "bin" / "ping"
    assert os.getxattr(ping, "security.capability") == \
        os.getxattr(target / "usr" / "bin" / "ping", "security.capability")
    assert stat.S_IMODE(os.lstat(sub.root / "usr" / "bin" / "passwd").st_mode) == 0o4755
    assert not any(sub.cache)  # every object had one use: renamed into place
    again = converge(sub, target)
    assert again.paths_changed == 0 and again.change_window_ns == 0


def test_kind_changes(sub: Sub, target: Path) -> None:
    write(sub.root, {"x": "a file, then a directory", "y/sub/f": "f", "y/g": "g",
                     "w/inner": "a directory, then a symlink"})
    (sub.root / "z").symlink_to("x")
    os.mkfifo(sub.root / "fifo")
    write(target, {"x/inner": "inner", "y": "a directory, then a file", "fifo": "regular"})
    os.mkfifo(target / "z")
    (target / "w").symlink_to("/etc")
    converge(sub, target)
    assert_matches(sub.root, target)


def test_hard_link_groups_made_and_broken(sub: Sub, target: Path) -> None:
    r, t = sub.root, target
    write(r, {"a": "shared", "c": "joined", "d": "joined", "e": "shrinks"})
    os.link(r / "a", r / "b")
    os.link(r / "e", r / "f")
    os.link(r / "e", r / "g")
    write(t, {"a": "shared", "b": "shared", "c": "joined", "e": "shrinks"})
    os.link(t / "c", t / "d")
    (t / "sub").mkdir()
    os.link(t / "c", t / "sub" / "h")
    os.link(t / "e", t / "f")
    converge(sub, target)
    assert_matches(sub.root, target)

    def ino(name: str) -> int:
        return os.lstat(r / name).st_ino

    assert ino("a") != ino("b")
    assert ino("c") == ino("d") == ino("sub/h")
    assert ino("e") == ino("f") and not (r / "g").exists()


def test_an_object_used_by_three_inodes_is_copied_then_consumed(sub: Sub, target: Path) -> None:
    data = os.urandom(50_000)
    write(target, {"one": data, "two": data, "three/deep": data})
    (target / "two").chmod(0o600)
    (target / "three" / "deep").chmod(0o4755)
    plan, old = plan_for(sub, target)
    assert sub.cache.has(sha(data))
    sub.updater.apply(plan, old)
    assert_matches(sub.root, target)
    inos = {os.lstat(sub.root / p).st_ino for p in ("one", "two", "three/deep")}
    assert len(inos) == 3
    assert not sub.cache.has(sha(data))  # the last use took the object itself


def test_setuid_and_capabilities_survive_owner_changes(sub: Sub, target: Path) -> None:
    tool = os.urandom(3000)
    write(sub.root, {"usr/bin/ping": tool, "usr/bin/passwd": tool + b"p"})
    (sub.root / "usr" / "bin" / "passwd").chmod(0o4755)
    write(target, {"usr/bin/ping": tool, "usr/bin/passwd": tool + b"p", "usr/bin/su": b"su"})
    for name in ("passwd", "su"):
        os.chown(target / "usr" / "bin" / name, 0, 42)  # chown clears setuid: order matters
        (target / "usr" / "bin" / name).chmod(0o4755)
    set_capability(target / "usr" / "bin" / "ping")
    set_capability(target / "usr" / "bin" / "su")
    plan, old = plan_for(sub, target)
    assert {e.path: e.change for e in plan.diff.entries}["/usr/bin/passwd"] == Change.METADATA
    sub.updater.apply(plan, old)
    assert_matches(sub.root, target)
    for name in ("passwd", "su"):
        assert stat.S_IMODE(os.lstat(sub.root / "usr" / "bin" / name).st_mode) == 0o4755
    assert os.getxattr(sub.root / "usr" / "bin" / "su", "security.capability")


def test_directories_are_updated_in_place(sub: Sub, target: Path) -> None:
    write(sub.root, {"etc/app/app.conf": "old", "etc/motd": "hello"})
    before = {d: os.lstat(sub.root / d).st_ino for d in ("etc", "etc/app")}
    write(target, {"etc/app/app.conf": "new", "etc/motd": "hello", "etc/new/file": "n"})
    (target / "etc").chmod(0o750)
    os.chown(target / "etc", 1234, 1234)
    os.setxattr(target / "etc", "user.label", b"x")
    (target / "etc" / "app").chmod(0o700)
    converge(sub, target)
    assert_matches(sub.root, target)
    assert {d: os.lstat(sub.root / d).st_ino for d in ("etc", "etc/app")} == before


def test_filtered_and_excluded_paths_are_untouched(sub: Sub, target: Path) -> None:
    write(sub.root, {"var/cache/extra": "host cache", "var/log/app.log": "host log",
                     "etc/motd": "old"})
    write(target, {"var/cache/image-cache": "image", "var/log/image.log": "image",
                   "etc/motd": "new", "var/lib/db": "db"})
    flt = Filter.from_lines(["/var/cache"])

    def excluded(path: str) -> bool:
        return path.startswith("/var/log/")

    converge(sub, target, flt, excluded)
    assert (sub.root / "var/cache/extra").read_text() == "host cache"
    assert (sub.root / "var/log/app.log").read_text() == "host log"
    assert not (sub.root / "var/cache/image-cache").exists()
    assert not (sub.root / "var/log/image.log").exists()

    def owned(path: str) -> bool:
        return not (not_subd(path) or flt.matches(path) or excluded(path))

    view = [scan_directory(root, exclude=lambda p: not owned(p)).fingerprint()
            for root in (sub.root, target)]
    assert view[0] == view[1]


def test_a_filtered_directory_the_host_has_is_left_alone(sub: Sub, target: Path) -> None:
    write(sub.root, {"etc/passwd": "p"})
    (sub.root / "etc").chmod(0o755)
    write(target, {"etc/passwd": "p", "etc/group": "g"})
    (target / "etc").chmod(0o700)
    converge(sub, target, Filter.from_lines(["/etc$"]))
    assert stat.S_IMODE(os.lstat(sub.root / "etc").st_mode) == 0o755
    assert (sub.root / "etc" / "group").read_text() == "g"


def test_a_sparse_image_never_deletes(sub: Sub, target: Path) -> None:
    write(sub.root, {"etc/motd": "old", "extra/file": "host's own"})
    write(target, {"etc/motd": "new", "etc/added": "a"})
    plan, old = plan_for(sub, target, flt=None)
    assert not list(plan.diff.of(Change.DELETE))
    sub.updater.apply(plan, old)
    assert (sub.root / "extra" / "file").read_text() == "host's own"
    assert (sub.root / "etc" / "motd").read_text() == "new"


# ------------------------------------------------------------------ refusals


def test_refuses_deleting_more_than_half_unless_the_check_is_disabled(
        sub: Sub, target: Path) -> None:
    write(sub.root, {f"f{i}": str(i) for i in range(10)})
    write(target, {"f0": "0"})
    plan, old = plan_for(sub, target)
    assert_refused(sub, plan, old, "more than half")
    plan.disable_safety_check = True
    sub.updater.apply(plan, old)
    assert_matches(sub.root, target)


@pytest.mark.parametrize("path, link_to", [("/etc/../../x", None), ("/../x", None),
                                           ("etc/x", None), ("/etc/x", "/etc/../y")])
def test_refuses_paths_escaping_root(sub: Sub, path: str, link_to: str | None) -> None:
    (sub.root / "etc").mkdir()
    sub.cache.add_bytes(b"x")
    plan = hand_plan(DiffEntry(path, Change.ADD, None, reg(b"x"), link_to))
    assert_refused(sub, plan, scan_root(sub.root), "update refused: .*(escapes|not absolute)")


def test_refuses_a_symlinked_parent(sub: Sub, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere, {"passwd": "outside ROOT"})
    (sub.root / "etc").symlink_to(elsewhere)
    sub.cache.add_bytes(b"evil")
    tree = scan_root(sub.root)
    for entry in (DiffEntry("/etc/evil", Change.ADD, None, reg(b"evil")),
                  DiffEntry("/etc/passwd", Change.REPLACE, None, reg(b"evil")),
                  DiffEntry("/etc/passwd", Change.DELETE, None, None)):
        assert_refused(sub, hand_plan(entry), tree, "parent /etc is a symlink")
    assert os.listdir(elsewhere) == ["passwd"]
    assert (elsewhere / "passwd").read_text() == "outside ROOT"


def test_refuses_paths_under_what_the_update_makes_a_non_directory(
        sub: Sub, tmp_path: Path) -> None:
    write(sub.root, {"etc/passwd": "p"})
    sub.cache.add_bytes(b"evil")
    plan = hand_plan(
        DiffEntry("/etc", Change.REPLACE, None, symlink(0, 0, os.fsencode(tmp_path))),
        DiffEntry("/etc/evil", Change.ADD, None, reg(b"evil")))
    assert_refused(sub, plan, scan_root(sub.root), "lies under /etc, which this update replaces")


@pytest.mark.parametrize("entry", [
    DiffEntry("/.subd/objects/evil", Change.ADD, None, reg(b"evil")),
    DiffEntry("/.subd", Change.DELETE, None, None),
    DiffEntry("/.subd/state.json", Change.METADATA, None, reg(b"{}", 0o666)),
    DiffEntry("/x", Change.ADD, None, reg(b"evil"), "/.subd/state.json"),
])
def test_refuses_subd_state(sub: Sub, entry: DiffEntry) -> None:
    sub.cache.add_bytes(b"evil")
    sub.state.save()
    assert_refused(sub, hand_plan(entry), scan_root(sub.root), "subd's own state")


def test_refuses_filtered_and_excluded_paths(sub: Sub) -> None:
    write(sub.root, {"etc/secret": "host", "var/log/x": "log"})
    sub.cache.add_bytes(b"evil")
    tree = scan_root(sub.root)
    plan = hand_plan(DiffEntry("/etc/secret", Change.REPLACE, None, reg(b"evil")),
                     flt=Filter.from_lines(["/etc/secret"]))
    assert_refused(sub, plan, tree, "/etc/secret is filtered")
    plan = hand_plan(DiffEntry("/var/log/x", Change.DELETE, None, None))
    assert_refused(sub, plan, tree, "/var/log/x is not scanned",
                   excluded=lambda p: p.startswith("/var/log/"))


def test_refuses_removing_a_directory_that_holds_a_filtered_file(
        sub: Sub, target: Path) -> None:
    write(sub.root, {"srv/data/keep": "filtered", "srv/data/own": "o", "etc/motd": "m"})
    flt = Filter.from_lines(["/srv/data/keep"])
    tree = scan_root(sub.root)
    # diff_trees keeps a directory holding filtered content; the updater refuses a
    # plan (from an older or hostile dominator) that deletes one anyway.
    plan = hand_plan(DiffEntry("/srv/data/own", Change.DELETE, None, None),
                     DiffEntry("/srv/data", Change.DELETE, None, None), flt=flt)
    assert_refused(sub, plan, tree, "would remove /srv/data/keep")


def test_refuses_stale_plans(sub: Sub) -> None:
    write(sub.root, {"etc/passwd": "p"})
    sub.cache.add_bytes(b"new")
    tree = scan_root(sub.root)
    for entry in (DiffEntry("/etc/passwd", Change.ADD, None, reg(b"new")),
                  DiffEntry("/etc/nothing", Change.REPLACE, None, reg(b"new")),
                  DiffEntry("/etc/passwd", Change.METADATA, None,
                            symlink(0, 0, b"x"))):
        assert_refused(sub, hand_plan(entry), tree, "stale")


def test_refuses_objects_missing_from_the_cache(sub: Sub, target: Path) -> None:
    write(sub.root, {"etc/motd": "old"})
    write(target, {"etc/motd": "new", "etc/other": "other"})
    plan, old = plan_for(sub, target, fill=False)
    assert_refused(sub, plan, old, "2 object.*missing from the cache.*fetch first")


def test_refuses_when_free_space_is_short(tmp_path: Path, target: Path) -> None:
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        sub = make_sub(root)
        data = os.urandom(800_000)  # cached once; each use but the last is a copy
        write(target, {"a": data, "b": data, "c": data})
        plan, old = plan_for(sub, target)
        assert_refused(sub, plan, old, "not enough free space")
        (target / "c").unlink()  # one copy fits
        converge(sub, target)
        assert_matches(root, target)
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_refuses_high_impact_triggers_unless_disruption_is_permitted(
        sub: Sub, target: Path) -> None:
    write(sub.root, {"boot/kernel": "old"})
    write(target, {"boot/kernel": "new"})
    triggers = [make_trigger(["/boot/"], "kernel-update", high_impact=True)]
    plan, old = plan_for(sub, target, triggers=triggers)
    assert_refused(sub, plan, old, "HighImpact trigger.*kernel-update")
    plan.disruption_permitted = True
    outcome = sub.updater.apply(plan, old)
    assert outcome.triggers_run == ["stop kernel-update", "start kernel-update"]


# ------------------------------------------------------------------ triggers


def test_triggers_stop_before_and_start_after(sub: Sub, target: Path, tmp_path: Path) -> None:
    conf = sub.root / "etc" / "nginx" / "nginx.conf"
    command, log = recorder(tmp_path, watch=conf)
    sub = make_sub(sub.root, command)
    write(sub.root, {"etc/nginx/nginx.conf": "old", "etc/app/app.conf": "a1", "usr/x": "x"})
    write(target, {"etc/nginx/nginx.conf": "new", "etc/app/app.conf": "a2", "usr/x": "x"})
    triggers = [make_trigger(["/etc/nginx/"], "nginx"),
                make_trigger(["/etc/app/"], "app", do_reload=True),
                make_trigger(["/usr/"], "untouched")]
    old_triggers = [make_trigger(["/etc/nginx/"], "legacy")]
    outcome = converge(sub, target, triggers=triggers, old_triggers=old_triggers)
    assert logged(log) == ["stop nginx old", "stop legacy old", "start nginx new",
                           "reload app new"]
    assert outcome.triggers_run == ["stop nginx", "stop legacy", "start nginx", "reload app"]
    assert SubdState.at_root(sub.root).pending_starts == []


def test_a_failure_part_way_is_reported_and_services_still_start(
        sub: Sub, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command, log = recorder(tmp_path)
    sub = make_sub(sub.root, command)
    write(sub.root, {"etc/a": "old a", "etc/b": "old b"})
    write(target, {"etc/a": "new a", "etc/b": "new b"})
    plan, old = plan_for(sub, target, triggers=[make_trigger(["/etc/"], "svc")])
    rename = os.rename

    def failing_rename(src, dst, **kwargs):
        if dst == "b":
            raise OSError(28, "No space left on device")
        return rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    outcome = sub.updater.apply(plan, old)
    monkeypatch.undo()
    assert not outcome.success and outcome.error == "/etc/b: No space left on device"
    assert logged(log) == ["stop svc", "start svc"]
    assert (sub.root / "etc" / "a").read_text() == "new a"
    assert (sub.root / "etc" / "b").read_text() == "old b"
    assert os.listdir(sub.updater.tmp_dir) == []
    state = SubdState.at_root(sub.root)
    assert state.last_update == outcome and state.pending_starts == []
    assert state.last_successful_image == ""
    assert converge(sub, target).success
    assert_matches(sub.root, target)


def test_a_reboot_trigger_is_a_final_reboot_only() -> None:
    triggers = [make_trigger(["/boot/"], "kernel", do_reboot=True),
                make_trigger(["/etc/"], "nginx"), make_trigger(["/boot/"], "second", True)]
    actions = plan_actions([], triggers, ["/boot/vmlinuz", "/etc/nginx.conf"])
    assert actions.stops == [("stop", "nginx")]
    assert actions.after == [("start", "nginx"), ("reload", "second"), ("reboot", "kernel")]


def test_trigger_failures_are_reported_not_fatal(sub: Sub, target: Path) -> None:
    sub = make_sub(sub.root, "false {action} {service}")
    write(target, {"etc/motd": "m"})
    outcome = converge(sub, target, triggers=[make_trigger(["/etc/"], "motd")])
    assert outcome.success and (sub.root / "etc" / "motd").exists()
    assert outcome.warnings == ["trigger stop motd failed: exit status 1",
                                "trigger start motd failed: exit status 1"]


def test_trigger_runner_never_runs_bad_input() -> None:
    with pytest.raises(FleetError, match="invalid trigger command"):
        TriggerRunner("systemctl {verb} {service}")
    with pytest.raises(FleetError, match="invalid trigger command"):
        TriggerRunner("systemctl 'unclosed")
    runner = TriggerRunner("echo {action} {service}")
    assert runner.run("stop", "nginx") == "ok"
    assert runner.run("stop", "a; rm -rf /") == "invalid service name 'a; rm -rf /'"
    assert runner.run("explode", "nginx") == "unknown action 'explode'"
    assert TriggerRunner("no-such-command-xyz {service}").run("stop", "x").startswith(
        "cannot run no-such-command-xyz")
    assert TriggerRunner("sleep 5", timeout=0.1).run("stop", "x") == "timed out after 0.1 s"


def test_pending_starts_survive_a_kill(sub: Sub, tmp_path: Path) -> None:
    command, log = recorder(tmp_path)
    sub.state.pending_starts = [("start", "nginx"), ("reload", "app")]
    sub.state.record(UpdateOutcome("image", error="interrupted"))
    (sub.updater.tmp_dir / ".subd-tmp-leftover").write_text("staged")
    restarted = make_sub(sub.root, command)  # a new subd: state from disk
    assert restarted.state.pending_starts == [("start", "nginx"), ("reload", "app")]
    assert restarted.updater.recover() == ["start nginx", "reload app"]
    assert logged(log) == ["start nginx", "reload app"]
    assert os.listdir(restarted.updater.tmp_dir) == []
    again = SubdState.at_root(sub.root)
    assert again.pending_starts == []
    assert again.last_update is not None and again.last_update.triggers_run == [
        "start nginx", "reload app"]


# ------------------------------------------------------------------ state


def test_the_outcome_survives_a_restart(sub: Sub, target: Path) -> None:
    write(target, {"etc/motd": "m"})
    outcome = converge(sub, target, triggers=[make_trigger(["/etc/"], "motd")])
    loaded = SubdState.at_root(sub.root)
    assert loaded.last_update == outcome
    assert loaded.last_successful_image == "image"
    assert outcome.finished_unix > 0 and outcome.triggers_run == ["stop motd", "start motd"]
    write(sub.root, {f"f{i}": "x" for i in range(5)})
    plan, old = plan_for(sub, target)
    with pytest.raises(FleetError):
        sub.updater.apply(UpdatePlan("bad", plan.diff, EMPTY), old)  # refused
    loaded = SubdState.at_root(sub.root)
    assert loaded.last_update is not None and loaded.last_update.image_name == "bad"
    assert loaded.last_successful_image == "image"


@pytest.mark.parametrize("content", [b"{not json", b"[]", b"\xff\xfe",
                                     b'{"last_update": {"image_name": 3}}',
                                     b'{"pending_starts": [["start"]]}'])
def test_a_corrupt_state_loads_empty_with_a_warning(tmp_path: Path, content: bytes,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="subd.state"):
        state = SubdState(path)
    assert state.last_update is None and state.pending_starts == []
    assert "ignoring unreadable subd state" in caplog.text


# ------------------------------------------------------------------ non-root

# The interpreter may live where nobody cannot reach (/root/.pyenv): start as
# root, import everything, then become nobody for good before touching ROOT.
NON_ROOT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from dataclasses import asdict
    from pathlib import Path
    from fleetlib.fstree.objectstore import ObjectStore
    from fleetlib.fstree.scan import scan_directory
    from fleetlib.wire.subd_pb2 import UpdateRequest
    from subd.changes import plan_from_proto
    from subd.state import SubdState
    from subd.trigger_runner import TriggerRunner
    from subd.updater import Updater

    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    root = Path(sys.argv[1])
    plan = plan_from_proto(UpdateRequest.FromString(Path(sys.argv[2]).read_bytes()))
    state = SubdState.at_root(root)
    updater = Updater(root, ObjectStore(root / ".subd" / "objects"), state,
                      TriggerRunner("true"))
    tree = scan_directory(root, exclude=lambda p: p == "/.subd" or p.startswith("/.subd/"))
    print(json.dumps(asdict(updater.apply(plan, tree))))
""")


def test_a_non_root_sub_converges_what_it_may(target: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="subd-nonroot-"))  # outside pytest's 0700 folders
    try:
        base.chmod(0o755)
        sub = make_sub(base / "root")
        write(sub.root, {"etc/old.conf": "old", "etc/motd": "old motd"})
        write(target, {"etc/motd": "new motd", "etc/app.conf": "root's", "bin/tool": "t"})
        os.chown(target / "etc" / "app.conf", 0, 0)
        with open(os.path.join(os.fsencode(target / "etc"), b"caf\xe9"), "wb") as f:
            f.write(b"a name that is not UTF-8")
        (target / "bin" / "tool").chmod(0o4755)
        os.mkfifo(target / "etc" / "fifo")
        os.mknod(target / "etc" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        for dirpath, dirnames, filenames in os.walk(sub.root):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, NOBODY, NOBODY, follow_symlinks=False)
        plan, _ = plan_for(sub, target)
        for dirpath, _, filenames in os.walk(sub.root / ".subd"):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in filenames)]:
                os.chown(name, NOBODY, NOBODY)
        plan_file = base / "plan.bin"
        plan_file.write_bytes(plan_to_proto(plan).SerializeToString())
        result = subprocess.run(
            [sys.executable, "-c", NON_ROOT_SCRIPT, str(sub.root), str(plan_file)],
            capture_output=True, cwd=REPO,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}, timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        outcome = json.loads(result.stdout)
        assert outcome["success"], outcome
        warnings = "\n".join(outcome["warnings"])
        assert "/etc/app.conf: cannot set owner 0:0 (not root)" in warnings
        assert "/etc/null: cannot make a char_device (not root)" in warnings
        assert "/etc/caf\\xe9: cannot set owner 0:0 (not root)" in warnings
        warnings.encode()  # valid text for the wire, whatever the file names
        assert (sub.root / "etc" / "motd").read_text() == "new motd"
        assert (sub.root / "etc" / "app.conf").read_text() == "root's"
        assert os.lstat(sub.root / "etc" / "app.conf").st_uid == NOBODY
        assert stat.S_IMODE(os.lstat(sub.root / "bin" / "tool").st_mode) == 0o4755
        assert stat.S_ISFIFO(os.lstat(sub.root / "etc" / "fifo").st_mode)
        assert not (sub.root / "etc" / "old.conf").exists()
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------ crash consistency

FS_CALLS = ("open", "rename", "link", "unlink", "mkdir", "rmdir", "symlink", "mknod", "mkfifo",
            "chown", "chmod", "utime", "setxattr", "removexattr")
SHARED = os.urandom(40_000)


def make_old(root: Path) -> None:
    write(root, {"etc/a.conf": "a old", "etc/b.conf": "b", "etc/gone.conf": "gone",
                 "data/x": "x becomes a directory", "tree/one": "1", "tree/deep/two": "2",
                 "links/l1": "linked", "big": os.urandom(300_000),
                 **{f"keep/{i}": f"kept {i}" for i in range(12)}})
    os.link(root / "links" / "l1", root / "links" / "l2")
    (root / "sym").symlink_to("etc/a.conf")


def make_new(root: Path) -> None:
    write(root, {"etc/a.conf": "a new, longer than before", "etc/b.conf": "b",
                 "etc/new.conf": "new", "data/x/inner": "inner", "tree": "tree is a file",
                 "links/l1": "linked", "links/l2": "linked", "links/l3": "grouped",
                 "s1": SHARED, "s2": SHARED, "deep/er/s3": SHARED, "big": os.urandom(400_000),
                 **{f"keep/{i}": f"kept {i}" for i in range(12)}})
    (root / "etc" / "b.conf").chmod(0o600)
    os.link(root / "links" / "l3", root / "links" / "l4")
    (root / "sym").symlink_to("etc/b.conf")


def contents(tree: Tree) -> dict[str, bytes]:
    return {p: i.hash for p, _, i in tree.walk() if i.kind == Kind.REGULAR}


def apply_in_child(root: Path, command: str, target: Path, kill_at: int, calls_file: Path) -> None:
    """Fork a subd that applies the update and SIGKILLs itself just before its
    `kill_at`-th filesystem call (0: never; the number of calls goes to `calls_file`)."""

    def child() -> None:
        calls = 0

        def counted(function: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return function(*args, **kwargs)
            return wrapper

        sub = make_sub(root, command)
        plan, old = plan_for(sub, target, triggers=[make_trigger(["/"], "svc")])
        for name in FS_CALLS:
            setattr(os, name, counted(getattr(os, name)))
        sub.updater.apply(plan, old)
        calls_file.write_text(str(calls))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(30)
    assert process.exitcode == (-signal.SIGKILL if kill_at else 0)


def test_a_subd_killed_at_any_moment_leaves_no_partial_file_and_converges(
        tmp_path: Path, target: Path) -> None:
    make_new(target)
    new = contents(scan_directory(target))
    calls_file = tmp_path / "calls"
    first = tmp_path / "count"
    make_old(first)
    apply_in_child(first, "true", target, 0, calls_file)
    assert_matches(first, target)
    total = int(calls_file.read_text())
    assert total >= 40
    for kill_at in range(1, total + 1):  # every moment between two filesystem calls
        work = tmp_path / f"kill-{kill_at}"
        root = work / "root"
        root.mkdir(parents=True)
        make_old(root)
        old = contents(scan_root(root))
        command, log = recorder(work)
        apply_in_child(root, command, target, kill_at, calls_file)
        for path, digest in contents(scan_root(root)).items():
            assert digest in (old.get(path), new.get(path)), f"{path} after kill {kill_at}"
        sub = make_sub(root, command)  # the restarted subd
        stopped = logged(log)[-1:] == ["stop svc"]
        sub.updater.recover()
        if stopped:
            assert logged(log)[-1] == "start svc", f"kill {kill_at}: svc left stopped"
        assert os.listdir(sub.updater.tmp_dir) == []
        converge(sub, target)
        assert scan_root(root).fingerprint() == scan_directory(target).fingerprint(), kill_at
        assert SubdState.at_root(root).last_update.success
    assert rsync_differences(target, root, "/.subd") == ""

