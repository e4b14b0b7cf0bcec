"""`dominator sub` as an operator uses it, with real daemons: get-file, config (and its
server-side checks), MDB hostnames, connection errors, and `sub fetch` then `sub update`
on a host a real dominator manages (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import PROJECT, Daemon, assert_one_line_error, cli, free_port
from fleetlib.testing.fleet import FleetUnderTest, wait_for
from fleetlib.wire import subd_pb2
from subd.client import SubClient
from subd.fetcher import Pins


def cli_bytes(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The CLI with its stdout as bytes (a file's content is not text)."""
    return subprocess.run([sys.executable, "-m", "dominator.cli", *args], capture_output=True,
                          env={**os.environ, **env}, timeout=120, cwd=PROJECT)


def error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one `error:` line of a failed command that exited with `code`."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def host(tmp_path: Path, start_subd: Callable[..., Daemon]) -> Daemon:
    """One subd on a small root: a text file, a binary one over several 1 MiB
    pieces, a directory and a symlink."""
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "etc/link").symlink_to("motd")
    (root / "var").mkdir()
    (root / "var/blob").write_bytes(os.urandom(3 << 20) + b"\0\r\n\xff")
    return start_subd(root)


def test_get_file_to_stdout_or_crash_safely_to_a_file(
        host: Daemon, cli_env: dict[str, str], tmp_path: Path, admin: Security) -> None:
    root = tmp_path / "host"
    blob = (root / "var/blob").read_bytes()
    shown = cli_bytes("sub", "get-file", host.address, "/var/blob", env=cli_env)
    assert shown.returncode == 0 and shown.stdout == blob, shown.stderr
    assert cli_bytes("sub", "get-file", host.address, "/etc/empty", env=cli_env).stdout == b""

    out = tmp_path / "out"
    out.mkdir()
    saved = cli("sub", "get-file", host.address, "/var/blob", "-o", str(out / "blob"),
                env=cli_env)
    assert saved.returncode == 0 and saved.stdout == "", saved.stderr
    assert (out / "blob").read_bytes() == blob
    assert os.listdir(out) == ["blob"]  # no temp file left behind
    assert (out / "blob").stat().st_mode & 0o777 == 0o600  # a host's file may be secret

    missing = cli("sub", "get-file", host.address, "/etc/nope", "-o", str(out / "nope"),
                  env=cli_env)
    assert "/etc/nope" in error_line(missing, 1) and "no such file" in missing.stderr
    assert os.listdir(out) == ["blob"]  # nothing written for a missing file
    own_state = cli("sub", "get-file", host.address, "/.subd/state.json", env=cli_env)
    assert "subd's own state" in error_line(own_state, 1)

    for path, kind in (("/etc", "directory"), ("/etc/link", "symlink")):
        refused = cli("sub", "get-file", host.address, path, env=cli_env)
        assert_one_line_error(refused, path, "not a regular file", kind)
    for path in ("etc/motd", "/etc/../etc/motd", "/etc//motd"):
        assert_one_line_error(cli("sub", "get-file", host.address, path, env=cli_env), path)
    with SubClient(host.address, admin) as client:  # the same checks on subd's side
        for path in (b"etc/motd", b"/etc/../../outside", b"/var/./blob"):
            request = subd_pb2.GetFilesRequest(paths=[path])
            with pytest.raises(grpc.RpcError) as failed:
                list(client.stub.GetFiles(request, timeout=10))
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_config_shows_and_sets_limits_checked_on_both_sides(
        host: Daemon, cli_env: dict[str, str], admin: Security) -> None:
    def config() -> dict[str, object]:
        shown: dict[str, object] = json.loads(
            cli("sub", "config", host.address, "--json", env=cli_env, check=True).stdout)
        return shown

    before = config()
    assert before["scan_speed_percent"] == 0 and before["cpu_percent"] == 50  # the flags
    assert before["network_speed_percent"] == 10 and before["verify_period_seconds"] == 86400
    assert ".subd" not in json.dumps(before) and isinstance(before["scan_exclusions"], list)
    text = cli("sub", "config", host.address, env=cli_env, check=True).stdout
    assert "scan_speed_percent" in text and "0 (no limit)" in text and "{" not in text

    changed = cli("sub", "config", host.address, "--set", "cpu_percent=20", "--set",
                  "network_speed_percent=100", "--set", "scan_exclusions=/tmp/.*",
                  env=cli_env)
    assert changed.returncode == 0, changed.stderr
    assert "until subd restarts" in changed.stderr
    lines = {line.split()[0]: line.split()[1] for line in changed.stdout.splitlines()
             if not line.startswith(" ")}
    assert lines["cpu_percent"] == "20" and lines["network_speed_percent"] == "100"
    after = config()
    assert after["cpu_percent"] == 20 and after["scan_exclusions"] == ["/tmp/.*"]

    unknown = cli("sub", "config", host.address, "--set", "cpu=5", env=cli_env)
    assert_one_line_error(unknown, "unknown setting 'cpu'", "cpu_percent",
                          "network_speed_percent", "verify_period_seconds")
    for bad, said in (("cpu_percent=150", "from 1 to 100"), ("cpu_percent=0", "from 1 to 100"),
                      ("scan_speed_percent=fast", "from 1 to 100"),
                      ("verify_period_seconds=0", "at least 1"),
                      ("scan_exclusions=[", "invalid regex"), ("cpu_percent", "KEY=VALUE")):
        assert_one_line_error(cli("sub", "config", host.address, "--set", bad, env=cli_env),
                              said)
    assert config() == after  # a refused --set changes nothing

    with SubClient(host.address, admin) as client:  # subd checks what arrives too
        for wire in (subd_pb2.Configuration(cpu_percent=500, scan_speed_percent=5),
                     subd_pb2.Configuration(network_speed_percent=101),
                     subd_pb2.Configuration(scan_exclusions=["("], cpu_percent=5)):
            with pytest.raises(grpc.RpcError) as failed:
                client.stub.SetConfiguration(wire, timeout=10)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "\n" not in (failed.value.details() or "")
        client.wait_for_scan(client.poll(short=True)[0].scan_count)  # still scanning
    assert config() == after  # all or nothing: nothing of a refused request applied

    host.stop()  # a set value lasts until subd restarts: the flags are the defaults
    host.start()
    assert config() == before

    boosted = cli("sub", "config", host.address, "--set", "scan_speed_percent=100", "--set",
                  "cpu_percent=90", "--for", "15", "--json", env=cli_env)  # the reference's boosts
    assert boosted.returncode == 0, boosted.stderr
    during = json.loads(boosted.stdout)
    assert during["cpu_percent"] == 90 and during["scan_speed_percent"] == 100
    assert during["restore_keys"] == ["cpu_percent", "scan_speed_percent"]
    assert during["restore_unix"] > time.time()
    shown = cli("sub", "config", host.address, env=cli_env, check=True).stdout
    assert "boost: cpu_percent, scan_speed_percent back to the values before it at" in shown
    kept = json.loads(cli("sub", "config", host.address, "--set", "cpu_percent=30", "--json",
                          env=cli_env, check=True).stdout)  # a lasting change in a boost
    assert kept["restore_keys"] == ["scan_speed_percent"] and kept["cpu_percent"] == 30
    wait_for(lambda: config() == {**before, "cpu_percent": 30},
             "the boost ends: scan 0 (no limit) again, the lasting CPU 30 kept", timeout=60)
    assert_one_line_error(cli("sub", "config", host.address, "--for", "1m", env=cli_env),
                          "--for needs --set")
    assert_one_line_error(cli("sub", "config", host.address, "--set", "cpu_percent=5",
                              "--for", "8d", env=cli_env), "at most 7 days")


def test_pins_expire() -> None:
    pins = Pins(seconds=0.2)
    pins.pin([b"a" * 32, b"b" * 32])
    assert pins.live() == {b"a" * 32, b"b" * 32}
    time.sleep(0.3)
    assert pins.live() == set()


def one_host_fleet(tmp_path: Path, ca: Path, imageserver: Daemon,
                   start_subd: Callable[..., Daemon]) -> FleetUnderTest:
    """A dominator managing one subd, host-1 (a name DNS does not know)."""
    return FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=1)


def test_mdb_hostnames_and_connection_errors(
        tmp_path: Path, ca: Path, imageserver: Daemon,
        start_subd: Callable[..., Daemon]) -> None:
    fleet = one_host_fleet(tmp_path, ca, imageserver, start_subd)
    try:
        sub = fleet.sub("host-1")
        dead = f"127.0.0.1:{free_port()}"
        fleet.run("mdb", "set", "host-1", "--address", sub.address)
        fleet.run("mdb", "set", "host-9", "--address", dead)
        polled = cli("sub", "poll", "host-1", env=fleet.env)
        assert polled.returncode == 0, polled.stderr
        assert polled.stdout.startswith(f"{sub.address}: generation")
        note = polled.stderr.strip()
        assert note == (f"host-1 does not resolve: using {sub.address} from its MDB record "
                        f"(the dominator at {fleet.dominator.address})")
        with_port = cli("sub", "config", f"host-1:{sub.port}", "--json", env=fleet.env)
        assert with_port.returncode == 0 and "cpu_percent" in with_port.stdout

        unknown = cli("sub", "poll", "web-1", env=fleet.env)
        assert_one_line_error(unknown, "web-1 does not resolve and the MDB has no such host "
                              f"(asked the dominator at {fleet.dominator.address}",
                              "DOMINATOR_ADDRESS")
        no_dominator = cli("sub", "poll", "web-1", env={**fleet.env,
                                                        "DOMINATOR_ADDRESS": dead})
        assert "web-1 does not resolve" in error_line(no_dominator, 3)

        refused = cli("sub", "poll", dead, env=fleet.env)
        line = error_line(refused, 3)
        assert dead in line and "the HOST argument" in line and "refused" in line
        via_mdb = cli("sub", "get-file", "host-9", "/etc/motd", env=fleet.env)
        line = error_line(via_mdb, 3)
        assert dead in line and "MDB record of host-9" in line
        for url in ("https://web-1:6969", "http://127.0.0.1"):
            assert_one_line_error(cli("sub", "poll", url, env=fleet.env), "URL", "HOST:PORT")
    finally:
        fleet.stop()


def test_fetch_then_update_on_a_host_the_dominator_manages(
        tmp_path: Path, ca: Path, imageserver: Daemon,
        start_subd: Callable[..., Daemon]) -> None:
    fleet = one_host_fleet(tmp_path, ca, imageserver, start_subd)
    try:
        v1 = tmp_path / "v1"
        (v1 / "etc").mkdir(parents=True)
        (v1 / "etc/motd").write_text("v1\n")
        fleet.run("image", "add", "v1", str(v1))
        (v1 / "etc/motd").write_text("v2\n")
        for index in range(3):
            (v1 / "etc" / f"new-{index}").write_bytes(os.urandom(50_000))
        fleet.run("image", "add", "v2", str(v1))
        root, sub = fleet.root("host-1"), fleet.sub("host-1")
        fleet.run("mdb", "set", "host-1", "--address", sub.address, "--required-image", "v1")
        fleet.wait_status(["host-1"], "synced", "v1")

        def status() -> dict[str, int]:
            polled: dict[str, int] = json.loads(fleet.run("sub", "poll", "host-1", "--json"))
            return polled

        # An object no fetch pinned (left from before a restart, say): the herd's
        # Cleanup must remove it while it keeps what `sub fetch` brought.
        ObjectStore(root / ".subd" / "objects").add_bytes(b"a stray object\n")
        fleet.run("sub", "fetch", "host-1", "v2")
        fetched = status()  # the herd may have cleaned up the stray object already
        assert fetched["pinned_objects"] == 4 and fetched["cached_objects"] in (4, 5), fetched
        wait_for(lambda: "cleanup removed 1 cached objects, kept 4" in sub.log(),
                 "the herd's cycle calls Cleanup on the synced host")
        assert status()["cached_objects"] == 4
        updated = cli("sub", "update", "host-1", "v2", "--json", env=fleet.env)
        assert updated.returncode == 0, updated.stderr
        result = json.loads(updated.stdout)
        assert result["success"] and result["paths_changed"] >= 4, result
    finally:
        fleet.stop()
