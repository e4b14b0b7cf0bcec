"""The CLI's connection mistakes, against real servers: each is one line naming the
server, the address and the setting that chose it, with the likely fix, and an exit
code a script can act on (3 unavailable, 2 bad input). Also --version, bare groups and
the documented exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, assert_one_line_error, cli, free_port

UNAVAILABLE = 3


@pytest.fixture
def plain_imageserver(tmp_path: Path) -> Daemon:
    """An image server started with --insecure (no TLS)."""
    state = tmp_path / "plain-state"
    daemon = Daemon("imageserver.main", ["--state-dir", str(state), "--insecure"],
                    "imageserver", free_port(), Security(None), tmp_path / "plain.log",
                    state_dir=state)
    daemon.start()
    yield daemon
    daemon.stop()


def test_refused_connection_names_server_address_and_setting(ca: Path) -> None:
    port = free_port()  # claimed, so nothing listens there
    by_flag = cli("fleet", "status", "--dominator", f"127.0.0.1:{port}",
                  env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert_one_line_error(by_flag, "the dominator", f"127.0.0.1:{port}", "--dominator",
                          "connection refused", code=UNAVAILABLE)
    by_env = cli("image", "list", env={"DOMINATOR_TLS_DIR": str(ca / "admin"),
                                       "DOMINATOR_IMAGESERVER": f"127.0.0.1:{port}"})
    assert_one_line_error(by_env, "the image server", "from DOMINATOR_IMAGESERVER",
                          code=UNAVAILABLE)


def test_wrong_port_says_whose_port_it_is(ca: Path, imageserver: Daemon) -> None:
    # The image server's address given as the dominator's: its certificate is for
    # another role, and the message says which port the dominator should be on.
    result = cli("fleet", "status", "--dominator", imageserver.address,
                 env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert_one_line_error(result, f"{imageserver.address} is not the dominator",
                          "another role", code=UNAVAILABLE)


def test_foreign_ca_is_named(tmp_path: Path, imageserver: Daemon) -> None:
    other = tmp_path / "other-ca"
    init_ca(other)
    result = cli("image", "list", "--imageserver", imageserver.address,
                 env={"DOMINATOR_TLS_DIR": str(other / "admin")})
    assert_one_line_error(result, "not signed by our CA", "--tls-dir", code=UNAVAILABLE)


def test_insecure_against_tls_and_tls_against_plain(ca: Path, imageserver: Daemon,
                                                    plain_imageserver: Daemon) -> None:
    insecure = cli("image", "list", "--imageserver", imageserver.address, "--insecure")
    assert_one_line_error(insecure, "expects TLS", "--insecure", "--tls-dir",
                          code=UNAVAILABLE)
    tls = cli("image", "list", "--imageserver", plain_imageserver.address,
              env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert_one_line_error(tls, "does not speak TLS", "--insecure", code=UNAVAILABLE)


def test_url_where_host_port_is_expected(ca: Path) -> None:
    result = cli("image", "list", "--imageserver", "https://images.example:6971/x",
                 env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert_one_line_error(result, "is a URL", "images.example:6971")


def test_unresolvable_host(ca: Path) -> None:
    result = cli("image", "list", "--imageserver", "no-such-host.invalid:6971",
                 env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert_one_line_error(result, "cannot resolve", "no-such-host.invalid", "--imageserver",
                          code=UNAVAILABLE)


def test_version_bare_groups_and_exit_codes_in_help() -> None:
    version = cli("--version", check=True)
    assert version.stdout.startswith("dominator ") and version.stdout.split()[1][0].isdigit()
    for program in ("subd", "imageserver"):
        daemon = subprocess.run([sys.executable, "-m", f"{program}.main", "--version"],
                                capture_output=True, text=True, check=True)
        assert daemon.stdout.split()[0] == program and daemon.stdout.split()[1][0].isdigit()
    for group in ("image", "mdb", "fleet", "deploy", "sub", "certs"):
        bare = cli(group)
        assert bare.returncode == 0 and "error" not in bare.stderr, (group, bare.stderr)
        assert "Commands:" in bare.stdout, group
    top = cli("--help", check=True)
    assert "Exit codes: 0 success, 1" in " ".join(top.stdout.split())
    shown = cli("image", "add", "--help", check=True)
    assert "default: localhost:6971" in shown.stdout.replace("\n", " ")
