"""The inspection commands of `dominator image` (issue 12) against a real image server:
list's table, show's structured entries, cat, diff --path, check, wait, latest, filter
and triggers read back, set-expiry (persisted, audited, authorized) and delete guarded
by what the dominator's MDB says."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetlib.rpc.tls import Security, open_channel
from fleetlib.testing.daemons import (
    PROJECT,
    Daemon,
    assert_one_line_error,
    cli,
    free_port,
    imageserver_daemon,
)
from fleetlib.testing.fleet import FleetUnderTest, wait_for
from fleetlib.testing.trees import make_tree
from fleetlib.wire import audit_pb2, imageserver_pb2_grpc

TRIGGERS = [{"MatchLines": ["/etc/ssl/.*"], "Service": "nginx", "DoReload": True,
             "DoReboot": False, "HighImpact": False},
            {"MatchLines": ["/usr/bin/.*", "/etc/hostname"], "Service": "web",
             "DoReload": False, "DoReboot": False, "HighImpact": True}]


@pytest.fixture(scope="module")
def reader_server(tmp_path_factory: pytest.TempPathFactory, ca: Path) -> Iterator[Daemon]:
    """One image server for the tests that only read images (they add new names only)."""
    folder = tmp_path_factory.mktemp("imageserver")
    daemon = imageserver_daemon(folder / "state", ca, folder / "imageserver.log")
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def env(ca: Path, reader_server: Daemon) -> dict[str, str]:
    """The CLI as admin, pointed at the shared image server."""
    return {"DOMINATOR_TLS_DIR": str(ca / "admin"),
            "DOMINATOR_IMAGESERVER": reader_server.address}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """web/v1 (make_tree, a filter and triggers), web/v2 (v1 with changes: text edited,
    binary replaced, a file added, one deleted, a symlink retargeted) and a sparse image;
    returns v2's source folder."""
    folder = tmp_path_factory.mktemp("images")
    source = make_tree(folder / "src")
    (source / "etc/motd").write_bytes(b"line one\nline two\nline three\n")
    (source / "etc/no-newline").write_bytes(b"last line without newline")
    (source / "etc/gone").write_text("only in v1\n")
    (folder / "filter").write_text("/var/lib/.*\n/tmp/\n")
    (folder / "triggers").write_text(json.dumps(TRIGGERS))
    cli("image", "add", "web/v1", str(source), "--filter", str(folder / "filter"),
        "--triggers", str(folder / "triggers"), env=env, check=True)
    (source / "etc/motd").write_bytes(b"line one\nline 2\nline three\n")
    (source / "etc/no-newline").write_bytes(b"last line changed, still no newline")
    (source / "etc/gone").unlink()
    (source / "etc/new").write_text("only in v2\n")
    (source / "usr/bin/ping").write_bytes(b"\x7fELF\0" + os.urandom(500))
    (source / "usr/bin/vi").unlink()
    (source / "usr/bin/vi").symlink_to("nvim")
    time.sleep(1.1)  # a later creation second: web/v2 is the newest of web/
    cli("image", "add", "web/v2", str(source), "--filter", str(folder / "filter"), env=env,
        check=True)
    cli("image", "add", "sparse", str(source), "--sparse", env=env, check=True)
    return source


def test_list_is_a_table_and_json_keeps_old_keys(images: Path, env: dict[str, str]) -> None:
    cli("image", "set-expiry", "sparse", "2h", env=env, check=True)
    lines = cli("image", "list", env=env, check=True).stdout.splitlines()
    assert lines[0].split() == ["NAME", "CREATED", "EXPIRES", "INODES", "SIZE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"sparse", "web/v1", "web/v2"}
    assert " in 1 h " in rows["sparse"] or " in 2 h " in rows["sparse"], rows["sparse"]
    assert ("ago" in rows["web/v1"] or "just now" in rows["web/v1"]) and " - " in rows["web/v1"]
    assert "KiB" in rows["web/v1"]
    listed = json.loads(cli("image", "list", "--json", "--prefix", "web/", env=env,
                            check=True).stdout)
    assert [i["name"] for i in listed] == ["web/v1", "web/v2"]
    first = listed[0]
    assert set(first) == {"name", "created", "expires", "inodes", "bytes", "created_unix",
                          "expires_unix"}
    assert first["created"] == first["created_unix"] and abs(first["created"] - time.time()) < 600
    assert first["expires"] == first["expires_unix"] == 0


def test_show_json_has_structured_entries(images: Path, env: dict[str, str]) -> None:
    shown = json.loads(cli("image", "show", "web/v1", "--json", env=env, check=True).stdout)
    assert {"name", "created", "expires", "filter", "triggers", "computed_files",
            "listing"} <= set(shown)  # the keys scripts read before
    assert shown["created_unix"] == shown["created"] and shown["expires_unix"] == 0
    entries = {e["path"]: e for e in shown["entries"]}
    assert len(shown["entries"]) == len(shown["listing"]) == len(entries)
    assert entries["/"]["kind"] == "directory" and entries["/"]["mode"] == "0755"
    motd = entries["/etc/motd"]
    assert motd["kind"] == "regular" and motd["size"] == 29 and motd["mode"] == "0644"
    assert motd["sha256"] == hashlib.sha256(b"line one\nline two\nline three\n").hexdigest()
    assert entries["/etc/empty"]["sha256"] == hashlib.sha256(b"").hexdigest()
    hostname = entries["/etc/hostname"]
    assert hostname["mtime_unix"] == 1_600_000_000
    assert hostname["mtime_ns"] == 1_600_000_000_123_456_789
    assert base64.b64decode(hostname["xattrs"]["user.origin"]) == b"test\x00\xff"
    assert entries["/usr/bin/passwd"]["mode"] == "4755" and entries["/usr/bin/passwd"]["links"] == 2
    assert "link_to" not in entries["/usr/bin/chfn"]  # the first of the pair in path order
    assert entries["/usr/bin/passwd"]["link_to"] == "/usr/bin/chfn"
    assert entries["/bin"]["kind"] == "symlink" and entries["/bin"]["target"] == "usr/bin"
    null = entries["/dev/null"]
    assert null["kind"] == "char_device" and (null["major"], null["minor"]) == (1, 3)
    assert null["rdev"] == os.makedev(1, 3)
    assert entries["/dev/sda"]["kind"] == "block_device"
    assert entries["/dev/initctl"]["kind"] == "fifo"
    assert entries["/var/lib"]["uid"] == 1234 and entries["/var/lib"]["gid"] == 5678
    assert "/etc/caf\\xe9-latin1" in entries  # printable, as in the listing
    assert "/var/lib/app.db" not in entries  # filtered


def test_cat_prints_exact_bytes_and_refuses_what_is_no_file(images: Path,
                                                            env: dict[str, str]) -> None:
    cat = subprocess.run([sys.executable, "-m", "dominator.cli", "image", "cat", "web/v2",
                          "/usr/bin/ping"], capture_output=True, cwd=PROJECT,
                         env={**os.environ, **env})
    assert cat.returncode == 0 and cat.stdout == (images / "usr/bin/ping").read_bytes()
    assert cli("image", "cat", "web/v1", "/etc/motd", env=env, check=True).stdout == \
        "line one\nline two\nline three\n"
    empty = cli("image", "cat", "web/v1", "/etc/empty", env=env, check=True)
    assert empty.stdout == "" and empty.stderr == ""
    assert_one_line_error(cli("image", "cat", "web/v1", "/etc/nothing", env=env),
                          "/etc/nothing is not in image web/v1", code=1)
    assert_one_line_error(cli("image", "cat", "web/v1", "/etc", env=env), "/etc is a directory")
    assert_one_line_error(cli("image", "cat", "web/v2", "/usr/bin/vi", env=env),
                          "/usr/bin/vi is a symlink to nvim")
    assert_one_line_error(cli("image", "cat", "web/v1", "/bin/passwd", env=env),
                          "/bin is a symlink to usr/bin")
    assert_one_line_error(cli("image", "cat", "web/v1", "/dev/null", env=env), "char device")
    assert_one_line_error(cli("image", "cat", "web/v1", "etc/motd", env=env), "not absolute")
    assert_one_line_error(cli("image", "cat", "../x", "/etc/motd", env=env),
                          "invalid image name")
    assert_one_line_error(cli("image", "cat", "web/v9", "/etc/motd", env=env),
                          "unknown image web/v9", code=1)


def test_diff_path_shows_one_file_content(images: Path, env: dict[str, str]) -> None:
    def diff(path: str, first: str = "web/v1", second: str = "web/v2"
             ) -> subprocess.CompletedProcess[str]:
        return cli("image", "diff", first, second, "--path", path, env=env)

    text = diff("/etc/motd")
    assert text.returncode == 1, text.stderr
    assert text.stdout == ("--- web/v1:/etc/motd\n+++ web/v2:/etc/motd\n"
                           "@@ -1,3 +1,3 @@\n line one\n-line two\n+line 2\n line three\n")
    no_newline = diff("/etc/no-newline").stdout.splitlines()
    assert no_newline[-4:] == ["-last line without newline", "\\ No newline at end of file",
                               "+last line changed, still no newline",
                               "\\ No newline at end of file"]
    binary = diff("/usr/bin/ping")
    assert binary.returncode == 1
    assert binary.stdout == "Binary files web/v1:/usr/bin/ping and web/v2:/usr/bin/ping differ\n"
    added = diff("/etc/new")
    assert added.returncode == 1 and added.stdout.startswith(
        "--- /dev/null\n+++ web/v2:/etc/new\n@@ -0,0 +1 @@\n+only in v2\n")
    deleted = diff("/etc/gone")
    assert deleted.returncode == 1 and "--- web/v1:/etc/gone\n+++ /dev/null\n" in deleted.stdout
    assert "-only in v1" in deleted.stdout
    symlink = diff("/usr/bin/vi")
    assert symlink.returncode == 1 and "-vim.basic" in symlink.stdout and "+nvim" in symlink.stdout
    same = diff("/etc/hostname")
    assert same.returncode == 0 and same.stdout == ""
    assert_one_line_error(diff("/etc"), "/etc is a directory", "--path")
    assert_one_line_error(diff("/nowhere"), "in neither image")
    assert_one_line_error(diff("relative"), "not absolute")
    whole = cli("image", "diff", "web/v1", "web/v2", env=env)  # without --path: as before
    assert whole.returncode == 1 and "+ " in whole.stdout and "- " in whole.stdout


def test_check_latest_filter_and_triggers(tmp_path: Path, images: Path,
                                          env: dict[str, str]) -> None:
    present = cli("image", "check", "web/v1", env=env)
    assert (present.returncode, present.stdout) == (0, "image web/v1 exists\n")
    absent = cli("image", "check", "web/v9", env=env)
    assert (absent.returncode, absent.stdout) == (1, "image web/v9 does not exist\n")
    assert json.loads(cli("image", "check", "web/v9", "--json", env=env).stdout) == {
        "name": "web/v9", "exists": False}
    assert_one_line_error(cli("image", "check", "bad//name", env=env), "invalid image name")

    assert cli("image", "latest", "web/", env=env, check=True).stdout == "web/v2\n"
    assert cli("image", "latest", "web/v1", env=env, check=True).stdout == "web/v1\n"
    assert json.loads(cli("image", "latest", "", "--json", env=env, check=True).stdout)[
        "name"] in ("web/v2", "sparse")  # added in the same second or later
    assert_one_line_error(cli("image", "latest", "db/", env=env), "no image name starts",
                          code=1)

    lines = cli("image", "filter", "web/v1", env=env, check=True).stdout
    assert lines == "/var/lib/.*\n/tmp/\n"
    sparse = cli("image", "filter", "sparse", env=env)
    assert sparse.returncode == 1 and sparse.stdout == "" and "sparse" in sparse.stderr
    assert json.loads(cli("image", "filter", "sparse", "--json", env=env).stdout) == {
        "name": "sparse", "sparse": True, "filter": None}
    triggers = cli("image", "triggers", "web/v1", env=env, check=True).stdout
    assert json.loads(triggers) == TRIGGERS
    assert json.loads(cli("image", "triggers", "web/v2", env=env, check=True).stdout) == []
    # What they print is what `image add` reads: an image made from it has the same.
    (tmp_path / "filter").write_text(lines)
    (tmp_path / "triggers").write_text(triggers)
    cli("image", "add", "copy", str(images), "--filter", str(tmp_path / "filter"),
        "--triggers", str(tmp_path / "triggers"), env=env, check=True)
    copy = json.loads(cli("image", "show", "copy", "--json", env=env, check=True).stdout)
    original = json.loads(cli("image", "show", "web/v1", "--json", env=env, check=True).stdout)
    assert (copy["filter"], copy["triggers"]) == (original["filter"], original["triggers"])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_wait_returns_when_the_image_appears(tmp_path: Path, images: Path,
                                             env: dict[str, str]) -> None:
    waiter = subprocess.Popen(
        [sys.executable, "-m", "dominator.cli", "image", "wait", "late/v1", "--timeout", "2m"],
        cwd=PROJECT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        # It waits without spinning: its CPU time stops growing once it is started.
        def idle() -> bool:
            before = cpu_seconds(waiter.pid)
            time.sleep(1)
            return cpu_seconds(waiter.pid) - before < 0.2
        wait_for(idle, "the waiting CLI is idle", timeout=30)
        assert waiter.poll() is None
        (tmp_path / "late").mkdir()
        (tmp_path / "late/f").write_text("late\n")
        cli("image", "add", "late/v1", str(tmp_path / "late"), env=env, check=True)
        out, err = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert (waiter.returncode, out) == (0, "image late/v1 exists\n"), err
    present = cli("image", "wait", "web/v1", env=env)  # already there: at once
    assert (present.returncode, present.stdout) == (0, "image web/v1 exists\n")
    started = time.monotonic()
    timed_out = cli("image", "wait", "never/v1", "--timeout", "2", env=env)
    assert_one_line_error(timed_out, "timed out after 2 s", "never/v1", code=1)
    assert time.monotonic() - started < 30
    nobody = {**env, "DOMINATOR_IMAGESERVER": f"127.0.0.1:{free_port()}"}
    assert_one_line_error(cli("image", "wait", "web/v1", env=nobody), code=3)
    assert_one_line_error(cli("image", "wait", "x", "--timeout", "soon", env=env),
                          "invalid duration")


def audit_entries(daemon: Daemon, security: Security) -> list[audit_pb2.AuditEntry]:
    """The image server's audit log, oldest first."""
    channel = open_channel(daemon.address, security, "imageserver")
    try:
        stub = imageserver_pb2_grpc.ImageServerStub(channel)
        return list(stub.ListAudit(audit_pb2.ListAuditRequest()).entries)
    finally:
        channel.close()


def test_set_expiry_is_kept_audited_and_authorized(tmp_path: Path, imageserver: Daemon,
                                                   cli_env: dict[str, str], ca: Path,
                                                   admin: Security) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/f").write_text("x\n")
    cli("image", "add", "app/v1", str(tmp_path / "src"), env=cli_env, check=True)
    cli("image", "add", "app/v2", str(tmp_path / "src"), "--expires-in", "7d", env=cli_env,
        check=True)
    set_to = json.loads(cli("image", "set-expiry", "app/v1", "1h", "--json", env=cli_env,
                            check=True).stdout)
    assert set_to["name"] == "app/v1" and set_to["previous_expires_unix"] == 0
    assert abs(set_to["expires_unix"] - (time.time() + 3600)) < 120
    text = cli("image", "set-expiry", "app/v2", "never", env=cli_env, check=True).stdout
    assert text == "image app/v2 now never expires\n"

    imageserver.kill()  # what was answered is on disk
    imageserver.start()
    listed = {i["name"]: i for i in json.loads(cli("image", "list", "--json", env=cli_env,
                                                   check=True).stdout)}
    assert listed["app/v1"]["expires_unix"] == set_to["expires_unix"]
    assert listed["app/v2"]["expires_unix"] == 0
    assert cli("image", "diff", "app/v1", "app/v2", env=cli_env).returncode == 0  # same tree

    changes = [e for e in audit_entries(imageserver, admin) if e.action == "image.set-expiry"]
    assert [json.loads(e.details_json)["image"] for e in changes] == ["app/v1", "app/v2"]
    assert json.loads(changes[1].details_json)["expires_unix"] == 0
    assert json.loads(changes[1].details_json)["previous_expires_unix"] > 0
    assert "never expires" in changes[1].summary and changes[1].who

    cli("image", "set-expiry", "app/v1", "1", env=cli_env, check=True)
    wait_for(lambda: cli("image", "check", "app/v1", env=cli_env).returncode == 1,
             "the shortened image expires", timeout=30)
    assert_one_line_error(cli("image", "set-expiry", "app/v1", "1h", env=cli_env),
                          "unknown image app/v1", code=1)
    for bad in ("soon", "0", "5x"):
        assert_one_line_error(cli("image", "set-expiry", "app/v2", bad, env=cli_env),
                              "invalid duration")
    for role in ("subd", "dominator"):
        refused = cli("image", "set-expiry", "app/v2", "1h",
                      env={**cli_env, "DOMINATOR_TLS_DIR": str(ca / role)})
        assert_one_line_error(refused, "ImageServer.SetImageExpiry", code=4)
    assert json.loads(cli("image", "list", "--json", env=cli_env).stdout)[0]["expires"] == 0


def test_delete_refuses_images_hosts_use(tmp_path: Path, ca: Path, imageserver: Daemon,
                                         start_subd: Callable[..., Daemon]) -> None:
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=0)
    try:
        (tmp_path / "src").mkdir()
        (tmp_path / "src/f").write_text("x\n")
        for name in ("v1", "v2"):
            fleet.run("image", "add", name, str(tmp_path / "src"))
        fleet.run("mdb", "set", "web-1", "--address", "127.0.0.1:1", "--required-image", "v1")
        fleet.run("mdb", "set", "web-2", "--address", "127.0.0.1:2", "--required-image", "v2",
                  "--planned-image", "v1")
        refused = cli("image", "delete", "v1", env=fleet.env)
        assert_one_line_error(refused, "required by web-1", "planned by web-2", "--force",
                              code=4)
        fleet.run("mdb", "set", "web-2", "--required-image", "v1")
        assert "deleted image v2" in fleet.run("image", "delete", "v2")  # no longer used
        assert_one_line_error(cli("image", "delete", "v2", env=fleet.env), "unknown image v2",
                              code=1)
        fleet.dominator.stop()
        unreachable = cli("image", "delete", "v1", env=fleet.env)
        assert_one_line_error(unreachable, "not deleting image v1 unchecked",
                              fleet.dominator.address, "--force", code=3)
        forced = json.loads(fleet.run("image", "delete", "v1", "--force", "--json"))
        assert forced == {"name": "v1", "objects_freed": 1, "bytes_freed": 2}
    finally:
        fleet.stop()
